"""The storage seam on the local disk and on a real S3-compatible server (moto, see tests/conftest.py):
round trips, listings, all-or-nothing writes, and errors that name the URL but never the credentials.

    .venv/bin/python -m pytest -q tests/integration/test_storage.py
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time

import pytest

from data_pipeline import storage as storage_module
from data_pipeline.storage import (
    StorageError,
    StorageNotFoundError,
    StorageOptions,
    atomic_write,
    exists,
    filesystem,
    is_remote,
    join,
    list_dir,
    makedirs,
    open_read,
    read_ranges,
    read_strided,
    remove,
)

MiB = 2**20


class Boom(Exception):
    """Raised inside write blocks; a type of its own so no storage error can be mistaken for it."""


def _read(url: str, options: StorageOptions | None = None) -> bytes:
    with open_read(url, options) as f:
        return f.read()


# --- pure helpers -----------------------------------------------------------------------------------


def test_is_remote() -> None:
    assert is_remote("s3://bucket/key")
    assert not is_remote("/tmp/x")
    assert not is_remote("relative/x")
    assert not is_remote("file:///tmp/x")


def test_join_is_a_string_join_for_urls_and_paths() -> None:
    assert join("s3://bucket", "runs", "a.tar") == "s3://bucket/runs/a.tar"
    assert join("s3://bucket/runs/", "/a.tar") == "s3://bucket/runs/a.tar"
    assert join("/data", "x", "", "y/") == "/data/x/y"
    assert join("file:///data", "x") == "file:///data/x"
    assert join("s3://bucket") == "s3://bucket"


def test_storage_options_repr_hides_the_secret() -> None:
    options = StorageOptions(
        endpoint_url="http://h:9000", key="AKIDEXAMPLE", secret="wJalrXUtnFEMI", token="tok3n"
    )
    text = repr(options)
    assert "wJalrXUtnFEMI" not in text and "tok3n" not in text
    assert "secret=***" in text and "token=***" in text
    assert "http://h:9000" in text
    assert "secret=None" in repr(StorageOptions())


def test_storage_options_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", "http://fsspec:2")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    options = StorageOptions.from_env()
    # the fsspec-specific variable wins over the generic one
    assert (options.endpoint_url, options.key, options.secret, options.region) == (
        "http://fsspec:2",
        "k",
        "s",
        "eu-west-1",
    )
    monkeypatch.delenv("FSSPEC_S3_ENDPOINT_URL")
    assert StorageOptions.from_env().endpoint_url == "http://generic:1"


def test_unsupported_protocol_is_an_error_naming_the_url() -> None:
    with pytest.raises(StorageError, match="gs://bucket/x"):
        filesystem("gs://bucket/x")


# --- local disk -------------------------------------------------------------------------------------


def test_local_atomic_write_commits_and_leaves_no_temp_file(tmp_path) -> None:
    url = join(str(tmp_path), "new", "shard.tar")  # the parent folder does not exist yet
    with atomic_write(url) as f:
        f.write(b"a" * 1000)
        assert not os.path.exists(url), "visible before the block ended"
    assert _read(url) == b"a" * 1000
    assert os.listdir(tmp_path / "new") == ["shard.tar"]


def test_local_atomic_write_exception_commits_nothing(tmp_path) -> None:
    fresh = join(str(tmp_path), "fresh.bin")
    with pytest.raises(Boom), atomic_write(fresh) as f:
        f.write(b"partial")
        raise Boom
    assert not os.path.exists(fresh)
    assert os.listdir(tmp_path) == [], "temporary file left behind"

    old = join(str(tmp_path), "old.bin")
    with atomic_write(old) as f:
        f.write(b"old content")
    with pytest.raises(Boom), atomic_write(old) as f:
        f.write(b"new content that must not land")
        raise Boom
    assert _read(old) == b"old content"
    assert os.listdir(tmp_path) == ["old.bin"]


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_local_join_list_exists_remove(tmp_path, scheme: str) -> None:
    root = scheme + str(tmp_path)
    makedirs(join(root, "sub", "deeper"))
    for name in ("b.txt", "a.txt"):
        with atomic_write(join(root, name)) as f:
            f.write(name.encode())
    assert list_dir(root) == [join(root, "a.txt"), join(root, "b.txt"), join(root, "sub")]
    assert exists(join(root, "a.txt")) and exists(join(root, "sub"))
    assert not exists(join(root, "missing"))
    assert _read(join(root, "b.txt")) == b"b.txt"

    remove(join(root, "a.txt"))
    assert not exists(join(root, "a.txt"))
    with pytest.raises(StorageError):
        remove(join(root, "sub"))  # a folder needs recursive=True
    remove(join(root, "sub"), recursive=True)
    assert list_dir(root) == [join(root, "b.txt")]
    with pytest.raises(StorageNotFoundError, match="a.txt"):
        remove(join(root, "a.txt"))


def test_local_missing_paths_raise_not_found_naming_the_url(tmp_path) -> None:
    missing = join(str(tmp_path), "nope.bin")
    with pytest.raises(StorageNotFoundError, match="nope.bin") as info:
        open_read(missing)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, OSError)
    with pytest.raises(StorageNotFoundError, match="nope.bin"):
        list_dir(missing)


# --- S3 (moto server) -------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "s3"])
def test_strided_reads_are_the_ranges_joined(tmp_path, s3_server, monkeypatch, where: str) -> None:
    # the column-block read of a row-major table: the same bytes as one range per record, across the
    # local reader's map windows (3 records each here) and unaligned starts; past the end is an error
    monkeypatch.setattr(storage_module, "STRIDED_RECORDS_PER_MAP", 3)
    payload = os.urandom(10_000)
    if where == "local":
        url, options = str(tmp_path / "table.bin"), None
    else:
        url, options = join(s3_server.make_bucket(), "table.bin"), s3_server.options
    with atomic_write(url, options) as f:
        f.write(payload)
    for start, count, stride, length in [(0, 1, 8, 8), (5, 10, 96, 40), (4093, 11, 500, 123), (0, 0, 8, 8)]:
        ranges = [(start + i * stride, start + i * stride + length) for i in range(count)]
        expected = b"".join(read_ranges(url, ranges, options))
        assert read_strided(url, start, count, stride, length, options) == expected
        assert expected == b"".join(payload[a:b] for a, b in ranges)
    past_end = (
        "table.bin ends before byte 10004" if where == "local" else "table.bin: .*range is not satisfiable"
    )
    with pytest.raises(StorageError, match=past_end):
        read_strided(url, 9_000, 3, 500, 4, options)
    with pytest.raises(ValueError, match="invalid strided read"):
        read_strided(url, 0, 2, 4, 8, options)  # records may not overlap


def test_s3_round_trip_list_exists_remove(s3_server) -> None:
    options = s3_server.options
    bucket = s3_server.make_bucket()
    payload = os.urandom(3 * MiB + 17)
    big = join(bucket, "shards", "shard-000000.tar")
    with atomic_write(big, options) as f:
        for start in range(0, len(payload), MiB):
            f.write(payload[start : start + MiB])
    with atomic_write(join(bucket, "shards", "index.json"), options) as f:
        f.write(b"{}")
    with atomic_write(join(bucket, "top.txt"), options) as f:
        f.write(b"top")

    assert _read(big, options) == payload
    with open_read(big, options) as f:  # ranged reads, as tar readers and torch.load do
        f.seek(MiB)
        assert f.read(10) == payload[MiB : MiB + 10]
        assert f.tell() == MiB + 10

    assert list_dir(bucket, options) == [join(bucket, "shards"), join(bucket, "top.txt")]
    assert list_dir(join(bucket, "shards"), options) == [
        join(bucket, "shards", "index.json"),
        join(bucket, "shards", "shard-000000.tar"),
    ]
    assert exists(big, options) and exists(join(bucket, "shards"), options)
    assert not exists(join(bucket, "shards", "missing"), options)

    remove(big, options)
    assert not exists(big, options)
    with pytest.raises(StorageNotFoundError, match="shard-000000.tar"):
        remove(big, options)
    remove(join(bucket, "shards"), options, recursive=True)
    assert list_dir(bucket, options) == [join(bucket, "top.txt")]
    makedirs(join(bucket, "nothing-to-do"), options)  # S3 has no folders: accepted, creates nothing
    assert list_dir(bucket, options) == [join(bucket, "top.txt")]


def test_s3_atomic_write_exception_commits_nothing(s3_server) -> None:
    options = s3_server.options
    bucket = s3_server.make_bucket()
    fresh, old = join(bucket, "fresh.bin"), join(bucket, "old.bin")
    with pytest.raises(Boom), atomic_write(fresh, options) as f:
        f.write(b"partial")
        raise Boom
    assert not exists(fresh, options)

    with atomic_write(old, options) as f:
        f.write(b"old content")
    with pytest.raises(Boom), atomic_write(old, options) as f:
        f.write(b"new content that must not land")
        raise Boom
    assert _read(old, options) == b"old content"
    assert list_dir(bucket, options) == [old]


def test_s3_atomic_write_exception_aborts_a_multipart_upload(s3_server) -> None:
    # 5 MiB parts (the S3 minimum), 12 MiB written: two parts are already uploaded when the block fails
    options = dataclasses.replace(s3_server.options, block_size=5 * MiB)
    bucket = s3_server.make_bucket()
    name = bucket.removeprefix("s3://")
    fs, _ = filesystem(bucket, options)
    url = join(bucket, "checkpoint.bin")
    with atomic_write(url, options) as f:
        f.write(b"old" * MiB)

    with pytest.raises(Boom), atomic_write(url, options) as f:
        f.write(os.urandom(12 * MiB))
        uploads = fs.call_s3("list_multipart_uploads", Bucket=name).get("Uploads", [])
        assert [u["Key"] for u in uploads] == ["checkpoint.bin"], "no multipart upload in flight"
        raise Boom

    assert fs.call_s3("list_multipart_uploads", Bucket=name).get("Uploads", []) == []
    assert _read(url, options) == b"old" * MiB


def test_s3_missing_key_raises_not_found_naming_the_url(s3_server) -> None:
    bucket = s3_server.make_bucket()
    url = join(bucket, "no", "such.key")
    with pytest.raises(StorageNotFoundError, match="s3://.*/no/such.key") as info:
        open_read(url, s3_server.options)
    assert isinstance(info.value, FileNotFoundError)


def test_s3_server_down_fails_fast_naming_the_endpoint_not_the_secret(s3_server) -> None:
    secret, key = "very-secret-value-42", "AKIDTESTKEY"
    # moto accepts any credentials; distinctive ones let us check they never reach the message
    options = dataclasses.replace(s3_server.options, key=key, secret=secret)
    bucket = s3_server.make_bucket()
    url = join(bucket, "x.bin")
    with atomic_write(url, options) as f:
        f.write(b"x" * 1000)
    stream = open_read(url, options)  # opened while up; its bytes are fetched only on read

    s3_server.stop()
    try:
        start = time.monotonic()
        with pytest.raises(StorageError) as info:
            open_read(url, options)
        elapsed = time.monotonic() - start
        message = str(info.value)
        assert elapsed < 30, f"a dead endpoint took {elapsed:.1f} s to fail"
        assert f"cannot reach object storage at {s3_server.endpoint_url}" in message
        assert url in message
        assert secret not in message and key not in message

        with pytest.raises(StorageError, match="cannot reach object storage") as info:
            stream.read()
        assert url in str(info.value) and secret not in str(info.value)
        stream.close()
    finally:
        s3_server.start()

    # the restarted server is empty (moto keeps state in memory): the old bucket is gone, new ones work
    with pytest.raises(StorageNotFoundError):
        open_read(url, options)
    bucket = s3_server.make_bucket()
    with atomic_write(join(bucket, "after.bin"), options) as f:
        f.write(b"back")
    assert _read(join(bucket, "after.bin"), options) == b"back"


def test_one_s3_filesystem_per_options_and_process(s3_server) -> None:
    # a new S3FileSystem costs a botocore session (0.2-0.9 s here): every call must reuse the cached one
    first, _ = filesystem("s3://bucket/a", s3_server.options)
    second, _ = filesystem("s3://bucket/b/c", s3_server.options)
    assert first is second
    other, _ = filesystem("s3://bucket/a", dataclasses.replace(s3_server.options, max_attempts=1))
    assert other is not first


def _read_in_child(url: str, options: StorageOptions) -> None:
    os._exit(0 if _read(url, options) == b"f" * 100 else 3)


def test_a_forked_child_reads_s3_after_its_parent_did(s3_server) -> None:
    """DataLoader workers are forked from a process that has already used the storage layer: the child
    must get its own call threads, not wait on the parent's (which fork does not copy) until the deadline."""
    options = dataclasses.replace(s3_server.options, deadline=30.0)
    url = join(s3_server.make_bucket(), "f.bin")
    with atomic_write(url, options) as f:
        f.write(b"f" * 100)
    assert _read(url, options) == b"f" * 100  # the parent's pool exists now
    child = multiprocessing.get_context("fork").Process(target=_read_in_child, args=(url, options))
    start = time.monotonic()
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0 and time.monotonic() - start < 20


