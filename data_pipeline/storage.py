"""The one storage seam: every file the trainer reads or writes goes through here, local or S3.

Locations are URL strings, never ``pathlib.Path``, because anything may be remote: a plain path or
``file:///...`` is the local disk, ``s3://bucket/key`` is any S3-compatible object store (AWS, MinIO,
Ceph, moto). The endpoint and credentials come from a :class:`StorageOptions`, by default read from
the environment::

    FSSPEC_S3_ENDPOINT_URL=http://minio:9000 AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \\
        .venv/bin/fmrl train --config configs/demo.yaml

Writes are all-or-nothing (:func:`atomic_write`), so a reader never sees half a shard or half a
checkpoint file. Every failure is a :class:`StorageError` (an ``OSError``) whose message names the URL
and, for object storage, the endpoint; credentials never appear in messages.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import mmap
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

_T = TypeVar("_T")
_FS = TypeVar("_FS", bound=fsspec.AbstractFileSystem)

__all__ = [
    "StorageError",
    "StorageNotFoundError",
    "StorageOptions",
    "StorageTimeoutError",
    "atomic_write",
    "bound_s3_retries",
    "exists",
    "filesystem",
    "is_remote",
    "join",
    "list_dir",
    "makedirs",
    "open_read",
    "read_ranges",
    "read_strided",
    "remove",
    "s3_filesystem_kwargs",
]


class StorageError(OSError):
    """A storage operation failed; the message names the URL (and the endpoint for object storage)."""


class StorageTimeoutError(StorageError, TimeoutError):
    """Object storage did not answer a call within ``StorageOptions.deadline`` (a hung server): unlike a
    refusal, it may answer again later, so a checkpoint save gives up on this save only."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The URL does not exist. Also a ``FileNotFoundError``, so "nothing saved yet" is easy to tell
    apart from "storage is down"."""


@dataclass(frozen=True, repr=False)
class StorageOptions:
    """Where object storage is and how to log in to it. Hashable: file systems are cached per options.

    ``None`` fields fall back to botocore's own chain (environment, config files, instance role).
    The retry and timeout fields bound how long a dead or unreachable endpoint takes to fail: with
    the defaults, a refused connection fails after about 3 s, not the minutes botocore may take.
    """

    endpoint_url: str | None = None
    key: str | None = None
    secret: str | None = None
    region: str | None = None
    token: str | None = None
    """Session token of temporary (STS) credentials."""
    max_attempts: int = 3
    """Attempts per request, first try included (botocore "standard" retry mode)."""
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    block_size: int | None = None
    """Bytes per S3 multipart part and per read-ahead block; None keeps s3fs's 50 MiB. At least 5 MiB."""
    deadline: float = 300.0
    """Most seconds one object-storage call (an open, a read or write call, a listing, an upload's
    completion) may take, retries included, before it fails with a StorageError: an endpoint that
    accepts connections but never answers (a hung server) is not waited for forever.
    Environment: FMRL_STORAGE_DEADLINE."""

    @classmethod
    def from_env(cls) -> StorageOptions:
        """Options from the environment variables that fsspec and botocore also read."""
        env = os.environ.get
        return cls(
            endpoint_url=env("FSSPEC_S3_ENDPOINT_URL")
            or env("AWS_ENDPOINT_URL_S3")
            or env("AWS_ENDPOINT_URL"),
            key=env("AWS_ACCESS_KEY_ID"),
            secret=env("AWS_SECRET_ACCESS_KEY"),
            region=env("AWS_DEFAULT_REGION") or env("AWS_REGION"),
            token=env("AWS_SESSION_TOKEN"),
            deadline=float(env("FMRL_STORAGE_DEADLINE") or cls.deadline),
        )

    def __repr__(self) -> str:
        # reprs end up in logs, configs and tracebacks: show whether a secret is set, never its value
        hidden = {"secret", "token"}
        fields = ", ".join(
            f"{name}={'***' if name in hidden and value is not None else repr(value)}"
            for name, value in self.__dict__.items()
        )
        return f"StorageOptions({fields})"

    def redact(self, text: str) -> str:
        """``text`` with every credential replaced by ``***`` (for messages built from foreign errors)."""
        for value in (self.secret, self.token, self.key):
            if value:
                text = text.replace(value, "***")
        return text


def is_remote(url: str) -> bool:
    """True for object-store URLs (``s3://...``); False for plain paths and ``file://`` URLs."""
    return "://" in url and not url.startswith("file://")


