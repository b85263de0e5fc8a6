"""Feature extraction with the real frozen encoders: table layout, agreement with a direct transformers
computation, the cluster signal, restart without recomputation, data parallel ranks, image fallbacks,
checked loading and S3.

    .venv/bin/python -m pytest -q tests/integration/test_features.py
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import pytest
import torch
from PIL import Image

from data_pipeline.features import (
    FeaturesError,
    ImageEncoder,
    TextEncoder,
    default_text_model_path,
    extract_features,
    load_feature_tables,
    merge_features,
)
from data_pipeline.shards import ShardWriter, read_manifest
from data_pipeline.storage import join
from data_pipeline.stream import iter_shard
from data_pipeline.synthetic_shards import prepare_synthetic

SMALL: dict[str, Any] = dict(
    num_items=40,
    num_users=30,
    num_clusters=4,
    min_seq_len=3,
    max_seq_len=6,
    seed=0,
    max_samples_per_shard=16,  # several shards
    image_size=32,
    progress=False,
)


def _items(url: str) -> dict[int, dict[str, Any]]:
    manifest = read_manifest(url, "items")
    records = [json.loads(s["json"]) for e in manifest.shards for s in iter_shard(join(url, e.name), e)]
    return {r["item_id"]: r for r in records}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("synthetic"))
    prepare_synthetic(url, **SMALL)
    return url


@pytest.fixture(scope="module")
def chunked(dataset: str) -> dict[str, Any]:
    """One extraction in chunks of 8 (5 chunks), reused by the tests below."""
    summary = extract_features(dataset, chunk_size=8, progress=False)
    text, image, info = load_feature_tables(summary.out_url)
    return {"summary": summary, "text": text, "image": image, "info": info}


def test_tables_layout_and_counts(dataset: str, chunked: dict[str, Any]) -> None:
    text, image, info = chunked["text"], chunked["image"], chunked["info"]
    assert chunked["summary"].out_url == join(dataset, "features")
    assert text.shape == (41, 384) and image.shape == (41, 1280)
    assert text.dtype == image.dtype == torch.float32
    for table in (text, image):
        assert torch.equal(table[0], torch.zeros(table.shape[1]))  # padding row
        assert torch.allclose(table[1:].norm(dim=1), torch.ones(40), atol=1e-5)
    assert info["num_items"] == 40 and info["text_dim"] == 384 and info["image_dim"] == 1280
    assert info["image_fallbacks"] == 0 and chunked["summary"].chunks_computed == 5


def test_text_rows_match_direct_transformers(dataset: str, chunked: dict[str, Any]) -> None:
    from transformers import AutoModel, AutoTokenizer

    items = _items(dataset)
    path = default_text_model_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    ids = [3, 29]
    batch = tok(
        [items[i]["text"] for i in ids], padding=True, truncation=True, max_length=256, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert torch.allclose(chunked["text"][ids], expected, atol=1e-5)


def test_same_cluster_items_are_closer(dataset: str, chunked: dict[str, Any]) -> None:
    items = _items(dataset)
    cluster = torch.tensor([items[i]["cluster"] for i in range(1, 41)])
    same = (cluster[:, None] == cluster[None, :]) & ~torch.eye(40, dtype=torch.bool)
    cross = cluster[:, None] != cluster[None, :]
    for name in ("text", "image"):
        t = chunked[name][1:]
        sim = t @ t.T  # (N, N) cosine similarities (rows are unit vectors)
        assert sim[same].mean() > sim[cross].mean() + 0.03, name


def test_restart_recomputes_only_missing_chunk(
    dataset: str, chunked: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = chunked["summary"].out_url
    encoded: dict[str, int] = {"text": 0, "image": 0}
    text_encode, image_encode = TextEncoder.encode, ImageEncoder.encode

    def count_text(self: TextEncoder, texts: list[str]) -> torch.Tensor:
        encoded["text"] += len(texts)
        return text_encode(self, texts)

    def count_image(self: ImageEncoder, images: torch.Tensor) -> torch.Tensor:
        encoded["image"] += images.shape[0]
        return image_encode(self, images)

    monkeypatch.setattr(TextEncoder, "encode", count_text)
    monkeypatch.setattr(ImageEncoder, "encode", count_image)
    # a crash after chunk 3's text part but before the merge: tables and one part are gone
    for name in ("text_features.safetensors", "image_features.safetensors", "features.json"):
        os.remove(join(out, name))
    os.remove(join(out, "parts", "text-000003.safetensors"))
    untouched = join(out, "parts", "text-000002.safetensors")
    mtime = os.stat(untouched).st_mtime_ns

    summary = extract_features(dataset, chunk_size=8, progress=False)
    assert (summary.chunks_computed, summary.chunks_skipped) == (1, 4)
    assert encoded == {"text": 8, "image": 0}  # only chunk 3's text, and no image was re-encoded
    assert os.stat(untouched).st_mtime_ns == mtime
    text, image, _ = load_feature_tables(out)
    assert torch.equal(text, chunked["text"]) and torch.equal(image, chunked["image"])


def test_data_parallel_ranks_equal_single_rank(dataset: str, chunked: dict[str, Any], tmp_path: Any) -> None:
    out = str(tmp_path / "features")
    rank0 = extract_features(dataset, out, chunk_size=8, rank=0, world_size=2, progress=False)
    assert not rank0.merged and rank0.chunks_computed == 3  # chunks 0, 2, 4
    with pytest.raises(FeaturesError, match="missing"):
        merge_features(out)  # rank 1 has not run yet
    rank1 = extract_features(dataset, out, chunk_size=8, rank=1, world_size=2, progress=False)
    assert rank1.chunks_computed == 2
    merge_features(out)
    text, image, info = load_feature_tables(out)
    assert torch.allclose(text, chunked["text"], atol=1e-6)
    assert torch.allclose(image, chunked["image"], atol=1e-6)
    assert info["image_fallbacks"] == 0


def test_changed_configuration_is_refused(dataset: str, chunked: dict[str, Any]) -> None:
    with pytest.raises(FeaturesError, match="chunk_size"):
        extract_features(dataset, chunk_size=16, progress=False)


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_missing_and_broken_images_fall_back_to_zeros(tmp_path: Any) -> None:
    url = str(tmp_path / "data")
    images = {1: _png((255, 0, 0)), 2: None, 3: b"not an image", 4: _png((0, 0, 255)), 5: None}
    with ShardWriter(url, "items", 3) as w:
        for item_id, image in images.items():
            fields = {"json": json.dumps({"item_id": item_id, "text": f"item number {item_id}"}).encode()}
            if image is not None:
                fields["png"] = image
            w.write(f"{item_id:09d}", fields)
    summary = extract_features(url, chunk_size=2, progress=False)
    assert summary.image_fallbacks == 3
    text, image, info = load_feature_tables(summary.out_url)
    assert info["image_fallbacks"] == 3
    assert image.shape == (6, 1280)
    for item_id in (0, 2, 3, 5):
        assert torch.equal(image[item_id], torch.zeros(1280))
    assert torch.allclose(image[[1, 4]].norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(text[1:].norm(dim=1), torch.ones(5), atol=1e-5)  # text is unaffected


def test_text_only(tmp_path: Any, dataset: str, chunked: dict[str, Any]) -> None:
    out = str(tmp_path / "text-only")
    extract_features(dataset, out, image_model="none", progress=False)
    text, image, info = load_feature_tables(out)
    assert image is None and "image_sha256" not in info
    assert torch.allclose(text, chunked["text"], atol=1e-6)


def test_corrupt_table_is_named(tmp_path: Any, chunked: dict[str, Any]) -> None:
    out = str(tmp_path / "copy")
    src = chunked["summary"].out_url
    os.makedirs(out)
    for name in ("text_features.safetensors", "image_features.safetensors", "features.json"):
        with open(join(src, name), "rb") as f, open(join(out, name), "wb") as g:
            g.write(f.read())
    target = join(out, "image_features.safetensors")
    with open(target, "r+b") as f:
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(FeaturesError, match="image_features.safetensors"):
        load_feature_tables(out)


def test_s3_round_trip(s3_server: Any, chunked: dict[str, Any]) -> None:
    bucket = s3_server.make_bucket()
    url = f"{bucket}/synthetic"
    prepare_synthetic(url, **SMALL, options=s3_server.options)
    summary = extract_features(url, chunk_size=16, options=s3_server.options, progress=False)
    assert summary.out_url == f"{url}/features" and summary.merged
    text, image, info = load_feature_tables(summary.out_url, s3_server.options)
    # the same items give the same features, whatever the store and the chunking
    assert torch.allclose(text, chunked["text"], atol=1e-6)
    assert torch.allclose(image, chunked["image"], atol=1e-6)
    assert info["num_items"] == 40


def test_image_size_is_recorded_and_changes_the_image_features(
    dataset: str, chunked: dict[str, Any], tmp_path: Any
) -> None:
    assert chunked["info"]["image_size"] == 224  # the default: EfficientNet-Lite0's training resolution
    small = extract_features(dataset, str(tmp_path / "small"), image_size=64, chunk_size=64, progress=False)
    text, image, info = load_feature_tables(small.out_url)
    assert info["image_size"] == 64
    assert torch.allclose(text, chunked["text"], atol=1e-5)  # the text side does not depend on it
    assert image.shape == chunked["image"].shape and not torch.allclose(image, chunked["image"], atol=1e-3)
    # a part made at one size is never mixed with parts of another
    with pytest.raises(FeaturesError, match="image_size"):
        extract_features(dataset, str(tmp_path / "small"), image_size=96, chunk_size=64, progress=False)
    with pytest.raises(ValueError, match="image_size must be in"):
        extract_features(dataset, str(tmp_path / "tiny"), image_size=8, progress=False)
