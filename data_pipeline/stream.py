"""Stream samples from a WebDataset shard set (local or S3) with an exact, resumable position.

WebDataset itself keeps no state, so a restart could only replay or skip data. Here the order is a pure
function of ``(seed, epoch, world_size, num_workers)``, which makes the position three integers:

* per epoch, the shards are permuted by ``numpy.random.default_rng((seed, epoch))`` (the same on every
  rank) and dealt round-robin to the ``world_size * num_workers`` (rank, worker) slots:
  ``slot = rank * num_workers + worker_id``, ``shards[slot::world_size * num_workers]``;
* within a shard, samples come in file order, or with ``shuffle_samples=True`` in a permutation drawn
  from ``default_rng((seed, epoch, shard))``: the whole shard is read into memory first, so memory is
  bounded by one shard per reading slot (user-sequence shards are small: ~2 MB per 10k users);
* the state of a :class:`ShardStream` is ``(epoch, shard index in this slot's list, samples consumed from
  it)``, always counting exactly the samples handed out. Resuming reopens that shard and skips the
  consumed samples (tars have no random access; size shards so that one partial re-read is cheap).

The stream is a ``torch.distributed.checkpoint`` Stateful (``state_dict`` / ``load_state_dict``; the
state is plain JSON-able data), one per (rank, worker). A state saved with a different world size,
worker count, seed or shard set is refused with a ``ValueError`` naming what differs: the position
cannot be mapped exactly, and silently replaying or skipping data is worse than stopping::

    stream = ShardStream("s3://bucket/data", "train", rank=rank, world_size=world, seed=0)
    stream.load_state_dict(saved)  # optional
    while stream.epoch < epochs:
        for sample in stream.iter_epoch():
            ...  # data_pipeline.loader turns user samples into training batches
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from data_pipeline.shards import CorruptShardError, Manifest, ShardEntry, read_manifest
from data_pipeline.storage import StorageOptions, join, open_read

__all__ = ["STATE_VERSION", "Sample", "ShardStream", "TarFormatError", "iter_shard", "iter_tar_members"]

STATE_VERSION = 1

Sample = dict[str, Any]
"""``{"__key__": str, "__url__": str, ext: bytes, ...}``: one sample's tar members by extension."""


class _HashingReader(io.RawIOBase):
    """Passes reads through while hashing them, so a streamed shard is checked against its manifest."""

    def __init__(self, f: Any) -> None:
        super().__init__()
        self._f = f
        self.digest = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._f.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.digest.update(data)
        self.size += n
        return n


class TarFormatError(ValueError):
    """A tar stream whose structure is broken: a bad header checksum or size, or an end inside a member."""


_BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")  # regular file (ustar, old tar, contiguous)


def _header_number(field: bytes) -> int:
    """An octal (NUL/space padded) or GNU base-256 (high bit set) tar header number."""
    if field[:1] in (b"\x80", b"\xff"):  # base-256: big sizes written by GNU tar / tarfile
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[:1] == b"\xff" else value
    digits = field.replace(b"\0", b" ").strip()
    return int(digits, 8) if digits else 0


