"""The WebDataset shard writer and its manifest, on the local disk and on a real S3 server (moto):
counts, hashes, webdataset compatibility, all-or-nothing sets, and errors that name the URL.

    .venv/bin/python -m pytest -q tests/integration/test_shards.py
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import webdataset as wds

from data_pipeline.shards import (
    CorruptShardError,
    ManifestError,
    ShardWriter,
    read_manifest,
    verify_shard,
)
from data_pipeline.storage import StorageNotFoundError, atomic_write, join, list_dir, open_read
from data_pipeline.stream import iter_shard


class Boom(Exception):
    """Raised inside the writer's block; a type of its own so no library error is mistaken for it."""


def _samples(n: int) -> list[tuple[str, dict[str, bytes]]]:
    rng = np.random.default_rng(0)
    return [
        (
            f"u{i:05d}",
            {
                "seq.npy": rng.integers(1, 100, size=int(rng.integers(1, 12))).astype("<i8").tobytes(),
                "json": json.dumps({"user": i}).encode(),
            },
        )
        for i in range(n)
    ]


def _write(base: str, samples: list[tuple[str, dict[str, bytes]]], options=None) -> None:
    with ShardWriter(base, "train", 10, options=options, meta={"split": "train", "users": len(samples)}) as w:
        for key, fields in samples:
            w.write(key, fields)


def _read(url: str, options=None) -> bytes:
    with open_read(url, options) as f:
        return f.read()


def test_writes_shards_and_a_manifest_with_counts_and_hashes(tmp_path) -> None:
    base = str(tmp_path)
    _write(base, _samples(57))
    names = sorted(os.listdir(base))
    assert names == [f"train-{i:06d}.tar" for i in range(6)] + ["train.manifest.json"]
    manifest = read_manifest(base, "train")
    assert [s.name for s in manifest.shards] == names[:6]
    assert [s.samples for s in manifest.shards] == [10, 10, 10, 10, 10, 7]
    assert manifest.total_samples == 57 and manifest.prefix == "train"
    assert manifest.meta == {"split": "train", "users": 57}
    for entry in manifest.shards:
        data = (tmp_path / entry.name).read_bytes()
        assert entry.bytes == len(data)
        assert entry.sha256 == hashlib.sha256(data).hexdigest()
        verify_shard(base, entry)


def test_shards_are_deterministic(tmp_path) -> None:
    _write(str(tmp_path / "a"), _samples(23))
    _write(str(tmp_path / "b"), _samples(23))
    a, b = read_manifest(str(tmp_path / "a"), "train"), read_manifest(str(tmp_path / "b"), "train")
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def test_webdataset_reads_the_shards(tmp_path) -> None:
    base = str(tmp_path)
    samples = _samples(57)
    _write(base, samples)
    manifest = read_manifest(base, "train")
    urls = [join(base, s.name) for s in manifest.shards]
    got = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in got] == [k for k, _ in samples]
    for (key, fields), sample in zip(samples, got):
        assert {ext: sample[ext] for ext in fields} == fields, key


def test_an_exception_leaves_no_manifest_and_no_half_shard(tmp_path) -> None:
    base = str(tmp_path)
    with pytest.raises(Boom):
        with ShardWriter(base, "train", 10) as w:
            for key, fields in _samples(25):
                w.write(key, fields)
            raise Boom
    # the two full shards were committed; the third (5 samples) never appears, nor any temp file
    assert sorted(os.listdir(base)) == ["train-000000.tar", "train-000001.tar"]
    with pytest.raises(StorageNotFoundError, match="train.manifest.json"):
        read_manifest(base, "train")


@pytest.mark.parametrize("key", ["", "a.b", "a/b"])
def test_invalid_key_is_named(tmp_path, key: str) -> None:
    with ShardWriter(str(tmp_path), "train", 10) as w:
        with pytest.raises(ValueError, match=f"invalid sample key '{key}'"):
            w.write(key, {"json": b"{}"})


def test_duplicate_key_is_named(tmp_path) -> None:
    with ShardWriter(str(tmp_path), "train", 10) as w:
        w.write("a", {"json": b"{}"})
        with pytest.raises(ValueError, match="duplicate sample key 'a'"):
            w.write("a", {"json": b"{}"})