def join(url: str, *parts: str) -> str:
    """Join with ``/`` as plain strings, for local paths and URLs alike.

    Unlike ``os.path.join``, a part starting with ``/`` does not restart from the root:
    ``join("s3://b/runs", "/x")`` is ``"s3://b/runs/x"``. Empty parts are skipped.
    """
    out = url
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out.rstrip('/')}/{part}"
    return out


def filesystem(url: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system for ``url`` and the path to hand to it.

    Local paths and ``file://`` give the local file system and a plain local path; ``s3://bucket/key``
    gives an ``s3fs.S3FileSystem`` and ``"bucket/key"``. ``options`` default to
    :meth:`StorageOptions.from_env`. Instances are cached per (protocol, options, process).
    """
    if not is_remote(url):
        return _local_fs(), _local_path(url)
    protocol, _, path = url.partition("://")
    if protocol != "s3":
        raise StorageError(
            f"unsupported storage protocol {protocol!r} in {url} (supported: local paths, s3://)"
        )
    if not path.split("/", 1)[0]:
        raise StorageError(f"no bucket in {url}")
    # the pid is part of the key: an s3fs instance owns an event loop and HTTP sessions that do not
    # survive fork (data loader workers), so each process builds its own
    return _s3_fs(options or StorageOptions.from_env(), os.getpid()), path


def open_read(url: str, options: StorageOptions | None = None) -> io.RawIOBase | io.BufferedReader:
    """Open ``url`` for reading bytes. Use as a context manager.

    Raises :class:`StorageNotFoundError` if it does not exist and :class:`StorageError` if the store
    cannot be reached; errors during later reads of an S3 object are also :class:`StorageError`.
    """
    if not is_remote(url):
        with translated_errors("open", url, None):
            return open(_local_path(url), "rb")
    options = options or StorageOptions.from_env()
    fs, path = filesystem(url, options)
    with translated_errors("open", url, options):
        # s3fs asks for the object's size and ETag here, so a missing key or a dead endpoint fails now
        f = _bounded("open", url, options, lambda: fs.open(path, "rb"))
    return _S3Stream(f, url, options)


RANGES_PER_REQUEST_BATCH = 1024
"""Byte ranges handed to s3fs's concurrent ``cat_ranges`` at a time (one ranged GET each)."""


def read_ranges(
    url: str, ranges: list[tuple[int, int]], options: StorageOptions | None = None
) -> list[bytes]:
    """The bytes ``[start, end)`` of ``url`` for each range, and nothing else: a local file is read
    unbuffered with one ``pread`` per range (no read-ahead beyond what the operating system does), an
    S3 object with one ranged GET per range (s3fs ``cat_ranges``, concurrently, in batches), never a
    download of the whole object. A range past the end of the file raises StorageError."""
    if not ranges:
        return []
    if any(not 0 <= start <= end for start, end in ranges):
        raise ValueError(
            f"{url}: invalid byte ranges, e.g. {next(r for r in ranges if not 0 <= r[0] <= r[1])}"
        )
    if not is_remote(url):
        out = []
        with translated_errors("read", url, None):
            fd = os.open(_local_path(url), os.O_RDONLY)
            try:
                for start, end in ranges:
                    out.append(os.pread(fd, end - start, start))
            finally:
                os.close(fd)
    else:
        options = options or StorageOptions.from_env()
        fs, path = filesystem(url, options)
        out = []
        with translated_errors("read", url, options):
            for b in range(0, len(ranges), RANGES_PER_REQUEST_BATCH):
                batch = ranges[b : b + RANGES_PER_REQUEST_BATCH]
                out += _bounded(
                    "read",
                    url,
                    options,
                    lambda batch=batch: fs.cat_ranges(
                        [path] * len(batch), [s for s, _ in batch], [e for _, e in batch], on_error="raise"
                    ),
                )
    for (start, end), data in zip(ranges, out):
        if len(data) != end - start:
            raise StorageError(f"{url} ends before byte {end} (asked for bytes {start}:{end})")
    return out


STRIDED_RECORDS_PER_MAP = 65_536
"""Records of a local :func:`read_strided` copied per memory map (bounds the mapped window)."""


def read_strided(
    url: str, start: int, count: int, stride: int, length: int, options: StorageOptions | None = None
) -> bytearray:
    """``count`` records of ``length`` bytes, record ``i`` at byte ``start + i * stride`` of ``url``,
    joined (a column block of a row-major table: its part of every row). The same bytes as
    :func:`read_ranges` over those ranges. A local file is memory-mapped a window of
    :data:`STRIDED_RECORDS_PER_MAP` records at a time and numpy copies the records out (one ``pread``
    per record took 5 minutes for 10M rows; the operating system reads the same pages either way); an
    S3 object gets one ranged GET per record (:func:`read_ranges`). Past the end: StorageError."""
    if count < 0 or length < 0 or start < 0 or (count > 1 and stride < length):
        raise ValueError(
            f"{url}: invalid strided read (start {start}, count {count}, stride {stride}, length {length})"
        )
    if count == 0 or length == 0:
        return bytearray()
    if is_remote(url):
        ranges = [(start + i * stride, start + i * stride + length) for i in range(count)]
        return bytearray().join(read_ranges(url, ranges, options))
    end = start + (count - 1) * stride + length
    out = bytearray(count * length)
    records = np.frombuffer(out, dtype=np.uint8).reshape(count, length)
    with translated_errors("read", url, None):
        with open(_local_path(url), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if end > size:
                raise StorageError(f"{url} ends before byte {end} (asked for bytes {start}:{end})")
            for first in range(0, count, STRIDED_RECORDS_PER_MAP):
                n = min(STRIDED_RECORDS_PER_MAP, count - first)
                offset = start + first * stride
                aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
                span = offset - aligned + (n - 1) * stride + length
                with mmap.mmap(f.fileno(), span, access=mmap.ACCESS_READ, offset=aligned) as window:
                    data = np.frombuffer(window, dtype=np.uint8)
                    rows = np.lib.stride_tricks.as_strided(
                        data[offset - aligned :], shape=(n, length), strides=(stride, 1), writeable=False
                    )
                    records[first : first + n] = rows
                    del data, rows  # the map cannot close while numpy views of it exist
    return out


@contextlib.contextmanager
def atomic_write(
    url: str, options: StorageOptions | None = None
) -> Iterator[io.RawIOBase | io.BufferedWriter]:
    """Write ``url`` all or nothing: readers see the old content or the complete new one, never a part.

    ::

        with atomic_write(join(run_dir, "shard-000000.tar")) as f:
            f.write(payload)

    If the block raises, nothing is committed: the destination keeps its previous content (or stays
    absent) and the exception propagates. Do not close the yielded file yourself.

    Local files: the bytes go to ``.<name>.tmp-<random>`` in the destination folder (same file
    system, so the rename is atomic), which is fsynced and then ``os.replace``d over the destination;
    the folder is fsynced too so the rename survives a crash. Missing parent folders are created, as
    S3 has no folders to create. On an exception the temporary file is deleted.

    S3: a PUT is already atomic per object (a reader sees the whole object or the old one), and S3
    "rename" is a copy plus a delete, so a temporary key would only double the traffic. The bytes
    therefore go to the final key directly: objects below the part size are buffered and sent as one
    PUT when the block ends; larger ones stream as a multipart upload that becomes visible only when
    it is completed. On an exception we never send the PUT or the completion: the file is discarded,
    which aborts the multipart upload and frees its parts (if even the abort fails, the unfinished
    upload stays invisible to readers until a bucket lifecycle rule removes it).
    """
    if not is_remote(url):
        with _atomic_write_local(url) as f:
            yield f
        return
    options = options or StorageOptions.from_env()
    fs, path = filesystem(url, options)
    with translated_errors("write", url, options):
        # autocommit: closing the file completes the upload; we only close it on success
        f = _bounded("write", url, options, lambda: fs.open(path, "wb", autocommit=True))
    stream = _S3Stream(f, url, options)
    try:
        yield stream
    except BaseException:
        stream.close()
        with contextlib.suppress(Exception):
            f.discard()
        # discard() drops the buffer, after which close() would fail; mark it closed so that
        # neither we nor the garbage collector try to commit it
        f.closed = True
        raise
    stream.close()
    with translated_errors("write", url, options):
        try:
            _bounded("write", url, options, f.close)
        except BaseException:
            # the completion failed: free the uploaded parts rather than leave them billed
            with contextlib.suppress(Exception):
                f.discard()
            f.closed = True
            raise


def exists(url: str, options: StorageOptions | None = None) -> bool:
    """Whether ``url`` exists (as a file, a folder or, on S3, a key prefix).

    An unreachable store raises :class:`StorageError` rather than answering False, so "no checkpoint
    yet" is never confused with "storage is down". (Exception: for a bare ``s3://bucket`` s3fs answers
    False when the bucket cannot be probed.)
    """
    if not is_remote(url):
        return os.path.exists(_local_path(url))
    options = options or StorageOptions.from_env()
    fs, path = filesystem(url, options)
    with translated_errors("check", url, options):
        return _bounded("check", url, options, lambda: fs.exists(path))


def list_dir(url: str, options: StorageOptions | None = None) -> list[str]:
    """Full URLs of the direct children of ``url`` (files and folders / key prefixes), sorted."""
    if not is_remote(url):
        with translated_errors("list", url, None):
            names = os.listdir(_local_path(url))
        return sorted(join(url, name) for name in names)
    options = options or StorageOptions.from_env()
    fs, path = filesystem(url, options)
    with translated_errors("list", url, options):
        # s3fs returns "bucket/prefix/name" without the protocol and may include the prefix itself
        entries = _bounded("list", url, options, lambda: fs.ls(path, detail=False))
    base = path.rstrip("/")
    return sorted(f"s3://{entry.rstrip('/')}" for entry in entries if entry.rstrip("/") != base)


def remove(url: str, options: StorageOptions | None = None, *, recursive: bool = False) -> None:
    """Delete the file at ``url``, or with ``recursive=True`` everything under it.

    A missing ``url`` raises :class:`StorageNotFoundError`.
    """
    if not is_remote(url):
        path = _local_path(url)
        with translated_errors("remove", url, None):
            if recursive and os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        return
    options = options or StorageOptions.from_env()
    fs, path = filesystem(url, options)

    def delete() -> None:
        if not fs.exists(path):
            # s3fs deletes a missing key without complaint; be as strict as the local disk
            raise FileNotFoundError(url)
        fs.rm(path, recursive=recursive)

    with translated_errors("remove", url, options):
        _bounded("remove", url, options, delete)


def makedirs(url: str, options: StorageOptions | None = None) -> None:
    """Create the folder ``url`` and its parents if missing. A no-op on S3, which has no folders."""
    if is_remote(url):
        filesystem(url, options)  # still reject unsupported protocols
        return
    with translated_errors("makedirs", url, None):
        os.makedirs(_local_path(url), exist_ok=True)


# --- internals ---------------------------------------------------------------------------------------


def _local_path(url: str) -> str:
    return url.removeprefix("file://")


@functools.cache
def _local_fs() -> LocalFileSystem:
    return LocalFileSystem()


def s3_filesystem_kwargs(options: StorageOptions) -> dict[str, Any]:
    """``s3fs.S3FileSystem`` arguments for ``options`` (also what DCP's fsspec writer/reader take)."""
    client_kwargs: dict[str, Any] = {}
    if options.endpoint_url:
        client_kwargs["endpoint_url"] = options.endpoint_url
    if options.region:
        client_kwargs["region_name"] = options.region
    return {
        "key": options.key,
        "secret": options.secret,
        "token": options.token,
        "client_kwargs": client_kwargs,
        "config_kwargs": {
            "connect_timeout": options.connect_timeout,
            "read_timeout": options.read_timeout,
            # botocore's default (legacy mode, 5 attempts) and s3fs's own retry loop can stretch a dead
            # endpoint into minutes; one bounded, jittered retry policy instead
            "retries": {"max_attempts": options.max_attempts, "mode": "standard"},
        },
        "default_block_size": options.block_size,
        # other processes (ranks, workers) write the same prefixes: a cached listing would go stale
        "use_listings_cache": False,
        # our own cache decides sharing; fsspec's would hand these settings to unrelated callers
        "skip_instance_cache": True,
    }


@functools.lru_cache(maxsize=16)
def _s3_fs(options: StorageOptions, pid: int) -> fsspec.AbstractFileSystem:
    import s3fs  # deferred: botocore takes a while to import and local-only runs never need it

    return bound_s3_retries(s3fs.S3FileSystem(**s3_filesystem_kwargs(options)), options)


def bound_s3_retries(fs: _FS, options: StorageOptions) -> _FS:
    """``fs`` (an s3fs file system, ours or DCP's) with its own retry loop, which s3fs runs on top of
    botocore's for timeouts and dropped connections (5 times by default), cut to ``max_attempts``."""
    fs.retries = options.max_attempts
    return fs


def _connection_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError
    from fsspec.exceptions import FSTimeoutError

    return (BotoConnectionError, HTTPClientError, FSTimeoutError, TimeoutError, ConnectionError)


_CALLS: dict[int, ThreadPoolExecutor] = {}  # process id -> its pool


def _bounded(action: str, url: str, options: StorageOptions, call: Callable[[], _T]) -> _T:
    """``call()`` (an object-storage operation), failing with StorageError after ``options.deadline``
    seconds. It runs on a helper thread; a call that never returns is left there (its connection is
    hung) while the caller goes on with the error. Each process has its own pool: a forked child (a
    DataLoader worker) inherits the parent's pool object but none of its threads."""
    pool = _CALLS.get(os.getpid())
    if pool is None:
        _CALLS.clear()  # a parent's pool, copied by fork: its threads do not exist here
        pool = _CALLS[os.getpid()] = ThreadPoolExecutor(max_workers=32, thread_name_prefix="storage")
    future = pool.submit(call)
    try:
        return future.result(timeout=options.deadline)
    except FutureTimeout:
        endpoint = options.endpoint_url or "the default AWS endpoint"
        raise StorageTimeoutError(
            f"cannot {action} {url}: object storage at {endpoint} did not answer within "
            f"{options.deadline:.0f} s (a hung or overloaded server?)"
        ) from None


@contextlib.contextmanager
def translated_errors(action: str, url: str, options: StorageOptions | None) -> Iterator[None]:
    """Re-raise storage failures as StorageError naming ``url``, with credentials redacted."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as e:
        raise StorageNotFoundError(f"not found: {url}") from e
    except Exception as e:
        if options is None:  # local: OSError messages already name the path
            if isinstance(e, OSError):
                raise StorageError(f"cannot {action} {url}: {e}") from e
            raise
        detail = options.redact(f"{type(e).__name__}: {e}")
        if isinstance(e, _connection_errors()):
            endpoint = options.endpoint_url or "the default AWS endpoint"
            raise StorageError(f"cannot reach object storage at {endpoint} for {url}: {detail}") from e
        if type(e).__name__ == "NoCredentialsError":
            raise StorageError(
                f"cannot {action} {url}: no credentials for object storage; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (docs/storage.md)"
            ) from e
        if isinstance(e, OSError) or type(e).__module__.split(".")[0] in {"botocore", "aiobotocore", "s3fs"}:
            raise StorageError(f"cannot {action} {url}: {detail}") from e
        raise


@contextlib.contextmanager
def _atomic_write_local(url: str) -> Iterator[io.BufferedWriter]:
    path = os.path.abspath(_local_path(url))
    folder, name = os.path.split(path)
    with translated_errors("write", url, None):
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{name}.tmp-{secrets.token_hex(6)}")
        f = open(tmp, "xb")
    try:
        try:
            yield f
        except OSError as e:
            # a write to ``f`` that failed (a full disk, a quota) names no file: name the destination
            if e.filename is None and e.errno in _DISK_FULL and not isinstance(e, StorageError):
                raise StorageError(f"cannot write {url}: {e}") from e
            raise
        with translated_errors("write", url, None):
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(tmp, path)
            _fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(OSError):  # closing flushes the buffer, which fails again on a full disk
            f.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _fsync_dir(folder: str) -> None:
    # the rename lives in the folder's entry table: without this a crash can lose a "committed" file
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _S3Stream(io.RawIOBase):
    """An s3fs file whose failures come out as StorageError naming the URL and endpoint.

    Closing a write stream does not commit: :func:`atomic_write` owns the commit.
    """

    def __init__(self, f: Any, url: str, options: StorageOptions) -> None:
        super().__init__()
        self._f = f
        self._url = url
        self._options = options
        self.name = url

    def _guard(self, action: str) -> contextlib.AbstractContextManager[None]:
        if self.closed:
            raise ValueError(f"I/O operation on closed file {self._url}")
        return translated_errors(action, self._url, self._options)

    def readable(self) -> bool:
        return self._f.readable()

    def writable(self) -> bool:
        return self._f.writable()

    def seekable(self) -> bool:
        return self._f.seekable()

    def read(self, size: int | None = -1) -> bytes:
        with self._guard("read"):
            return _bounded(
                "read", self._url, self._options, lambda: self._f.read(-1 if size is None else size)
            )

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        with self._guard("read"):
            return _bounded("read", self._url, self._options, lambda: self._f.readinto(buffer))

    def write(self, data: Any) -> int:
        with self._guard("write"):
            # a write may upload a multipart part (every block_size bytes)
            return _bounded("write", self._url, self._options, lambda: self._f.write(data))

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        with self._guard("seek"):
            return self._f.seek(offset, whence)

    def tell(self) -> int:
        with self._guard("tell"):
            return self._f.tell()

    def close(self) -> None:
        if not self.closed and self._f.readable():
            self._f.close()
        super().close()
