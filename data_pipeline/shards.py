"""WebDataset shards: write a set of tar shards plus the manifest that says the set is complete.

A shard set under ``base_url`` with prefix ``train`` is::

    train-000000.tar  train-000001.tar  ...  train.manifest.json

Each shard is a plain tar in the WebDataset layout (members ``<key>.<ext>``, a sample's members
adjacent), so ``webdataset.WebDataset`` reads it as well as :mod:`data_pipeline.stream` does. Shards and
the manifest go through :func:`storage.atomic_write`, and the manifest is written last: a crash never
leaves a shard that looks complete, and a manifest's existence means every shard it lists is complete.
The manifest records each shard's sample count, size and sha256, so readers can detect truncation or
corruption (:func:`verify_shard`) and resume by sample position without listing the store::

    with ShardWriter("s3://bucket/data", "train", max_samples_per_shard=5000, meta={"split": "train"}) as w:
        for user, seq in enumerate(sequences):
            w.write(f"u{user:08d}", {"seq.npy": seq.astype("<i8").tobytes()})
    manifest = read_manifest("s3://bucket/data", "train")

Tars are deterministic (mtime 0, uid/gid 0, empty owner names, mode 0o444, a sample's members sorted by
extension): the same samples give byte-identical shards, hence the same sha256 on every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, BinaryIO

from data_pipeline.storage import (
    StorageNotFoundError,
    StorageOptions,
    atomic_write,
    exists,
    join,
    open_read,
)

__all__ = [
    "MANIFEST_VERSION",
    "CorruptShardError",
    "Manifest",
    "ManifestError",
    "ShardEntry",
    "ShardWriter",
    "manifest_url",
    "read_manifest",
    "shard_name",
    "verify_shard",
]

MANIFEST_VERSION = 1
log = logging.getLogger("fmrl")

_CHUNK = 1 << 20
# shards are built in a spooled temp file: in memory while small, on local disk once larger
_SPOOL_MAX = 64 << 20
_PENDING_SAMPLES = 256  # members are joined and spooled in groups of about this many samples
_ZEROS = bytes(512)  # tar pads every member to 512-byte blocks


class ManifestError(ValueError):
    """A manifest exists but cannot be used (bad JSON, missing or mistyped fields); names the URL."""


class CorruptShardError(ValueError):
    """A shard's bytes differ from what its manifest recorded (truncated, corrupt); names the shard."""


