"""The synthetic-catalog shard writer: format and counts, determinism, the cluster signal in images, text
and user transitions (measured from the written shards), bounded memory at scale, and S3.

    .venv/bin/python -m pytest -q tests/integration/test_synthetic_shards.py
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from PIL import Image

from data_pipeline.shards import read_manifest, verify_shard
from data_pipeline.storage import StorageOptions, join, open_read
from data_pipeline.stream import iter_shard
from data_pipeline.synthetic_shards import ITEM_TEXT_TEMPLATE, prepare_synthetic

SMALL: dict[str, Any] = dict(
    num_items=300,
    num_users=200,
    num_clusters=12,
    min_seq_len=4,
    max_seq_len=12,
    seed=0,
    max_samples_per_shard=128,  # several shards per set
    image_size=32,
    progress=False,
)


def _samples(url: str, prefix: str, options: StorageOptions | None = None) -> list[dict[str, Any]]:
    """Every sample of a shard set, checked against its manifest (count, size, sha256) on the way."""
    manifest = read_manifest(url, prefix, options)
    return [s for e in manifest.shards for s in iter_shard(join(url, e.name), e, options)]


def _hashes(url: str, options: StorageOptions | None = None) -> list[str]:
    return [e.sha256 for prefix in ("items", "users") for e in read_manifest(url, prefix, options).shards]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    url = str(tmp_path_factory.mktemp("synthetic"))
    summary = prepare_synthetic(url, **SMALL)
    items = [json.loads(s["json"]) | {"png": s["png"], "key": s["__key__"]} for s in _samples(url, "items")]
    users = [json.loads(s["json"]) | {"key": s["__key__"]} for s in _samples(url, "users")]
    return {"url": url, "summary": summary, "items": items, "users": users}


def test_counts_and_format(small: dict[str, Any]) -> None:
    url, items, users = small["url"], small["items"], small["users"]
    with open_read(join(url, "dataset.json")) as f:
        dataset = json.loads(f.read())
    num_interactions = sum(len(u["items"]) for u in users)
    assert dataset == {
        "name": "synthetic",
        "num_items": 300,
        "num_users": 200,
        "num_interactions": num_interactions,
        "items_prefix": "items",
        "users_prefix": "users",
        "skipped": {},
        "item_text_template": ITEM_TEXT_TEMPLATE,
        "generator": {
            "dataset": "synthetic",
            "num_items": 300,
            "num_users": 200,
            "split": "leave-one-out",
            "seed": 0,
            "num_clusters": 12,
            "min_seq_len": 4,
            "max_seq_len": 12,
            "image_size": 32,
            "max_samples_per_shard": 128,
        },
    }
    assert small["summary"].num_interactions == num_interactions and not small["summary"].reused
    assert small["summary"].item_shards == 3  # 128 + 128 + 44
    for prefix, total in (("items", 300), ("users", 200)):
        manifest = read_manifest(url, prefix)
        assert manifest.total_samples == total
        assert manifest.meta["dataset"] == "synthetic" and manifest.meta["split"] == "leave-one-out"
        assert (manifest.meta["num_items"], manifest.meta["num_users"], manifest.meta["seed"]) == (
            300,
            200,
            0,
        )

    assert sorted(i["item_id"] for i in items) == list(range(1, 301))
    for item in items:
        assert item["key"] == f"{item['item_id']:09d}"
        assert 0 <= item["cluster"] < 12 and item["price"] > 0
        assert item["text"] == ITEM_TEXT_TEMPLATE.format(
            title=item["title"],
            price=f"{item['price']:.2f}",
            brand=item["brand"],
            category=item["category"],
            description=item["description"],
        )
        image = Image.open(io.BytesIO(item["png"]))
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
        image.load()  # decodes the pixel data, not just the header

    assert [u["key"] for u in users] == [f"{i:09d}" for i in range(200)]
    assert len({u["user_id"] for u in users}) == 200
    for user in users:
        assert 4 <= len(user["items"]) <= 12
        assert all(isinstance(i, int) and 1 <= i <= 300 for i in user["items"])


def test_deterministic_for_a_seed(small: dict[str, Any], tmp_path: Any) -> None:
    again = str(tmp_path / "again")
    prepare_synthetic(again, **SMALL)
    assert _hashes(again) == _hashes(small["url"])
    other = str(tmp_path / "other")
    prepare_synthetic(other, **(SMALL | {"seed": 1}))
    assert not set(_hashes(other)) & set(_hashes(small["url"]))


def _same_vs_cross(values: np.ndarray, clusters: np.ndarray) -> tuple[float, float]:
    """Mean of a pairwise (N, N) statistic over same-cluster pairs and over cross-cluster pairs."""
    same = clusters[:, None] == clusters[None, :]
    off_diagonal = ~np.eye(len(clusters), dtype=bool)
    return float(values[same & off_diagonal].mean()), float(values[~same].mean())


def test_images_and_text_carry_the_cluster(small: dict[str, Any]) -> None:
    items = small["items"]
    clusters = np.array([i["cluster"] for i in items])

    colours = np.stack(
        [np.asarray(Image.open(io.BytesIO(i["png"])), dtype=np.float64).mean(axis=(0, 1)) for i in items]
    )  # (N, 3) mean RGB
    distance = np.linalg.norm(colours[:, None] - colours[None, :], axis=-1)  # (N, N)
    same, cross = _same_vs_cross(distance, clusters)
    assert same < 0.6 * cross, (same, cross)  # seed 0: ~21 vs ~45 (RGB units)

    words = [set(re.findall(r"[a-z]+", i["text"].lower())) for i in items]
    jaccard = np.array([[len(a & b) / len(a | b) for b in words] for a in words])  # (N, N)
    same, cross = _same_vs_cross(jaccard, clusters)
    assert same > 1.5 * cross, (same, cross)  # seed 0: ~0.25 vs ~0.13


def test_next_item_follows_the_cluster_walk(small: dict[str, Any]) -> None:
    cluster_of = {i["item_id"]: i["cluster"] for i in small["items"]}
    pairs = np.array(
        [(cluster_of[a], cluster_of[b]) for u in small["users"] for a, b in zip(u["items"], u["items"][1:])]
    )

    def top3_share(current: np.ndarray, nxt: np.ndarray) -> float:
        # the writer moves to the same cluster or one of 2 successors 90% of the time: per current cluster,
        # the 3 most frequent next clusters should take most transitions (uniform next clusters: ~3/12)
        counts = np.zeros((12, 12))
        np.add.at(counts, (current, nxt), 1)
        return float(np.sort(counts, axis=1)[:, -3:].sum() / counts.sum())

    observed = top3_share(pairs[:, 0], pairs[:, 1])
    shuffled = top3_share(pairs[:, 0], np.random.default_rng(0).permutation(pairs[:, 1]))
    assert observed > 0.8 and shuffled < 0.5, (observed, shuffled)
    stay = float(np.mean(pairs[:, 0] == pairs[:, 1]))
    assert stay > 0.25, stay  # 0.3 + jumps that land home, vs 1/12 at random


_SCALE_SCRIPT = """
import json, sys, time
from data_pipeline.synthetic_shards import prepare_synthetic
start = time.perf_counter()
prepare_synthetic(sys.argv[1], num_items=int(sys.argv[2]), num_users=50, num_clusters=500, min_seq_len=3,
                  max_seq_len=20, seed=0, image_size=8, progress=False)