def test_a_hung_s3_server_fails_every_call_within_the_deadline(s3_server) -> None:
    """A server that accepts connections and never answers (SIGSTOP), not one that is down: every kind
    of call gives up after ``deadline`` seconds with an error naming the URL and the endpoint."""
    options = dataclasses.replace(s3_server.options, deadline=3.0)
    bucket = s3_server.make_bucket()
    url = join(bucket, "kept.bin")
    with atomic_write(url, options) as f:
        f.write(b"k" * 1000)
    doomed = join(bucket, "doomed.bin")  # the remove below may still reach the server once it wakes
    with atomic_write(doomed, options) as f:
        f.write(b"d")
    big = join(bucket, "big.bin")
    s3_server.pause()
    try:
        for name, call in [
            ("check", lambda: exists(url, options)),
            ("list", lambda: list_dir(bucket, options)),
            ("open", lambda: open_read(url, options)),
            ("remove", lambda: remove(doomed, options)),
            ("write", lambda: _write_big(big, options)),
        ]:
            start = time.monotonic()
            with pytest.raises(StorageError) as info:
                call()
            elapsed = time.monotonic() - start
            message = str(info.value)
            assert elapsed < 12, f"{name}: a hung endpoint took {elapsed:.1f} s to fail"
            assert f"object storage at {s3_server.endpoint_url} did not answer within 3 s" in message, name
    finally:
        s3_server.unpause()
    # back: the kept object is intact; the big write either never happened or happened whole (a request
    # that timed out on our side may still complete on the server's, like the remove), never in part
    assert _read(url, options) == b"k" * 1000
    time.sleep(1.0)
    if exists(big, options):
        assert _read(big, options) == b"b" * (12 * 2**20)


def _write_big(url: str, options: StorageOptions) -> None:
    with atomic_write(url, options) as f:  # 12 MiB: several multipart parts at 5 MiB
        for _ in range(12):
            f.write(b"b" * 2**20)
