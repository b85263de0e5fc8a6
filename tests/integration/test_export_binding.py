"""What an export binds: its nested sizes come from the weights themselves (an edited config.json is
refused, never obeyed), non-finite weights are named as such, the training max_len travels with it and
caps the history a recommendation uses, and the recommender refuses an empty batch clearly.

    .venv/bin/python -m pytest -q tests/integration/test_export_binding.py
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from deploy import ExportError, load_recommender
from deploy.artifact import weight_nested_sizes
from deploy.costs import quality_report
from deploy.recommender import UNRECORDED_MAX_LEN
from models.fmrl import FMRLConfig, FMRLRec
from trainer.export import ItemCatalog, export_model

SIZES = [8, 16, 32]
NUM_ITEMS = 60
MAX_LEN = 6


@pytest.fixture(scope="module")
def model() -> FMRLRec:
    torch.manual_seed(0)
    cfg = FMRLConfig(nested_sizes=SIZES, num_blocks=2, use_id_embedding=True, r_max=0.9)
    features = torch.randn(NUM_ITEMS + 1, 12)
    features[0] = 0
    return FMRLRec(cfg, NUM_ITEMS, text_features=features).eval()


def _export(model: FMRLRec, out: str, max_len: int | None = MAX_LEN) -> str:
    popularity = torch.arange(NUM_ITEMS + 1, dtype=torch.float32)
    catalog = ItemCatalog([""] + [f"item-{i}" for i in range(1, NUM_ITEMS + 1)], popularity)
    export_model(model, out, SIZES, catalog=catalog, max_len=max_len)
    return out


@pytest.fixture
def export_dir(model, tmp_path) -> str:
    return _export(model, str(tmp_path / "export"))


def _rewrite(export_dir: str, size: int, name: str, data: bytes) -> str:
    """Replace a file of a size and record its new sha256 in export.json, as a deliberate edit would."""
    manifest = json.loads(open(f"{export_dir}/export.json").read())
    path = f"{export_dir}/{manifest['sizes'][str(size)]['folder']}/{name}"
    open(path, "wb").write(data)
    manifest["sizes"][str(size)]["sha256"][name] = hashlib.sha256(data).hexdigest()
    open(f"{export_dir}/export.json", "w").write(json.dumps(manifest))
    return path


def test_the_weights_fix_the_nested_sizes_not_config_json(export_dir) -> None:
    rec = load_recommender(export_dir, 32)
    assert weight_nested_sizes(dict(rec.model.trunk.state_dict())) == SIZES
    tokens = torch.tensor([[0, 3, 9, 27], [5, 6, 7, 8]])
    before = rec.scores(tokens)
    manifest = json.loads(open(f"{export_dir}/export.json").read())
    config_path = f"{export_dir}/{manifest['sizes']['32']['folder']}/config.json"
    config = json.loads(open(config_path).read())
    # dropping a nested size merges two normalised blocks: the same weights would score otherwise
    config["model"]["nested_sizes"] = [8, 32]
    _rewrite(export_dir, 32, "config.json", json.dumps(config).encode())
    with pytest.raises(ExportError) as refused:
        load_recommender(export_dir, 32)
    message = str(refused.value)
    assert (
        "config.json lists nested sizes [8, 32]" in message and "size 16 missing from config.json" in message
    )
    assert "\n" not in message
    assert load_recommender(export_dir, 16).size == 16  # the other sizes still load
    config["model"]["nested_sizes"] = SIZES  # put back: the same scores as before the edit
    _rewrite(export_dir, 32, "config.json", json.dumps(config).encode())
    torch.testing.assert_close(load_recommender(export_dir, 32).scores(tokens), before)


def test_non_finite_weights_are_named_not_blamed_on_nested_sizes(model, export_dir) -> None:
    manifest = json.loads(open(f"{export_dir}/export.json").read())
    weights_path = f"{export_dir}/{manifest['sizes']['16']['folder']}/model.safetensors"
    weights = load_file(weights_path)
    name = "trunk.blocks.0.lru.in_re.weight"
    weights[name] = torch.full_like(weights[name], float("nan"))  # a diverged run: NaN everywhere
    save_file(weights, weights_path)
    _rewrite(export_dir, 16, "model.safetensors", open(weights_path, "rb").read())
    with pytest.raises(ExportError, match=rf"model.safetensors: tensor '{name}' holds non-finite values"):
        load_recommender(export_dir, 16)
    # exporting a model held in memory whose weights diverged is refused too, naming the tensor
    diverged = FMRLRec(model.cfg, NUM_ITEMS, text_features=model.item_tower.text.weight).eval()
    diverged.load_state_dict(model.state_dict())
    with torch.no_grad():
        diverged.trunk.blocks[1].ffn_norm.weight[3] = float("inf")
    with pytest.raises(ExportError, match=r"tensor 'trunk.blocks.1.ffn_norm.weight' holds non-finite"):
        export_model(diverged, os.path.join(export_dir, "..", "diverged"), [8])


def test_the_export_records_max_len_and_the_recommender_keeps_the_last_items(model, export_dir, tmp_path):
    assert json.loads(open(f"{export_dir}/export.json").read())["max_len"] == MAX_LEN
    rec = load_recommender(export_dir, 16)
    assert rec.max_len == MAX_LEN and rec.history_limit == MAX_LEN and rec.history_cap is None
    long = list(range(1, 21))  # 20 items, oldest first
    torch.testing.assert_close(rec.scores([long]), rec.scores([long[-MAX_LEN:]]))
    scores, ids = rec.recommend([long, [4]], k=5)
    assert torch.equal(ids[0], rec.recommend([long[-MAX_LEN:]], k=5)[1][0])
    assert not set(ids[0].tolist()) & set(long[-MAX_LEN:])
    # a left-padded tensor keeps its last columns alike
    padded = torch.tensor([[0] * 4 + long])
    assert torch.equal(rec.recommend(padded, k=5)[1], ids[:1])
    # a lower cap (the service's) keeps fewer
    capped = load_recommender(export_dir, 16, history_cap=3)
    assert capped.history_limit == 3
    torch.testing.assert_close(capped.scores([long]), rec.scores([long[-3:]]))
    with pytest.raises(ValueError, match="history_cap must be a positive integer"):
        load_recommender(export_dir, 16, history_cap=0)
    # an export written before exports recorded max_len: None, and a documented fixed cap
    old = _export(model, str(tmp_path / "old"), max_len=None)
    manifest = json.loads(open(f"{old}/export.json").read())
    del manifest["max_len"]
    open(f"{old}/export.json", "w").write(json.dumps(manifest))
    legacy = load_recommender(old, 16)
    assert legacy.max_len is None and legacy.history_limit == UNRECORDED_MAX_LEN
    # more sizes of the same model keep the max_len its export recorded
    export_model(model, export_dir, [8])
    assert json.loads(open(f"{export_dir}/export.json").read())["max_len"] == MAX_LEN


def test_an_empty_batch_is_a_clear_value_error(export_dir) -> None:
    rec = load_recommender(export_dir, 8)
    for empty in ([], torch.zeros(0, 3, dtype=torch.int64)):
        with pytest.raises(ValueError, match=r"no histories given: pass a list of histories"):
            rec.recommend(empty)
    # an empty history (one user with nothing yet) is not an empty batch: the most popular items
    _, popular = rec.recommend([[]], k=3)
    assert popular[0].tolist() == [NUM_ITEMS, NUM_ITEMS - 1, NUM_ITEMS - 2]


def test_an_export_logs_each_size_as_it_is_written(model, tmp_path, caplog) -> None:
    logger = logging.getLogger("fmrl")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="fmrl"):
            export_model(model, str(tmp_path / "logged"), [8, 32], formats=["pt2"])
    finally:
        logger.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records]
    assert any("export to" in line and "sizes [8, 32], formats pt2" in line for line in lines)
    for position, size in enumerate((8, 32), start=1):
        assert any(f"export size {size} ({position}/2): model.pt2 traced in" in line for line in lines)
        assert any(f"export size {size} ({position}/2):" in line and "MiB in size-" in line for line in lines)


def test_info_quotes_quality_as_served_and_never_an_older_tables_ranked_figure() -> None:
    served = {"NDCG@10": 0.38, "Recall@10": 0.5, "history": "masked", "users": 60}
    run = {"NDCG@10": 0.43, "Recall@10": 0.6, "history": "ranked"}
    assert quality_report({"quality": served, "quality_run": run}) == {"served": served, "run": run}
    older = {"quality": {"NDCG@10": 0.43, "Recall@10": 0.6}}  # `fmrl sizes` before the served figure
    assert quality_report(older) == {"served": "not measured as served", "run": older["quality"]}
    assert quality_report({"quality": None}) == {"served": "not measured as served", "run": None}