@dataclass(frozen=True)
class ShardEntry:
    """One shard as recorded in the manifest."""

    name: str
    """File name relative to the shard set's base URL, e.g. ``train-000003.tar``."""
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The complete description of a shard set (the contents of ``<prefix>.manifest.json``)."""

    version: int
    prefix: str
    shards: list[ShardEntry]
    total_samples: int
    meta: dict[str, Any] = field(default_factory=dict)


def manifest_url(base_url: str, prefix: str) -> str:
    """Where the manifest of the shard set ``prefix`` under ``base_url`` lives."""
    return join(base_url, f"{prefix}.manifest.json")


def shard_name(prefix: str, index: int) -> str:
    """The file name of shard ``index`` (``<prefix>-000003.tar``); zero-padded so names sort in order."""
    return f"{prefix}-{index:06d}.tar"


class ShardWriter:
    """Write samples into WebDataset tar shards of at most ``max_samples_per_shard`` samples each.

    Use as a context manager. Each finished shard is committed atomically; the manifest (with ``meta``,
    a free-form JSON-able dict such as the split name) is written only when the block exits without an
    exception, after all shards. On an exception the shard being built is dropped and no manifest is
    written, so the partial set is never mistaken for a complete one.
    """

    def __init__(
        self,
        base_url: str,
        prefix: str,
        max_samples_per_shard: int,
        options: StorageOptions | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if max_samples_per_shard < 1:
            raise ValueError(f"max_samples_per_shard must be at least 1, got {max_samples_per_shard}")
        if not prefix or "/" in prefix:
            raise ValueError(f"shard prefix must be non-empty and contain no '/', got {prefix!r}")
        self.base_url = base_url
        self.prefix = prefix
        self.max_samples_per_shard = max_samples_per_shard
        self.options = options
        self.meta = dict(meta or {})
        self.shards: list[ShardEntry] = []
        self._spool: tempfile.SpooledTemporaryFile[bytes] | None = None
        self._offset = 0  # bytes of members in the shard being built
        self._pending: list[bytes] = []  # members not yet in the spool
        self._count = 0  # samples in the shard being built
        self._keys: set[str] = set()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self._discard()
            return
        if self._count:
            self._flush()
        self._write_manifest()

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        """Append one sample: tar members ``<key>.<ext>`` for each ``ext -> bytes`` in ``fields``.

        ``key`` must be non-empty and free of ``.`` and ``/`` (WebDataset splits member names at the
        first dot to find the key) and unique within the set; extensions must be non-empty without ``/``.
        """
        if not key or "." in key or "/" in key:
            raise ValueError(f"invalid sample key {key!r}: must be non-empty and contain no '.' or '/'")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        if not fields:
            raise ValueError(f"sample {key!r} has no fields")
        for ext, value in fields.items():
            if not ext or "/" in ext:
                raise ValueError(f"sample {key!r}: invalid extension {ext!r}")
            if not isinstance(value, (bytes, bytearray, memoryview)):  # noqa: UP038 (the tuple is faster)
                raise TypeError(f"sample {key!r}: field {ext!r} must be bytes, got {type(value).__name__}")
        self._append(
            key, [(ext, bytes(fields[ext])) for ext in (sorted(fields) if len(fields) > 1 else fields)]
        )

    def write_many(self, ext: str, samples: Iterable[tuple[str, bytes]]) -> None:
        """Append many one-field samples: the member ``<key>.<ext>`` for each ``(key, bytes)`` in
        ``samples``; the same checks and bytes as :meth:`write` with ``{ext: value}``, for generators
        that write millions of small samples (a dict and its checks per sample were a third of the
        writer's time)."""
        if not ext or "/" in ext:
            raise ValueError(f"invalid extension {ext!r}")
        keys, pending, suffix = self._keys, self._pending, "." + ext
        for key, value in samples:  # _append inlined: a call per sample was a fifth of the time
            if not key or "." in key or "/" in key:
                raise ValueError(f"invalid sample key {key!r}: must be non-empty and contain no '.' or '/'")
            if key in keys:
                raise ValueError(f"duplicate sample key {key!r}")
            if type(value) is not bytes:
                if not isinstance(value, (bytearray, memoryview)):  # noqa: UP038
                    raise TypeError(
                        f"sample {key!r}: field {ext!r} must be bytes, got {type(value).__name__}"
                    )
                value = bytes(value)
            if self._spool is None:
                self._spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_MAX)
                self._offset = 0
            header, padding = _member_header(key + suffix, len(value)), _ZEROS[: -len(value) % 512]
            pending += (header, value, padding)
            self._offset += len(header) + len(value) + len(padding)
            if len(pending) >= 3 * _PENDING_SAMPLES:
                self._spool.write(b"".join(pending))
                pending.clear()
            keys.add(key)
            self._count += 1
            if self._count >= self.max_samples_per_shard:
                self._flush()

    def _append(self, key: str, members: Iterable[tuple[str, bytes]]) -> None:
        """Add the sample ``key`` (checked by the caller) with its ``(ext, data)`` members."""
        if self._spool is None:
            self._spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_MAX)
            self._offset = 0
        for ext, data in members:
            header, padding = _member_header(f"{key}.{ext}", len(data)), _ZEROS[: -len(data) % 512]
            self._pending += (header, data, padding)
            self._offset += len(header) + len(data) + len(padding)
        if len(self._pending) >= 3 * _PENDING_SAMPLES:  # a spool write per sample was a 1/4 of the time
            self._spool.write(b"".join(self._pending))
            self._pending.clear()
        self._keys.add(key)
        self._count += 1
        if self._count >= self.max_samples_per_shard:
            self._flush()

    def _flush(self) -> None:
        """Finish the current tar and commit it under its final name, hashing it on the way out."""
        assert self._spool is not None
        self._spool.write(b"".join(self._pending))
        self._pending.clear()
        # the end of the archive as tarfile writes it: two zero blocks, then zeros up to a whole record
        end = 2 * tarfile.BLOCKSIZE
        self._spool.write(tarfile.NUL * (end + -(self._offset + end) % tarfile.RECORDSIZE))
        name = shard_name(self.prefix, len(self.shards))
        self._spool.seek(0)
        digest = hashlib.sha256()
        size = 0
        with atomic_write(join(self.base_url, name), self.options) as out:
            while chunk := self._spool.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        self._spool.close()
        self.shards.append(ShardEntry(name=name, samples=self._count, bytes=size, sha256=digest.hexdigest()))
        self._spool, self._count = None, 0

    def _discard(self) -> None:
        self._pending.clear()
        if self._spool is not None:
            self._spool.close()
        self._spool, self._count = None, 0

    def _write_manifest(self) -> None:
        manifest = Manifest(
            version=MANIFEST_VERSION,
            prefix=self.prefix,
            shards=list(self.shards),
            total_samples=sum(s.samples for s in self.shards),
            meta=self.meta,
        )
        payload = json.dumps(dataclasses.asdict(manifest), indent=1, sort_keys=True).encode()
        with atomic_write(manifest_url(self.base_url, self.prefix), self.options) as f:
            f.write(payload)


# the parts of a member's ustar header that are the same for every shard member (mode 0o444, uid/gid 0,
# mtime 0, regular file, no link, ustar magic, empty owner names): all but its name, size and checksum
_HEADER_MODE_TO_SIZE = b"0000444\x000000000\x000000000\x00"  # bytes 100:124
_HEADER_MTIME = b"00000000000\x00"  # bytes 136:148
_HEADER_TAIL = tarfile.REGTYPE + bytes(100) + tarfile.POSIX_MAGIC + bytes(512 - 265)  # bytes 156:512
# the checksum is the byte sum of the header with its own field as 8 spaces
_HEADER_FIXED_SUM = sum(_HEADER_MODE_TO_SIZE) + sum(_HEADER_MTIME) + 8 * ord(" ") + sum(_HEADER_TAIL)


