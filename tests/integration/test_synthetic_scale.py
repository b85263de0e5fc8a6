"""The scale-mode synthetic catalog (`fmrl data prepare-synthetic-scale`): counts and attributes, walks
that follow the attributes, feature tables in the `fmrl features` format, determinism, errors that name
the argument, and a short `fmrl train` on it.

    .venv/bin/python -m pytest -q tests/integration/test_synthetic_scale.py
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from data_pipeline.features import load_feature_tables, write_feature_table
from data_pipeline.loader import SequenceDataset, read_item_attributes
from data_pipeline.shards import read_manifest
from data_pipeline.storage import join
from data_pipeline.stream import iter_shard
from data_pipeline.synthetic_scale import prepare_synthetic_scale
from trainer.cli import main

SMALL: dict[str, Any] = dict(
    num_items=3000,
    num_users=800,
    num_categories=6,
    num_brands=40,
    min_seq_len=5,
    max_seq_len=20,
    seed=3,
    text_dim=24,
    image_dim=16,
    max_samples_per_shard=1000,
    progress=False,
)


def _records(url: str, prefix: str) -> list[dict[str, Any]]:
    manifest = read_manifest(url, prefix)
    return [json.loads(s["json"]) for e in manifest.shards for s in iter_shard(join(url, e.name), e)]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    url = str(tmp_path_factory.mktemp("scale") / "data")
    summary = prepare_synthetic_scale(url, **SMALL)
    return {"url": url, "summary": summary, "items": _records(url, "items"), "users": _records(url, "users")}


def test_counts_and_attributes(small: dict[str, Any]) -> None:
    url, items, users = small["url"], small["items"], small["users"]
    dataset = json.loads(open(os.path.join(url, "dataset.json")).read())
    assert dataset["num_items"] == len(items) == 3000 and dataset["num_users"] == len(users) == 800
    assert dataset["num_attributes"] == 6 + 40
    assert (
        dataset["num_interactions"]
        == sum(len(u["items"]) for u in users)
        == small["summary"].num_interactions
    )
    assert [r["item_id"] for r in items] == list(range(1, 3001))
    assert all(5 <= len(u["items"]) <= 20 and all(1 <= i <= 3000 for i in u["items"]) for u in users)
    # the attribute table's bags are [category + 1, C + brand + 1]; a brand belongs to one category
    bags = read_item_attributes(SequenceDataset.open(url))
    assert bags.num_attributes == 46
    brand_category: dict[int, int] = {}
    for item in items:
        category, brand = item["attributes"]
        assert 1 <= category <= 6 < brand <= 46
        assert bags.values[bags.offsets[item["item_id"]] : bags.offsets[item["item_id"] + 1]].tolist() == [
            category,
            brand,
        ]
        assert brand_category.setdefault(brand, category) == category
    assert len(brand_category) == 40  # every brand has items


def test_walks_follow_the_attributes(small: dict[str, Any]) -> None:
    attributes = {r["item_id"]: r["attributes"] for r in small["items"]}
    pairs = [(a, b) for u in small["users"] for a, b in zip(u["items"], u["items"][1:])]
    same_brand = np.mean([attributes[a][1] == attributes[b][1] for a, b in pairs])
    same_category = np.mean([attributes[a][0] == attributes[b][0] for a, b in pairs])
    # 50% of the moves stay in the brand and 10% in the category (random pairs: 1/40 and 1/6)
    assert 0.45 < same_brand < 0.6
    assert same_category > same_brand + 0.05
    # the successor moves make each category's next categories predictable: the two most frequent other
    # categories after a category take most of its cross-category moves
    after: dict[int, list[int]] = {}
    for a, b in pairs:
        if attributes[a][0] != attributes[b][0]:
            after.setdefault(attributes[a][0], []).append(attributes[b][0])
    for nexts in after.values():
        counts = np.sort(np.bincount(nexts))[::-1]
        assert counts[:2].sum() > 0.6 * counts.sum()


def test_feature_tables_in_the_fmrl_features_format(small: dict[str, Any]) -> None:
    text, image, info = load_feature_tables(join(small["url"], "features"))  # checks the sha256s
    assert text is not None and image is not None
    assert tuple(text.shape) == (3001, 24) and tuple(image.shape) == (3001, 16)
    assert info["num_items"] == 3000 and info["text_model"] == info["image_model"] == "synthetic"
    assert torch.all(text[0] == 0) and torch.allclose(text[1:].norm(dim=1), torch.ones(3000), atol=1e-5)
    # rows encode the brand: items of one brand are closer than items of different brands
    brand = torch.tensor([r["attributes"][1] for r in small["items"]])
    sims = text[1:] @ text[1:].T
    same = brand[:, None] == brand[None, :]
    assert sims[same].mean() > sims[~same].mean() + 0.3


def test_streamed_table_is_byte_for_byte_what_safetensors_writes(tmp_path) -> None:
    table = torch.randn(37, 5)
    url = str(tmp_path / "t.safetensors")
    blocks = [table[:10].numpy(), table[10:].numpy()]
    written = write_feature_table(url, 37, 5, blocks, "some-model")
    data = open(url, "rb").read()
    assert data == st_save({"features": table}, metadata={"model": "some-model"})
    import hashlib

    assert written["sha256"] == hashlib.sha256(data).hexdigest()
    with pytest.raises(ValueError, match="36 rows, the table has 37"):
        write_feature_table(str(tmp_path / "short.safetensors"), 37, 5, [table[:36].numpy()], "m")
    assert not os.path.exists(tmp_path / "short.safetensors")  # nothing half-written


def test_same_arguments_same_bytes_and_reuse(small: dict[str, Any], tmp_path) -> None:
    url = str(tmp_path / "again")
    prepare_synthetic_scale(url, **SMALL)
    for prefix in ("items", "users"):
        assert [e.sha256 for e in read_manifest(url, prefix).shards] == [
            e.sha256 for e in read_manifest(small["url"], prefix).shards
        ]
    assert open(os.path.join(url, "features", "features.json")).read().replace(url, "") == open(
        os.path.join(small["url"], "features", "features.json")
    ).read().replace(small["url"], "")
    assert prepare_synthetic_scale(url, **SMALL).reused
    with pytest.raises(ValueError, match=r"num_brands=40 \(asked 41\)"):
        prepare_synthetic_scale(url, **{**SMALL, "num_brands": 41})


def test_errors_name_the_argument(tmp_path, capsys) -> None:
    out = str(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"num_items \(10\) must be >= num_brands \(20\)"):
        prepare_synthetic_scale(out, **{**SMALL, "num_items": 10, "num_brands": 20})
    with pytest.raises(ValueError, match=r"num_brands \(4\) must be >= num_categories \(6\)"):
        prepare_synthetic_scale(out, **{**SMALL, "num_brands": 4})
    with pytest.raises(ValueError, match="num_categories must be >= 3"):
        prepare_synthetic_scale(out, **{**SMALL, "num_categories": 2})
    argv = [
        "data",
        "prepare-synthetic-scale",
        out,
        "--num-items",
        "10",
        "--num-brands",
        "20",
        "--num-categories",
        "4",
    ]
    assert main(argv) == 2
    assert "--num-items (10) must be >= --num-brands (20)" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_scale_catalog_trains_with_fmrl_train(tmp_path) -> None:
    data = str(tmp_path / "data")
    argv = ["data", "prepare-synthetic-scale", data, "--num-items", "400", "--num-users", "300"]
    argv += ["--num-categories", "4", "--num-brands", "12", "--text-dim", "32", "--image-dim", "16"]
    argv += ["--max-seq-len", "12", "--shard-size", "100"]
    assert main(argv) == 0
    overrides = [
        f"data.path={data}",
        f"run.out_dir={tmp_path}",
        "run.name=scale",
        "run.progress_bar=false",
        "data.num_workers=0",
        "model.nested_sizes=[8,16]",
        "model.use_id_embedding=true",
        "model.use_attributes=true",
        "train.epochs=1",
        "train.max_steps=4",
        "train.batch_size=32",
        "train.num_threads=1",
        "optim.warmup_steps=1",
        "eval.batch_size=64",
        "eval.max_users=50",
    ]
    assert main(["train", *overrides]) == 0
    metrics = json.loads((tmp_path / "scale" / "metrics.json").read_text())
    assert set(metrics["test"]) == {"8", "16"}
    assert all(0.0 <= v <= 1.0 for size in metrics["test"].values() for v in size.values())