def _read_exactly(f: Any, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise TarFormatError(f"the stream ends inside a member ({len(data)} of {n} bytes)")
    return data


def iter_tar_members(f: Any) -> Iterator[tuple[str, bytes]]:
    """The regular files of a tar stream as ``(name, data)``, in order, read sequentially from ``f``.

    A small reader of what WebDataset shards hold (ustar and PAX from Python's tarfile, GNU long names
    from GNU tar), several times faster than ``tarfile``'s stream mode for shards of many small members
    (one CTR impression each), which is what bounds the CTR loader. Headers are checksummed like
    ``tarfile`` does; it stops at the first all-zero block, or at the end of the stream on a header
    boundary (so a tar cut between members reads as a shorter tar: the manifest catches that).
    Raises :class:`TarFormatError` on a broken header or an end inside a member.
    ``tarfile`` stays the reference (tests/unit/test_data.py compares both).
    """
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = f.read(_BLOCK)
        if not header:
            return
        if len(header) != _BLOCK:
            raise TarFormatError(f"the stream ends inside a header ({len(header)} of {_BLOCK} bytes)")
        if header.count(0) == _BLOCK:
            return  # end-of-archive marker
        try:
            stored = _header_number(header[148:156])
            size = _header_number(header[124:136])
        except ValueError as e:
            raise TarFormatError(f"a header has a bad number field ({e})") from None
        unsigned = sum(header) - sum(header[148:156]) + 8 * 32
        if stored != unsigned and stored != _signed_checksum(header):
            raise TarFormatError("a header checksum does not match (corrupt data)")
        if size < 0:
            raise TarFormatError(f"a header has a negative size ({size})")
        kind = header[156:157]
        data = _read_exactly(f, size)
        padding = -size % _BLOCK
        if padding:
            _read_exactly(f, padding)
        if kind == b"x":  # PAX extended header: applies to the next member
            pax = _parse_pax(data)
            continue
        if kind == b"g":  # PAX global header: nothing in it matters here
            continue
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if kind not in _REGULAR:  # directories, links, ...: no sample data
            long_name, pax = None, {}
            continue
        if "size" in pax:
            raise TarFormatError("a PAX size override is not supported")  # only for members > 8 GiB
        name = pax.get("path") or long_name
        if name is None:
            prefix = header[345:500].split(b"\0", 1)[0]
            base = header[0:100].split(b"\0", 1)[0]
            name = ((prefix + b"/" + base) if prefix else base).decode("utf-8", "surrogateescape")
        long_name, pax = None, {}
        yield name, data


def _signed_checksum(header: bytes) -> int:
    """The checksum some old tars wrote, with the bytes as signed chars (tarfile accepts it too)."""
    values = np.frombuffer(header, dtype=np.int8)
    return int(values.sum()) - int(values[148:156].sum()) + 8 * 32


def _parse_pax(data: bytes) -> dict[str, str]:
    """``"<length> <key>=<value>\\n"`` records of a PAX header."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos : pos + 1] != b"\0":
        space = data.find(b" ", pos)
        if space < 0:
            raise TarFormatError("a PAX header record has no length")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError("a PAX header record has a bad length") from None
        if length <= 0 or pos + length > len(data):
            raise TarFormatError("a PAX header record runs past its header")
        record = data[space + 1 : pos + length - 1]  # without the trailing newline
        key, _, value = record.partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def iter_shard(
    url: str, entry: ShardEntry | None = None, options: StorageOptions | None = None
) -> Iterator[Sample]:
    """The samples of one tar shard in file order, read as a stream (no seeks, so it works on S3).

    Members are grouped by key (the name up to the first ``.``). With ``entry``, a shard that ends
    early or whose sample count, size or sha256 differs from the manifest raises
    :class:`CorruptShardError` naming the URL and the last good key; without it only broken tar
    structure is detected (a tar cut at a member boundary reads as a shorter valid tar).
    """
    last_key: str | None = None
    count = 0

    def corrupt(why: str) -> CorruptShardError:
        return CorruptShardError(f"shard {url} is {why} after {count} samples (last good key: {last_key!r})")

    with open_read(url, options) as raw:
        reader = _HashingReader(raw)
        buffered = io.BufferedReader(reader, buffer_size=1 << 20)
        try:
            current: Sample | None = None
            for name, data in iter_tar_members(buffered):
                key, _, ext = name.partition(".")
                if current is not None and current["__key__"] != key:
                    # set last_key before handing the sample out: the error must name the last complete one
                    last_key, count = current["__key__"], count + 1
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[ext] = data
            if current is not None:
                last_key, count = current["__key__"], count + 1
                yield current
        except TarFormatError as e:
            raise corrupt(f"truncated or corrupt ({type(e).__name__}: {e})") from e
        if entry is None:
            return
        if count != entry.samples:
            raise corrupt(f"short ({entry.samples} samples expected, truncated?)")
        # the reader stops at the end-of-archive blocks; hash the record padding after them too
        while buffered.read(1 << 20):
            pass
        if reader.size != entry.bytes or reader.digest.hexdigest() != entry.sha256:
            raise corrupt(f"corrupt ({reader.size} bytes, sha256 differs from the manifest's)")


class ShardStream:
    """One (rank, worker) slot's view of a shard set, with an exact resumable position.

    ``rank``/``world_size`` are the distributed ranks, ``num_workers``/``worker_id`` the data loader
    workers within a rank (pass them explicitly; the stream does not look them up). Every slot must get
    at least one shard: with fewer shards than ``world_size * num_workers`` slots it raises ValueError,
    as an empty slot would hang the other ranks at their next collective.
    """

    def __init__(
        self,
        base_url: str,
        prefix: str,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 1,
        worker_id: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_samples: bool = False,
        options: StorageOptions | None = None,
        manifest: Manifest | None = None,
        consumed: tuple[int, dict[int, int]] | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if not 0 <= worker_id < num_workers:
            raise ValueError(f"worker_id {worker_id} is not in [0, num_workers={num_workers})")
        self.base_url = base_url
        self.prefix = prefix
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.worker_id = worker_id
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_samples = shuffle_samples
        self.options = options
        # a caller that already read the manifest (SequenceDataset) passes it: no repeated reads
        self.manifest: Manifest = manifest or read_manifest(base_url, prefix, options)
        # (epoch, {shard index: samples}) already read in that epoch by a job of another layout (a
        # resume at another world size): those samples are skipped
        self.consumed = consumed
        slots = world_size * num_workers
        if len(self.manifest.shards) < slots:
            raise ValueError(
                f"shard set {prefix!r} has {len(self.manifest.shards)} shards but world_size={world_size} x "
                f"num_workers={num_workers} = {slots} slots need at least one each: write more, smaller shards"
            )
        self.epoch = 0
        self._shard_index = 0  # into this slot's shard list for self.epoch
        self._offset = 0  # samples of that shard already handed out

    @property
    def slot(self) -> int:
        return self.rank * self.num_workers + self.worker_id

    def slot_shards(self, epoch: int, slot: int | None = None) -> list[int]:
        """Indices into the manifest's shard list that ``slot`` (default: this stream's) reads in ``epoch``."""
        n = len(self.manifest.shards)
        order = np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle else np.arange(n)
        return [
            int(i) for i in order[self.slot if slot is None else slot :: self.world_size * self.num_workers]
        ]

    def iter_epoch(self) -> Iterator[Sample]:
        """Samples from the current position to the end of the epoch, then advance to the next epoch.

        The position advances before each sample is handed out, so ``state_dict()`` taken between two
        samples counts exactly those already received. Abandoning the iterator keeps the position; a
        later ``iter_epoch()`` continues from it.
        """
        shards = self.slot_shards(self.epoch)
        skipped = self.consumed[1] if self.consumed and self.consumed[0] == self.epoch else {}
        while self._shard_index < len(shards):
            entry = self.manifest.shards[shards[self._shard_index]]
            self._offset = max(self._offset, skipped.get(shards[self._shard_index], 0))
            if self._offset < entry.samples:
                skip = self._offset
                samples: Iterable[Sample] = iter_shard(join(self.base_url, entry.name), entry, self.options)
                if self.shuffle_samples:
                    in_file_order = list(samples)
                    rng = np.random.default_rng((self.seed, self.epoch, shards[self._shard_index]))
                    samples = [in_file_order[i] for i in rng.permutation(len(in_file_order))]
                for i, sample in enumerate(samples):
                    if i < skip:
                        continue
                    self._offset = i + 1
                    yield sample
            self._shard_index += 1
            self._offset = 0
        self.epoch += 1
        self._shard_index = 0

    def state_dict(self) -> dict[str, Any]:
        """The position and the arguments it is valid for; plain JSON-able data."""
        return {
            "version": STATE_VERSION,
            "prefix": self.prefix,
            "num_shards": len(self.manifest.shards),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_samples": self.shuffle_samples,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "worker_id": self.worker_id,
            "epoch": self.epoch,
            "shard_index": self._shard_index,
            "offset": self._offset,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; ValueError naming every setting that differs from this stream's."""
        mine = self.state_dict()
        missing = sorted(set(mine) - set(state))
        if missing:
            raise ValueError(f"data stream state lacks {', '.join(missing)}; is it a ShardStream state?")
        fixed = (
            "version",
            "prefix",
            "num_shards",
            "seed",
            "shuffle",
            "shuffle_samples",
            "rank",
            "world_size",
            "num_workers",
            "worker_id",
        )
        differ = [
            f"{name}={state[name]!r} (now {mine[name]!r})" for name in fixed if state[name] != mine[name]
        ]
        if differ:
            raise ValueError(
                "cannot resume the data stream exactly: the state was saved with "
                + ", ".join(differ)
                + "; the sample order depends on these, so resuming would replay or skip data"
            )
        epoch, index, offset = int(state["epoch"]), int(state["shard_index"]), int(state["offset"])
        shards = self.slot_shards(epoch)
        if epoch < 0 or not 0 <= index <= len(shards):
            raise ValueError(f"data stream state has epoch {epoch}, shard_index {index}: out of range")
        if index < len(shards) and not 0 <= offset <= self.manifest.shards[shards[index]].samples:
            raise ValueError(f"data stream state has offset {offset}, beyond its shard's sample count")
        self.epoch, self._shard_index, self._offset = epoch, index, offset