def test_write_many_writes_the_bytes_write_does(tmp_path) -> None:
    # the batch path (scale generators) must give the same shards, checks and errors as write()
    samples = [(f"{i:09d}", json.dumps({"i": i, "pad": "x" * (i % 700)}).encode()) for i in range(57)]
    with ShardWriter(str(tmp_path / "one"), "t", 10) as w:
        for key, value in samples:
            w.write(key, {"json": value})
    with ShardWriter(str(tmp_path / "many"), "t", 10) as w:
        w.write_many("json", iter(samples[:23]))
        w.write_many("json", ((k, bytearray(v)) for k, v in samples[23:]))
    one, many = read_manifest(str(tmp_path / "one"), "t"), read_manifest(str(tmp_path / "many"), "t")
    assert [s.samples for s in many.shards] == [10, 10, 10, 10, 10, 7]
    assert [s.sha256 for s in many.shards] == [s.sha256 for s in one.shards]
    with ShardWriter(str(tmp_path / "bad"), "t", 10) as w:
        with pytest.raises(ValueError, match="duplicate sample key '000000001'"):
            w.write_many("json", [("000000001", b"{}"), ("000000001", b"{}")])
        with pytest.raises(ValueError, match="invalid sample key 'a.b'"):
            w.write_many("json", [("a.b", b"{}")])
        with pytest.raises(TypeError, match="sample '000000002': field 'json' must be bytes, got str"):
            w.write_many("json", [("000000002", "{}")])
        with pytest.raises(ValueError, match="invalid extension 'a/b'"):
            w.write_many("a/b", [("000000003", b"{}")])


def test_read_manifest_errors_name_the_url(tmp_path) -> None:
    base = str(tmp_path)
    url = join(base, "train.manifest.json")
    with pytest.raises(StorageNotFoundError, match=url):
        read_manifest(base, "train")
    with atomic_write(url) as f:
        f.write(b"{not json")
    with pytest.raises(ManifestError, match=url):
        read_manifest(base, "train")
    with atomic_write(url) as f:
        f.write(json.dumps({"version": 1, "prefix": "train", "total_samples": 0}).encode())
    with pytest.raises(ManifestError, match=f"{url}.*shards"):
        read_manifest(base, "train")


def test_verify_shard_detects_truncation_and_a_flipped_byte(tmp_path) -> None:
    base = str(tmp_path)
    _write(base, _samples(30))
    first, second = read_manifest(base, "train").shards[:2]
    path = tmp_path / first.name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptShardError, match=f"{first.name}.*truncated"):
        verify_shard(base, first)
    path = tmp_path / second.name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=f"{second.name}.*corrupt"):
        verify_shard(base, second)


def test_round_trip_on_s3(s3_server) -> None:
    base = join(s3_server.make_bucket(), "data")
    options = s3_server.options
    samples = _samples(57)
    _write(base, samples, options)
    manifest = read_manifest(base, "train", options)
    assert manifest.total_samples == 57
    assert list_dir(base, options) == sorted(
        [join(base, s.name) for s in manifest.shards] + [join(base, "train.manifest.json")]
    )
    got = []
    for entry in manifest.shards:
        data = _read(join(base, entry.name), options)
        assert hashlib.sha256(data).hexdigest() == entry.sha256 and len(data) == entry.bytes
        verify_shard(base, entry, options)
        got += list(iter_shard(join(base, entry.name), entry, options))
    assert [(s["__key__"], s["seq.npy"], s["json"]) for s in got] == [
        (k, f["seq.npy"], f["json"]) for k, f in samples
    ]


def test_shards_are_byte_for_byte_what_tarfile_writes(tmp_path) -> None:
    # the writer builds tar headers itself (fast path) and through tarfile for long or non-ASCII names
    import io
    import tarfile

    samples = [
        ("000000001", {"json": b'{"a": 1}', "png": bytes(range(256)) * 3}),
        ("k" * 120, {"json": b"x" * 512}),  # a name over 100 characters: a PAX header
        ("caf\u00e9", {"txt": b""}),
    ]
    with ShardWriter(str(tmp_path), "t", 10) as writer:
        for key, fields in samples:
            writer.write(key, fields)
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, fields in samples:
            for ext in sorted(fields):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                    len(fields[ext]),
                    0,
                    0o444,
                    0,
                    0,
                    "",
                    "",
                )
                tar.addfile(info, io.BytesIO(fields[ext]))
    assert (tmp_path / "t-000000.tar").read_bytes() == expected.getvalue()
