"""Nested-size exports: the size-m export of a trained run scores exactly like the full model's size-m
prefix, loads from safetensors and JSON only, adds to an export of the same model and never mixes
models, and the recommender checks what it is given; bad requests are clear errors."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from data_pipeline.loader import SequenceDataset, eval_batches
from models.fmrl import nested_scores
from trainer.cli import main
from trainer.config import load_config
from trainer.export import ExportError, load_click_model, load_recommender, load_trained_model
from trainer.train import train


@pytest.fixture(scope="module")
def run_dir(tiny_dataset, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("runs")
    overrides = [
        f"data.path={tiny_dataset}",
        f"run.out_dir={out}",
        "run.name=r",
        "model.nested_sizes=[8,16,32]",
        "model.use_id_embedding=true",
        "train.epochs=1",
        "train.batch_size=32",
        "data.num_workers=0",
        "run.progress_bar=false",
        "run.loggers=[]",
    ]
    return train(load_config(None, overrides)).run_dir


def test_each_size_scores_like_the_full_models_prefix(run_dir, tiny_dataset, capsys) -> None:
    # training exported every nested size by itself
    automatic = json.loads(open(f"{run_dir}/export/export.json").read())
    assert set(automatic["sizes"]) == {"8", "16", "32"}
    assert main(["export", run_dir, "--sizes", "8,32"]) == 0
    printed = capsys.readouterr().out
    assert "size     8" in printed and "size    32" in printed
    # exporting sizes that are there already keeps the other sizes listed and the files untouched
    manifest = json.loads(open(f"{run_dir}/export/export.json").read())
    assert manifest == automatic and manifest["num_items"] == 150
    assert manifest["sizes"]["8"]["bytes"] < manifest["sizes"]["32"]["bytes"]

    model = load_trained_model(run_dir)
    batch = next(iter(eval_batches(SequenceDataset.open(tiny_dataset), "test", 40, 50)))
    with torch.no_grad():
        hidden, items = model(batch.tokens)
        full = nested_scores(hidden[:, -1], items[1:], [8, 32])
    for size in (8, 32):
        recommender = load_recommender(f"{run_dir}/export", size)
        assert recommender.items.shape == (151, size)
        torch.testing.assert_close(recommender.scores(batch.tokens), full[size], rtol=1e-5, atol=1e-5)
        values, ids = recommender.recommend(batch.tokens, 10, exclude_history=False)
        assert ids.shape == (40, 10) and bool((ids >= 1).all() and (ids <= 150).all())
        assert torch.equal(ids, torch.topk(full[size], 10).indices + 1)
        # by default the history's items are left out, and the rest keeps its order
        _, fresh = recommender.recommend(batch.tokens, 10)
        masked = full[size].clone()
        for row, history in enumerate(batch.tokens):
            masked[row, history[history > 0] - 1] = float("-inf")
            assert not set(fresh[row].tolist()) & set(history.tolist())
        assert torch.equal(fresh, torch.topk(masked, 10).indices + 1)


def exported_scores(url: str, tokens: torch.Tensor, sizes: tuple[int, ...]) -> dict[int, torch.Tensor]:
    return {size: load_recommender(url, size).scores(tokens) for size in sizes}


def test_a_checkpoint_exports_like_the_run_folder(run_dir, tiny_dataset, tmp_path) -> None:
    # the checkpoint root names its best checkpoint (1 epoch: the epoch's end) and carries the config
    assert main(["export", f"{run_dir}/checkpoints", "--sizes", "8,32", "--out", str(tmp_path / "c")]) == 0
    assert main(["export", run_dir, "--sizes", "8,32", "--out", str(tmp_path / "r")]) == 0
    batch = next(iter(eval_batches(SequenceDataset.open(tiny_dataset), "test", 40, 50)))
    from_checkpoint = exported_scores(str(tmp_path / "c"), batch.tokens, (8, 32))
    from_run = exported_scores(str(tmp_path / "r"), batch.tokens, (8, 32))
    for size in (8, 32):
        assert torch.equal(from_checkpoint[size], from_run[size])


def test_bad_requests_are_clear_errors(run_dir, tmp_path, capsys) -> None:
    assert main(["export", run_dir, "--sizes", "12", "--out", str(tmp_path / "x")]) == 2
    assert "sizes [12] are not nested sizes" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--sizes", "8"]) == 2
    assert "is neither a finished run folder" in capsys.readouterr().err
    main(["export", run_dir, "--sizes", "8", "--out", str(tmp_path / "e")])
    with pytest.raises(ExportError, match=r"has sizes \[8\], not 16"):
        load_recommender(str(tmp_path / "e"), 16)
    with pytest.raises(ExportError, match=r"size must be an int .* got '8' \(str\)"):
        load_recommender(str(tmp_path / "e"), "8")  # type: ignore[arg-type]
    # the click-model loader reads export.json like every other reader: clear errors, not a traceback
    with pytest.raises(ExportError, match=r"is not a DLRM export"):
        load_click_model(str(tmp_path / "e"))
    with pytest.raises(ExportError, match=r"has no export.json"):
        load_click_model(str(tmp_path / "missing"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "export.json").write_text('{"task": ')
    with pytest.raises(ExportError, match=r"broken/export.json is not valid JSON"):
        load_click_model(str(tmp_path / "broken"))


def test_sizes_add_up_in_one_folder_and_another_model_is_refused(
    run_dir, tiny_dataset, tmp_path, capsys
) -> None:
    out = str(tmp_path / "x")
    assert main(["export", run_dir, "--sizes", "8", "--out", out]) == 0
    first = json.loads(open(f"{out}/export.json").read())
    assert main(["export", run_dir, "--sizes", "32", "--out", out]) == 0
    both = json.loads(open(f"{out}/export.json").read())
    assert set(both["sizes"]) == {"8", "32"} and both["sizes"]["8"] == first["sizes"]["8"]

    # another model (trained with another seed) into the same folder: refused, the export unchanged
    other = train(
        load_config(
            None,
            [
                f"data.path={tiny_dataset}",
                f"run.out_dir={tmp_path}",
                "run.name=other",
                "model.nested_sizes=[8,16,32]",
                "model.use_id_embedding=true",
                "train.epochs=1",
                "train.seed=7",
                "run.progress_bar=false",
                "run.loggers=[]",
                "run.export=false",
            ],
        )
    ).run_dir
    capsys.readouterr()
    assert main(["export", other, "--sizes", "16", "--out", out]) == 2
    assert "holds an export of another model (sizes [8, 32])" in capsys.readouterr().err
    assert json.loads(open(f"{out}/export.json").read()) == both
    # --overwrite replaces it as a whole: only the new model's sizes are listed, old folders are gone
    assert main(["export", other, "--sizes", "16,32", "--out", out, "--overwrite"]) == 0
    replaced = json.loads(open(f"{out}/export.json").read())
    assert set(replaced["sizes"]) == {"16", "32"} and replaced["fingerprint"] != both["fingerprint"]
    folders = sorted(name for name in os.listdir(out) if name.startswith("size-"))
    assert folders == sorted(entry["folder"] for entry in replaced["sizes"].values())
    assert replaced["sizes"]["32"]["folder"] != "size-32"  # new files under a new name: never half-written


def test_the_recommender_checks_its_inputs(run_dir, tiny_dataset) -> None:
    rec = load_recommender(f"{run_dir}/export", 16)
    n = rec.num_items
    with pytest.raises(ValueError, match=rf"histories\[0, 1\] = -1: item ids are 1..{n}"):
        rec.recommend(torch.tensor([[0, -1, 5]]))
    with pytest.raises(ValueError, match=rf"histories\[1, 2\] = {n + 1}"):
        rec.recommend(torch.tensor([[0, 3, 5], [1, 2, n + 1]]))
    with pytest.raises(ValueError, match=r"histories row 0 has padding \(0\) after an item: pad on the left"):
        rec.recommend(torch.tensor([[5, 17, 42, 0, 0]]))
    with pytest.raises(ValueError, match=rf"histories\[1\] holds -1: item ids are integers in 1..{n}"):
        rec.recommend([[3], [-1]])
    with pytest.raises(ValueError, match=r"histories\[0\] holds 0"):
        rec.recommend([[0, 3]])
    # numpy's integers are integers, and a refusal shows plain values (0, not np.int64(0))
    assert torch.equal(rec.recommend([list(np.array([5, 17]))])[1], rec.recommend([[5, 17]])[1])
    with pytest.raises(ValueError, match=r"^histories\[0\] holds 0: item ids"):
        rec.recommend([list(np.array([0, 3]))])
    for k in (0, n + 1, 2.5):
        with pytest.raises(ValueError, match=rf"k must be an integer in 1..{n}"):
            rec.recommend([[3]], k=k)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="a history covers all but 100 of the 150 items"):
        rec.recommend([list(range(1, 51))], k=101)  # 50 = max_len: a longer history keeps its last 50
    # lists of any length are left-padded here: the same answer as the padded tensor
    scores_list, ids_list = rec.recommend([[5, 17, 42], [9]], k=5)
    scores_tensor, ids_tensor = rec.recommend(torch.tensor([[5, 17, 42], [0, 0, 9]]), k=5)
    assert torch.equal(ids_list, ids_tensor) and torch.allclose(scores_list, scores_tensor)
    # an empty history gets the most popular training items (the export records their counts)
    dataset = SequenceDataset.open(tiny_dataset)
    from data_pipeline.loader import scan_users

    counts = torch.from_numpy(scan_users(dataset).train_item_counts[1:].astype("float32"))
    _, popular = rec.recommend([[]], k=5)
    assert torch.equal(counts[popular[0] - 1], torch.topk(counts, 5).values)
    _, popular_tensor = rec.recommend(torch.zeros(1, 4, dtype=torch.int64), k=5)
    assert torch.equal(popular, popular_tensor)
    # internal ids map back to the data set's own item ids
    assert rec.source_ids(ids_list)[0] == [rec.item_ids[i] for i in ids_list[0].tolist()]
    assert rec.item_ids[0] == "" and len(rec.item_ids) == n + 1


def test_an_edited_export_is_refused_naming_the_file(run_dir, tmp_path) -> None:
    out = str(tmp_path / "e")
    assert main(["export", run_dir, "--sizes", "16,32", "--out", out]) == 0
    manifest = json.loads(open(f"{out}/export.json").read())
    config_path = f"{out}/{manifest['sizes']['32']['folder']}/config.json"
    config = json.loads(open(config_path).read())
    config["model"]["nested_sizes"] = [8, 16, 24, 32]  # other nested sizes: the model would score differently
    open(config_path, "w").write(json.dumps(config))
    with pytest.raises(ExportError, match=r"config.json does not match the sha256 in export.json"):
        load_recommender(out, 32)
    # an index edited to match: the weights themselves do not fit those nested sizes
    manifest["sizes"]["32"]["sha256"]["config.json"] = hashlib.sha256(
        open(config_path, "rb").read()
    ).hexdigest()
    open(f"{out}/export.json", "w").write(json.dumps(manifest))
    with pytest.raises(
        ExportError, match=r"config.json lists nested sizes \[8, 16, 24, 32\].*\(size 24 not in the weights\)"
    ):
        load_recommender(out, 32)


def served_ndcg(run_dir: str, dataset_url: str, users: int) -> dict[int, float]:
    """NDCG@10 of each exported size as the service answers (top 10 of `recommend`, which masks the
    history), on the first ``users`` test users, computed here from the answers themselves."""
    batches = eval_batches(SequenceDataset.open(dataset_url), "test", 256, 50, max_users=users)
    tokens, targets = zip(*((b.tokens, b.targets) for b in batches))
    ndcg = {}
    for size in (8, 16, 32):
        gains = []
        for history, target in zip(tokens, targets):
            _, ids = load_recommender(f"{run_dir}/export", size).recommend(history, k=10)
            for row, item in zip(ids.tolist(), target.tolist()):
                gains.append(1 / math.log2(row.index(item) + 2) if item in row else 0.0)
        ndcg[size] = sum(gains) / len(gains)
    return ndcg


def test_fmrl_sizes_table_plot_and_a_size_for_a_budget(run_dir, tiny_dataset, capsys) -> None:
    args = ["sizes", run_dir, "--repeats", "3", "--max-users", "60", "--threads", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "int8 dNDCG" in printed and "as served (the whole history masked" in printed
    assert "on 60 test users" in printed and "run NDCG@10" in printed
    saved = json.loads(open(f"{run_dir}/export/sizes.json").read())
    assert os.path.getsize(f"{run_dir}/export/sizes.png") > 1000
    table = {e["size"]: e for e in saved["sizes"]}
    assert sorted(table) == [8, 16, 32]
    test = json.loads(open(f"{run_dir}/metrics.json").read())["test"]
    served = served_ndcg(run_dir, tiny_dataset, users=60)
    for size, entry in table.items():
        # the quality quoted is the one the service gives (history masked), the run's own beside it
        assert entry["quality"]["history"] == "masked" and entry["quality"]["users"] == 60
        assert entry["quality"]["NDCG@10"] == pytest.approx(served[size], abs=1e-9)
        assert entry["quality_run"]["NDCG@10"] == test[str(size)]["NDCG@10"]
        assert entry["quality_run"]["history"] == "ranked"
        assert entry["items_bytes"]["fp32"] == 4 * 151 * size
        assert entry["items_bytes"]["int8"] == 151 * size + 4 * 151
        assert entry["latency_ms"]["1"]["p99"] >= entry["latency_ms"]["1"]["p50"] > 0
        # the int8 table is scored on the test users: its NDCG@10 is measured, and close
        assert entry["int8"]["users"] == 60 and abs(entry["int8"]["change"]) < 0.05
    memory = {s: (e["model_bytes"]["fp32"] + e["items_bytes"]["fp32"]) / 2**20 for s, e in table.items()}
    assert main([*args[:2], "--max-users", "-1", "--repeats", "2", "--max-memory-mb", str(memory[16])]) == 0
    assert "size 16 is the largest that fits" in capsys.readouterr().out
    assert (
        main([*args[:2], "--max-users", "-1", "--repeats", "2", "--max-memory-mb", str(memory[8] / 2)]) == 1
    )
    assert "no size fits the budget: size 8: memory" in capsys.readouterr().out
    # the same choice in Python, from the saved table
    assert load_recommender(f"{run_dir}/export", "auto", max_memory_mb=memory[16]).size == 16


def test_a_diverged_runs_weights_are_named_non_finite(run_dir, tmp_path, capsys) -> None:
    diverged = tmp_path / "diverged"
    shutil.copytree(run_dir, diverged, ignore=shutil.ignore_patterns("export", "checkpoints"))
    weights = load_file(diverged / "model.safetensors")
    name = "trunk.blocks.0.ffn.up.weight"
    weights[name] = torch.full_like(weights[name], float("nan"))  # what a run with loss nan saves
    save_file(weights, diverged / "model.safetensors")
    for command in (["export", str(diverged), "--sizes", "8"], ["eval", str(diverged)]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert f"tensor '{name}' holds non-finite values" in err and "model.safetensors" in err
        assert "nested" not in err and len(err.splitlines()) == 1


def test_the_export_records_the_training_max_len(run_dir) -> None:
    manifest = json.loads(open(f"{run_dir}/export/export.json").read())
    assert manifest["max_len"] == 50  # train.max_len of the run (the default)
    assert load_recommender(f"{run_dir}/export", 8).max_len == 50


def test_recommend_and_sizes_refuse_bad_arguments_in_one_line(run_dir, capsys) -> None:
    export = f"{run_dir}/export"
    assert main(["recommend", export, "--history", "5,,17", "--internal-ids"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "fmrl recommend: error: --history '5,,17': entry 2 is empty: give comma-separated item ids "
        "(or '' for no history)"
    )
    assert main(["recommend", export, "--history", "5,17,", "--internal-ids"]) == 2
    assert "entry 3 is empty" in capsys.readouterr().err
    assert main(["recommend", export, "--history", "", "--k", "3"]) == 0  # no history: the most popular
    # a history longer than the model's max_len: its last 50 items are used, and the answer says so
    long = ",".join(str(1 + i % 150) for i in range(70))
    assert main(["recommend", export, "--history", long, "--internal-ids", "--include-history"]) == 0
    assert "only the last 50 of the history's 70 items are used" in capsys.readouterr().out
    for repeats in ("0", "-3"):
        with pytest.raises(SystemExit) as exited:
            main(["sizes", run_dir, "--repeats", repeats])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert f"argument --repeats: {repeats!r}: give at least 1" in err and "IndexError" not in err