seconds = time.perf_counter() - start
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"hwm_mb": int(status["VmHWM"].split()[0]) / 1024, "items_per_s": int(sys.argv[2]) / seconds}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_stays_bounded_at_scale(tmp_path: Any) -> None:
    num_items = 50_000  # ~20 s on 2 shared cores; see the rate in the failure message / -s output
    out = subprocess.run(
        [sys.executable, "-c", _SCALE_SCRIPT, str(tmp_path), str(num_items)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"synthetic shards at scale: {result}")
    assert read_manifest(str(tmp_path), "items").total_samples == num_items
    # holding the samples (or per-item Python objects) would add well over 100 MB at this size
    assert result["hwm_mb"] < 250, result


def test_s3_round_trip_matches_local(s3_server: Any, tmp_path: Any) -> None:
    args = SMALL | {"num_items": 60, "num_users": 30, "num_clusters": 5, "max_samples_per_shard": 25}
    bucket = s3_server.make_bucket()
    url = join(bucket, "synthetic")
    summary = prepare_synthetic(url, **args, options=s3_server.options)
    with open_read(join(url, "dataset.json"), s3_server.options) as f:
        assert json.loads(f.read())["num_interactions"] == summary.num_interactions
    items = _samples(url, "items", s3_server.options)  # streams every shard, verified against the manifest
    assert [json.loads(s["json"])["item_id"] for s in items] == list(range(1, 61))
    prepare_synthetic(str(tmp_path), **args)
    assert _hashes(url, s3_server.options) == _hashes(str(tmp_path))


@pytest.mark.parametrize(
    "override, name",
    [
        ({"num_items": 0}, "num_items"),
        ({"num_users": 0}, "num_users"),
        ({"num_clusters": 2}, "num_clusters"),
        ({"num_clusters": 301}, "num_clusters"),
        ({"min_seq_len": 2}, "min_seq_len"),
        ({"max_seq_len": 3}, "max_seq_len"),
        ({"seed": -1}, "seed"),
        ({"max_samples_per_shard": 0}, "max_samples_per_shard"),
        ({"image_size": 4}, "image_size"),
        ({"num_users": 2.5}, "num_users"),
    ],
)
def test_invalid_arguments_name_the_argument(override: dict[str, Any], name: str, tmp_path: Any) -> None:
    with pytest.raises(ValueError, match=name):
        prepare_synthetic(str(tmp_path), **(SMALL | override))


def test_an_existing_dataset_is_reused_only_with_the_same_settings(small: dict[str, Any]) -> None:
    url = small["url"]
    before = {e.name: e.sha256 for e in read_manifest(url, "users").shards}
    again = prepare_synthetic(url, **SMALL)
    assert again.reused and again.num_interactions == small["summary"].num_interactions
    assert {e.name: e.sha256 for e in read_manifest(url, "users").shards} == before
    with pytest.raises(ValueError, match=r"other settings \(num_items=300 \(asked 301\)\)"):
        prepare_synthetic(url, **{**SMALL, "num_items": 301})


def test_a_damaged_dataset_is_never_reused_but_written_again(tmp_path: Any) -> None:
    url = str(tmp_path / "data")
    first = prepare_synthetic(url, **SMALL)
    shards = read_manifest(url, "users").shards
    victim = os.path.join(url, shards[0].name)
    with open(victim, "r+b") as f:  # truncated, as by a disk that filled up or a copy cut short
        f.truncate(os.path.getsize(victim) // 2)
    again = prepare_synthetic(url, **SMALL)
    assert not again.reused and again.num_interactions == first.num_interactions
    # written again: every shard matches its manifest, and the same settings give the same bytes
    assert {e.name: e.sha256 for e in read_manifest(url, "users").shards} == {
        e.name: e.sha256 for e in shards
    }
    for entry in read_manifest(url, "users").shards + read_manifest(url, "items").shards:
        verify_shard(url, entry)
    assert prepare_synthetic(url, **SMALL).reused


@pytest.mark.parametrize("lost", ["users", "items"])
def test_a_data_set_whose_manifest_is_missing_is_written_again(tmp_path: Any, lost: str) -> None:
    """An interrupted or damaged copy without a manifest used to be "reused" and then failed with "no
    shard manifest": rerunning the same command could never repair it."""
    url = str(tmp_path / "data")
    first = prepare_synthetic(url, **SMALL)
    before = {e.name: e.sha256 for e in read_manifest(url, lost).shards}
    os.remove(os.path.join(url, f"{lost}.manifest.json"))
    again = prepare_synthetic(url, **SMALL)
    assert not again.reused and again.num_interactions == first.num_interactions
    assert {e.name: e.sha256 for e in read_manifest(url, lost).shards} == before
    assert prepare_synthetic(url, **SMALL).reused