def _member_header(name: str, size: int) -> bytes:
    """The tar header block(s) of a regular file member ``name`` of ``size`` bytes, with the fixed
    owner, mode and mtime of every shard: byte for byte what ``tarfile`` (PAX format) writes, built
    directly for the usual short ASCII name (a ``tarfile.TarInfo`` per member was 4/5 of a small
    sample's write time) and by ``tarfile`` otherwise."""
    if len(name) <= 100 and name.isascii() and size < 8**11:
        encoded, size_field = name.encode("ascii"), b"%011o\x00" % size
        checksum = _HEADER_FIXED_SUM + sum(encoded) + sum(size_field)
        return b"".join(
            (
                encoded,
                bytes(100 - len(encoded)),
                _HEADER_MODE_TO_SIZE,
                size_field,
                _HEADER_MTIME,
                b"%06o\x00 " % checksum,
                _HEADER_TAIL,
            )
        )
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
        size,
        0,
        0o444,
        0,
        0,
        "",
        "",
    )
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def generated_dataset(
    out_url: str,
    generator: dict[str, Any],
    shard_sets: Sequence[str],
    options: StorageOptions | None = None,
) -> dict[str, Any] | None:
    """The ``dataset.json`` of a complete generated data set at ``out_url`` if its ``generator`` settings
    equal ``generator`` and each of its ``shard_sets`` (prefixes) still has its manifest and matches it
    (so it can be reused); None if there is none, or if a shard or a manifest is damaged or missing (the
    set is then written again); ValueError naming every setting that differs otherwise (never overwrite
    a data set made differently)."""
    url = join(out_url, "dataset.json")
    if not exists(url, options):
        return None
    with open_read(url, options) as f:
        doc = json.loads(f.read())
    found = doc.get("generator", {})
    if found != generator:
        differ = ", ".join(
            f"{k}={found.get(k)!r} (asked {generator.get(k)!r})"
            for k in sorted(generator.keys() | found.keys())
            if found.get(k) != generator.get(k)
        )
        raise ValueError(
            f"{out_url} already holds a data set made with other settings ({differ}); "
            "write to another location or delete it first"
        )
    for prefix in shard_sets:
        try:
            manifest = read_manifest(out_url, prefix, options)
            for shard in manifest.shards:
                verify_shard(out_url, shard, options)
        except (CorruptShardError, ManifestError, StorageNotFoundError) as e:
            log.warning("%s is damaged (%s): writing it again", out_url, e)
            return None
    return doc


def read_manifest(base_url: str, prefix: str, options: StorageOptions | None = None) -> Manifest:
    """The manifest of the shard set ``prefix`` under ``base_url``.

    Raises :class:`StorageNotFoundError` if there is none (the set is missing or was never completed)
    and :class:`ManifestError` if it cannot be parsed; both name the URL.
    """
    url = manifest_url(base_url, prefix)
    try:
        with open_read(url, options) as f:
            raw = f.read()
    except StorageNotFoundError as e:
        raise StorageNotFoundError(
            f"no shard manifest at {url}: the shard set is missing or its writer did not finish; write the "
            f"data set again (rerunning the command that made it repairs it) or delete {base_url}"
        ) from e
    try:
        doc = json.loads(raw)
        if doc["version"] != MANIFEST_VERSION:
            raise ManifestError(f"manifest {url} has version {doc['version']!r}, expected {MANIFEST_VERSION}")
        shards = [
            ShardEntry(
                name=str(s["name"]), samples=int(s["samples"]), bytes=int(s["bytes"]), sha256=str(s["sha256"])
            )
            for s in doc["shards"]
        ]
        manifest = Manifest(
            version=int(doc["version"]),
            prefix=str(doc["prefix"]),
            shards=shards,
            total_samples=int(doc["total_samples"]),
            meta=dict(doc.get("meta") or {}),
        )
    except ManifestError:
        raise
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise ManifestError(f"malformed shard manifest {url}: {type(e).__name__}: {e}") from e
    if manifest.total_samples != sum(s.samples for s in shards):
        raise ManifestError(f"malformed shard manifest {url}: total_samples does not match the shard counts")
    return manifest


def verify_shard(base_url: str, shard: ShardEntry, options: StorageOptions | None = None) -> None:
    """Re-read a shard and check its size and sha256 against the manifest; :class:`CorruptShardError` if not."""
    url = join(base_url, shard.name)
    with open_read(url, options) as f:
        digest, size = _hash_stream(f)
    if size != shard.bytes:
        raise CorruptShardError(f"shard {url} has {size} bytes, the manifest says {shard.bytes} (truncated?)")
    if digest != shard.sha256:
        raise CorruptShardError(
            f"shard {url} has sha256 {digest}, the manifest says {shard.sha256} (corrupt)"
        )


def _hash_stream(f: BinaryIO | io.RawIOBase) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    while chunk := f.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size
