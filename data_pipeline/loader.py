"""Training and evaluation batches of user sequences streamed from a dataset's shards.

A dataset (``fmrl data ...``) holds the users' chronological item sequences in the ``users`` shard set.
The leave-one-out split is made here, per user, as in :mod:`data_pipeline.sequences`: train on
``s[:-2]``, validate on ``s[-2]``, test on ``s[-1]``.

Training batches come from :class:`TrainLoader`, which owns one :class:`~data_pipeline.stream.ShardStream`
per reading slot (``num_workers`` slots per rank; shards shuffled per epoch, samples shuffled within a
shard) and runs the slots in DataLoader worker processes with prefetching. Its position is exact:

* every batch comes back from its worker with the slot's stream position *after* that batch, and the
  loader keeps the newest position per slot plus which slot is due next;
* the DataLoader visits workers round robin, skipping exhausted ones. A resumed loader rotates the
  worker -> slot assignment so that its worker 0 reads the slot that was due next, which reproduces
  the uninterrupted order batch for batch;
* so ``state_dict()`` between two batches names exactly the batches consumed so far (test:
  tests/integration/test_loader.py compares sample keys of interrupted and uninterrupted runs).

Every rank must run the same number of steps per epoch (an extra step on one rank would hang the
others in a collective). :func:`scan_users` counts the trainable sequences per shard once at start-up
(each rank reads a share of the user shards, then the counts are added over the ranks), from which
each rank computes every rank's batch count for an epoch without communicating further;
:meth:`TrainLoader.steps_in_epoch` is their minimum and the loader drops the
rest of the epoch, like ``drop_last`` does for a map-style dataset.

The machinery is :class:`ShardBatchLoader`, which knows nothing of the samples: a subclass turns a
sample into an example (or skips it) and a list of examples into a batch. :class:`TrainLoader` does
that for user sequences, :class:`CTRTrainLoader` for click impressions (data_pipeline/ctr.py).
"""

from __future__ import annotations

import json
import math
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.ctr import CTRBatch, CTRDataset, collate_ctr, decode_ctr_sample
from data_pipeline.item_index import (
    INDEX_KEY,
    AttributeIndexError,
    AttributeIndexSummary,
    note_missing_index,
    read_attribute_index,
    write_attribute_index,
)
from data_pipeline.sequences import EvalBatch, TrainBatch, collate_next_item, left_pad
from data_pipeline.shards import Manifest, read_manifest
from data_pipeline.storage import StorageNotFoundError, StorageOptions, atomic_write, join, open_read
from data_pipeline.stream import Sample, ShardStream, iter_shard

__all__ = [
    "CTRTrainLoader",
    "DatasetError",
    "ItemAttributes",
    "SequenceDataset",
    "ShardBatchLoader",
    "TrainLoader",
    "UserStats",
    "eval_batches",
    "index_attributes",
    "parse_item_attributes",
    "read_item_attributes",
    "read_item_source_ids",
    "scan_users",
]

LOADER_STATE_VERSION = 1
USERS_PREFIX = "users"


class DatasetError(ValueError):
    """A dataset is incomplete or a record in it is invalid; the message names the file and record."""


@dataclass(frozen=True)
class SequenceDataset:
    """A complete dataset written by ``fmrl data``: its location, counts and user manifest."""

    url: str
    num_items: int
    num_users: int
    info: dict[str, Any]
    """The parsed ``dataset.json``."""
    users: Manifest
    options: StorageOptions | None = None

    @classmethod
    def open(cls, url: str, options: StorageOptions | None = None) -> SequenceDataset:
        info_url = join(url, "dataset.json")
        try:
            with open_read(info_url, options) as f:
                info = json.loads(f.read())
        except StorageNotFoundError:
            raise DatasetError(
                f"{info_url} does not exist: {url!r} is not a complete dataset (write one with "
                "`fmrl data prepare-synthetic`, `convert-movielens`, `convert-amazon` or `convert-p5`)"
            ) from None
        except json.JSONDecodeError as e:
            raise DatasetError(f"{info_url} is not valid JSON: {e}") from e
        for key in ("num_items", "num_users"):
            if not isinstance(info.get(key), int) or info[key] < 1:
                raise DatasetError(f"{info_url}: {key!r} must be a positive integer, got {info.get(key)!r}")
        users = read_manifest(url, info.get("users_prefix", USERS_PREFIX), options)
        return cls(url, info["num_items"], info["num_users"], info, users, options)


@dataclass(frozen=True)
class ItemAttributes:
    """Every item's attribute ids (brand, categories ...) as bags in CSR form: item i's attributes are
    ``values[offsets[i]:offsets[i + 1]]``, ids in 1..num_attributes; row 0 (padding) has none."""

    offsets: np.ndarray
    """(N + 2,) int64, offsets[0] = offsets[1] = 0."""
    values: np.ndarray
    """(nnz,) int64 attribute ids."""
    num_attributes: int


def read_item_attributes(dataset: SequenceDataset) -> ItemAttributes:
    """The attribute bags of a data set whose ``dataset.json`` has ``num_attributes`` (written by
    ``fmrl data convert-seqrec --attributes`` or ``prepare-synthetic-scale``), checked: from its attribute
    index (data_pipeline/item_index.py: memory-mapped, no per-item Python objects) if ``dataset.json``
    names one, else parsed from the item shards by :func:`parse_item_attributes` (said once per data set,
    with how to add an index)."""
    if INDEX_KEY in dataset.info:
        try:
            offsets, values, num_attributes = read_attribute_index(
                dataset.url, dataset.info, dataset.num_items, dataset.options
            )
        except AttributeIndexError as e:
            raise DatasetError(str(e)) from None
        return ItemAttributes(offsets, values, num_attributes)
    if dataset.info.get("num_attributes"):
        note_missing_index(dataset.url)
    return parse_item_attributes(dataset)


def index_attributes(dataset_url: str, options: StorageOptions | None = None) -> AttributeIndexSummary:
    """Build the attribute index (data_pipeline/item_index.py) of an existing data set from its item
    shards (the reference parse) and record it in its ``dataset.json`` (rewritten all or nothing, the
    other keys kept)."""
    dataset = SequenceDataset.open(dataset_url, options)
    bags = parse_item_attributes(dataset)
    entry = write_attribute_index(dataset_url, bags.offsets, bags.values, bags.num_attributes, options)
    info = {**dataset.info, INDEX_KEY: entry}
    with atomic_write(join(dataset_url, "dataset.json"), options) as f:
        f.write(json.dumps(info, indent=1).encode())
    return AttributeIndexSummary(
        dataset=dataset_url,
        num_items=dataset.num_items,
        num_attributes=bags.num_attributes,
        nnz=len(bags.values),
        bytes=entry["offsets"]["bytes"] + entry["values"]["bytes"],
    )


def parse_item_attributes(dataset: SequenceDataset) -> ItemAttributes:
    """The attribute bags parsed from the item shards' records (every record's ``attributes`` list) and
    checked: the reference that the attribute index is built from and tested against. O(N) Python
    objects: :func:`read_item_attributes` uses the index where there is one."""
    info_url = join(dataset.url, "dataset.json")
    num_attributes = dataset.info.get("num_attributes")
    if not isinstance(num_attributes, int) or num_attributes < 1:
        raise DatasetError(
            f"{info_url} records no item attributes ('num_attributes'): model.use_attributes needs a data "
            "set converted with attributes, e.g. `fmrl data convert-seqrec OUT Beauty.txt --attributes "
            "Beauty_item2attributes.json`"
        )
    manifest = read_manifest(dataset.url, dataset.info.get("items_prefix", "items"), dataset.options)
    bags: list[list[int] | None] = [None] * (dataset.num_items + 1)
    bags[0] = []
    for entry in manifest.shards:
        for sample in iter_shard(join(dataset.url, entry.name), entry, dataset.options):
            where = f"{sample.get('__url__')} record {sample.get('__key__')!r}"
            try:
                record = json.loads(sample["json"])
                item, attributes = int(record["item_id"]), record["attributes"]
            except (KeyError, ValueError, TypeError) as e:
                raise DatasetError(
                    f"{where}: not an item record with 'item_id' and 'attributes' ({e})"
                ) from None
            if not 1 <= item <= dataset.num_items:
                raise DatasetError(f"{where}: item id {item} is outside 1..{dataset.num_items}")
            ok = isinstance(attributes, list) and all(
                isinstance(a, int) and not isinstance(a, bool) and 1 <= a <= num_attributes
                for a in attributes
            )
            if not ok:
                raise DatasetError(
                    f"{where}: attributes must be a list of ids in 1..{num_attributes}, got {attributes!r}"
                )
            bags[item] = attributes
    missing = [i for i, bag in enumerate(bags) if bag is None]
    if missing:
        raise DatasetError(f"{dataset.url}: item shards lack items {missing[:5]} ({len(missing)} in all)")
    lengths = np.array([len(bag) for bag in bags], dtype=np.int64)  # type: ignore[arg-type]
    offsets = np.zeros(len(bags) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter((a for bag in bags for a in bag), dtype=np.int64, count=int(offsets[-1]))  # type: ignore[union-attr]
    return ItemAttributes(offsets, values, num_attributes)


def read_item_source_ids(dataset: SequenceDataset) -> list[str]:
    """The source id (the id in the original data: ASIN, MovieLens id ...) of every item, indexed by
    internal id; entry 0 (padding) is "". Read from the item shards."""
    manifest = read_manifest(dataset.url, dataset.info.get("items_prefix", "items"), dataset.options)
    ids = [""] * (dataset.num_items + 1)
    for entry in manifest.shards:
        for sample in iter_shard(join(dataset.url, entry.name), entry, dataset.options):
            where = f"{sample.get('__url__')} record {sample.get('__key__')!r}"
            try:
                record = json.loads(sample["json"])
                item = int(record["item_id"])
            except (KeyError, ValueError, TypeError) as e:
                raise DatasetError(f"{where}: not an item record with an 'item_id' ({e})") from None
            if not 1 <= item <= dataset.num_items:
                raise DatasetError(f"{where}: item id {item} is outside 1..{dataset.num_items}")
            ids[item] = str(record.get("source_id", item))
    return ids


def decode_user(sample: Sample, num_items: int) -> np.ndarray:
    """A user sample's chronological item ids as int64, checked: at least 3 ids, all in 1..num_items."""
    where = f"{sample.get('__url__')} record {sample.get('__key__')!r}"
    try:
        record = json.loads(sample["json"])
        items = np.asarray(record["items"], dtype=np.int64)
    except KeyError as e:
        raise DatasetError(f"{where}: missing field {e}") from None
    except (ValueError, TypeError) as e:
        raise DatasetError(f"{where}: not a user record with an 'items' list of ids ({e})") from None
    if items.ndim != 1 or len(items) < 3:
        raise DatasetError(f"{where}: leave-one-out needs at least 3 items, got {items.tolist()}")
    bad = items[(items < 1) | (items > num_items)]
    if len(bad):
        raise DatasetError(f"{where}: item id {int(bad[0])} is outside 1..{num_items}")
    return items


@dataclass(frozen=True)
class UserStats:
    """What one pass over the user shards tells: per-shard trainable counts and item popularity."""

    trainable_per_shard: np.ndarray
    """(S,) users per shard whose training part ``s[:-2]`` has at least 2 items (one target)."""
    train_item_counts: np.ndarray
    """(N + 1,) occurrences of each item id in the training parts; index 0 (padding) is 0."""


def scan_users(dataset: SequenceDataset, rank: int = 0, world_size: int = 1) -> UserStats:
    """Read the user shards (checked against the manifest) and count, the same on every rank.

    Each rank decodes only the shards ``s`` with ``s % world_size == rank``; with ``world_size > 1`` the
    counts are then added over the ranks of the default process group (two all-reduces that every rank
    must join), so start-up time per rank falls with the ranks and the result equals a one-rank scan.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"scan_users: need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if world_size > 1 and not (dist.is_initialized() and dist.get_world_size() == world_size):
        group = f"has {dist.get_world_size()} ranks" if dist.is_initialized() else "is not initialised"
        raise ValueError(
            f"scan_users over {world_size} ranks adds their counts in the default process group, which "
            f"{group}: initialise torch.distributed with {world_size} ranks first"
        )
    counts = np.zeros(dataset.num_items + 1, dtype=np.int64)
    trainable = np.zeros(len(dataset.users.shards), dtype=np.int64)
    for index, entry in enumerate(dataset.users.shards):
        if index % world_size != rank:
            continue
        parts = []
        for sample in iter_shard(join(dataset.url, entry.name), entry, dataset.options):
            train = decode_user(sample, dataset.num_items)[:-2]
            parts.append(train)
            trainable[index] += len(train) >= 2
        if parts:  # one bincount per shard: per user it would cost O(N) each
            counts += np.bincount(np.concatenate(parts), minlength=dataset.num_items + 1)
    if world_size > 1:
        trainable, counts = _sum_over_ranks(trainable), _sum_over_ranks(counts)
    return UserStats(trainable, counts)


def _sum_over_ranks(values: np.ndarray) -> np.ndarray:
    """An int64 array summed over the default group's ranks, exactly (no float64 round trip), on the
    group's device (NCCL reduces CUDA tensors only)."""
    cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    total = torch.from_numpy(values).to(device=device, dtype=torch.int64)
    dist.all_reduce(total)
    return total.cpu().numpy()


# ---------------------------------------------------------------------------------------------- training


@dataclass
class _SlotBatch:
    batch: Any
    slot: int
    state: dict[str, Any]
    """The slot's stream position after this batch."""


class _SlotBatches(IterableDataset):
    """Batches of one epoch from the slot that this DataLoader worker reads (see the module docstring)."""

    def __init__(
        self,
        loader: ShardBatchLoader,
        epoch: int,
        states: list[dict[str, Any] | None],
        rotation: int,
    ) -> None:
        super().__init__()
        self.loader, self.epoch, self.states, self.rotation = loader, epoch, states, rotation

    def __iter__(self) -> Iterator[_SlotBatch]:
        info = get_worker_info()
        slots = self.loader.num_slots
        slot = ((info.id if info is not None else 0) + self.rotation) % slots
        stream = self.loader.stream(slot)
        state = self.states[slot]
        if state is not None:
            stream.load_state_dict(state)
        else:
            stream.epoch = self.epoch
        if stream.epoch != self.epoch:
            return
        size = self.loader.batch_size
        chosen: list[Any] = []
        keys: list[str] = []
        for sample in stream.iter_epoch():
            example = self.loader.example(sample)
            if example is None:
                continue
            chosen.append(example)
            keys.append(sample["__key__"])
            if len(chosen) == size:
                yield _SlotBatch(self.loader.collate(chosen, keys), slot, stream.state_dict())
                chosen, keys = [], []
        if chosen:
            yield _SlotBatch(self.loader.collate(chosen, keys), slot, stream.state_dict())


class ShardBatchLoader:
    """This rank's training batches of one shard set, epoch by epoch, with an exact resumable position
    (a DCP Stateful). Subclasses define :meth:`example` and :meth:`collate`.

    ``examples_per_shard`` (S,) counts the examples (samples that :meth:`example` keeps) of every shard
    in ``manifest``, from which every rank computes every rank's batch count without communicating.
    ``num_workers`` DataLoader worker processes each read one slot and keep ``prefetch_factor``
    batches ready; ``num_workers=0`` reads one slot in the calling process.
    """

    def __init__(
        self,
        url: str,
        manifest: Manifest,
        examples_per_shard: np.ndarray,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        prefetch_factor: int = 4,
        options: StorageOptions | None = None,
    ) -> None:
        if batch_size < 1 or num_workers < 0 or prefetch_factor < 1:
            raise ValueError(
                f"need batch_size >= 1, num_workers >= 0, prefetch_factor >= 1; got "
                f"{batch_size}, {num_workers}, {prefetch_factor}"
            )
        self.url, self.manifest, self.options = url, manifest, options
        self.examples_per_shard = np.asarray(examples_per_shard)
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.num_slots = max(num_workers, 1)
        # (epoch, {shard: samples}) read before a resume at another world size or worker count
        self._consumed: tuple[int, dict[int, int]] | None = None
        self._layout = self.stream(0)  # validates: enough shards for every slot of every rank
        self.epoch = 0
        self._states: list[dict[str, Any] | None] = [None] * self.num_slots
        self._next_slot = 0
        self._batches_in_epoch = 0

    def example(self, sample: Sample) -> Any | None:
        """The training example of one streamed sample, or None to skip it."""
        raise NotImplementedError

    def collate(self, examples: list[Any], keys: list[str]) -> Any:
        """One batch of ``examples`` (whose samples' keys are ``keys``)."""
        raise NotImplementedError

    def stream(self, slot: int) -> ShardStream:
        return ShardStream(
            self.url,
            self.manifest.prefix,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=self.num_slots,
            worker_id=slot,
            seed=self.seed,
            shuffle=True,
            shuffle_samples=True,
            options=self.options,
            manifest=self.manifest,
            consumed=self._consumed,
        )

    @property
    def batches_in_epoch(self) -> int:
        """Batches of the current epoch handed out so far."""
        return self._batches_in_epoch

    def steps_in_epoch(self, epoch: int) -> int:
        """Batches every rank takes in ``epoch``: the fewest that any rank has (computed locally)."""
        per_shard = self.examples_per_shard
        if self._consumed is not None and self._consumed[0] == epoch:
            # trainable users left in partly read shards: at least (trainable - read); a lower bound
            # keeps every rank's count reachable, so no rank waits for a batch that never comes
            read = np.zeros_like(per_shard)
            for shard, samples in self._consumed[1].items():
                read[shard] = samples
            per_shard = np.maximum(per_shard - read, 0)
        layout = self._layout
        fewest = math.inf
        for rank in range(self.world_size):
            slots = range(rank * self.num_slots, (rank + 1) * self.num_slots)
            batches = sum(
                -(-int(per_shard[layout.slot_shards(epoch, s)].sum()) // self.batch_size) for s in slots
            )
            fewest = min(fewest, batches)
        return int(fewest)

    def __iter__(self) -> Iterator[Any]:
        """The rest of the current epoch's batches (up to :meth:`steps_in_epoch`), then the next epoch."""
        steps = self.steps_in_epoch(self.epoch)
        if self._batches_in_epoch < steps:
            dataset = _SlotBatches(self, self.epoch, list(self._states), self._next_slot)
            if self.num_workers == 0:
                source: Any = iter(dataset)
            else:
                source = iter(
                    DataLoader(
                        dataset,
                        batch_size=None,
                        num_workers=self.num_workers,
                        prefetch_factor=self.prefetch_factor,
                        multiprocessing_context="fork",
                        worker_init_fn=_ignore_sigterm,
                        # its own generator: creating the iterator must not draw from the global RNG,
                        # or dropout would differ between a resumed and an uninterrupted run
                        generator=torch.Generator().manual_seed(self.seed),
                    )
                )
            try:
                for item in source:
                    self._states[item.slot] = item.state
                    self._next_slot = (item.slot + 1) % self.num_slots
                    self._batches_in_epoch += 1
                    yield item.batch
                    if self._batches_in_epoch >= steps:
                        break
            finally:
                del source  # shuts the workers down
        self.epoch += 1
        self._states = [None] * self.num_slots
        self._next_slot = 0
        self._batches_in_epoch = 0
        self._consumed = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": LOADER_STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "epoch": self.epoch,
            "next_slot": self._next_slot,
            "batches_in_epoch": self._batches_in_epoch,
            "slots": [json.dumps(s) if s is not None else "" for s in self._states],
            "consumed": None
            if self._consumed is None
            else {"epoch": self._consumed[0], "shards": {str(k): v for k, v in self._consumed[1].items()}},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        fixed = ("version", "world_size", "num_workers", "batch_size")
        differ = [f"{k}={state.get(k)!r} (now {mine[k]!r})" for k in fixed if state.get(k) != mine[k]]
        if differ:
            raise ValueError(
                "cannot resume the training data exactly: the loader state was saved with "
                + ", ".join(differ)
                + "; the batch order depends on these"
            )
        states = [json.loads(s) if s else None for s in state["slots"]]
        for slot, slot_state in enumerate(states):
            if slot_state is not None:
                self.stream(slot).load_state_dict(slot_state)  # validates it against this rank's slot
        self.epoch = int(state["epoch"])
        self._next_slot = int(state["next_slot"])
        self._batches_in_epoch = int(state["batches_in_epoch"])
        self._states = states
        self._consumed = _consumed_from_state(state)

    def resume(self, states: list[dict[str, Any]]) -> bool:
        """Continue from the loader states of every rank of a saved job (one per rank, in rank order).

        With the same world size, worker count and batch size this is this rank's exact position
        (:meth:`load_state_dict`; returns True). Otherwise the epoch in progress continues with the
        samples that no rank has read yet, spread over this job's ranks and workers: nothing is replayed
        or skipped, but the order differs from any uninterrupted run (returns False).
        """
        mine = self.state_dict()
        same = len(states) == self.world_size and all(
            states[self.rank].get(k) == mine[k] for k in ("version", "num_workers", "batch_size")
        )
        if same:
            self.load_state_dict(states[self.rank])
            return True
        versions = {s.get("version") for s in states}
        if versions != {LOADER_STATE_VERSION}:
            raise ValueError(f"cannot resume the training data: loader state versions {sorted(versions)}")
        epochs = {int(s["epoch"]) for s in states}
        if len(epochs) != 1:
            raise ValueError(f"the saved ranks are in different epochs {sorted(epochs)}; cannot resume")
        (epoch,) = epochs
        self.epoch, self._states, self._next_slot, self._batches_in_epoch = (
            epoch,
            [None] * self.num_slots,
            0,
            0,
        )
        consumed = self._read_before(epoch, states)
        self._consumed = (epoch, consumed) if consumed else None
        return False

    def _read_before(self, epoch: int, states: list[dict[str, Any]]) -> dict[int, int]:
        """{shard: samples read} in ``epoch`` by the saved job whose per-rank loader ``states`` are given."""
        read: dict[int, int] = {}
        for saved in states:
            earlier = _consumed_from_state(saved)
            if earlier is not None and earlier[0] == epoch:
                for shard, samples in earlier[1].items():
                    read[shard] = max(read.get(shard, 0), samples)
            for slot_json in saved["slots"]:
                if not slot_json:
                    continue
                slot_state = json.loads(slot_json)
                stream = ShardStream(
                    self.url,
                    self.manifest.prefix,
                    rank=slot_state["rank"],
                    world_size=slot_state["world_size"],
                    num_workers=slot_state["num_workers"],
                    worker_id=slot_state["worker_id"],
                    seed=self.seed,
                    shuffle=True,
                    shuffle_samples=True,
                    options=self.options,
                    manifest=self.manifest,
                )
                stream.load_state_dict(slot_state)  # validates it against the saved layout
                shards = stream.slot_shards(epoch)
                finished = len(shards) if slot_state["epoch"] > epoch else slot_state["shard_index"]
                for position, shard in enumerate(shards):
                    if position < finished:
                        samples = self.manifest.shards[shard].samples
                    elif position == finished and slot_state["epoch"] == epoch:
                        samples = slot_state["offset"]
                    else:
                        break
                    read[shard] = max(read.get(shard, 0), samples)
        return {shard: samples for shard, samples in read.items() if samples > 0}


class TrainLoader(ShardBatchLoader):
    """Next-item training batches (:class:`~data_pipeline.sequences.TrainBatch`, with the users' sample
    keys) of the training parts ``s[:-2]`` of this rank's users; users with fewer than 2 are skipped."""

    def __init__(
        self,
        dataset: SequenceDataset,
        stats: UserStats,
        *,
        batch_size: int,
        max_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        prefetch_factor: int = 4,
    ) -> None:
        if max_len < 2:
            raise ValueError(f"need max_len >= 2, got {max_len}")
        self.dataset, self.stats, self.max_len = dataset, stats, max_len
        super().__init__(
            dataset.url,
            dataset.users,
            stats.trainable_per_shard,
            batch_size=batch_size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            prefetch_factor=prefetch_factor,
            options=dataset.options,
        )

    def example(self, sample: Sample) -> np.ndarray | None:
        train = decode_user(sample, self.dataset.num_items)[:-2]
        return train if len(train) >= 2 else None

    def collate(self, examples: list[np.ndarray], keys: list[str]) -> TrainBatch:
        batch = collate_next_item(examples, self.max_len)
        batch.keys = tuple(keys)
        return batch


class CTRTrainLoader(ShardBatchLoader):
    """Batches (:class:`~data_pipeline.ctr.CTRBatch`) of this rank's part of a CTR data set's ``train``
    split; every impression is an example."""

    def __init__(
        self,
        dataset: CTRDataset,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        prefetch_factor: int = 4,
        options: StorageOptions | None = None,
    ) -> None:
        manifest = read_manifest(dataset.url, "train", options)
        super().__init__(
            dataset.url,
            manifest,
            np.array([entry.samples for entry in manifest.shards], dtype=np.int64),
            batch_size=batch_size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            prefetch_factor=prefetch_factor,
            options=options,
        )

    def example(self, sample: Sample) -> Any:
        return decode_ctr_sample(sample)

    def collate(self, examples: list[Any], keys: list[str]) -> CTRBatch:
        return collate_ctr(examples, keys)


def _consumed_from_state(state: dict[str, Any]) -> tuple[int, dict[int, int]] | None:
    consumed = state.get("consumed")
    if not consumed:
        return None
    return int(consumed["epoch"]), {int(k): int(v) for k, v in consumed["shards"].items()}


# -------------------------------------------------------------------------------------------- evaluation


def _eval_stream(dataset: SequenceDataset, rank: int, world_size: int) -> ShardStream:
    """This rank's users in file order (one reading slot per rank, no shuffling)."""
    return ShardStream(
        dataset.url,
        dataset.users.prefix,
        rank=rank,
        world_size=world_size,
        shuffle=False,
        options=dataset.options,
        manifest=dataset.users,
    )


def eval_batches(
    dataset: SequenceDataset,
    split: str,
    batch_size: int,
    max_len: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    max_users: int = 0,
) -> Iterator[EvalBatch]:
    """Leave-one-out evaluation batches of this rank's users, in file order.

    ``split`` is "valid" (history ``s[:-2]``, target ``s[-2]``) or "test" (history ``s[:-1]``, target
    ``s[-1]``). ``max_users`` > 0 evaluates only the first ``ceil(max_users / world_size)`` users of each
    rank (a fixed subset, the same at every evaluation).
    """
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    cut = 2 if split == "valid" else 1
    limit = -(-max_users // world_size) if max_users > 0 else math.inf
    stream = _eval_stream(dataset, rank, world_size)
    histories: list[np.ndarray] = []
    targets: list[int] = []
    seen = 0
    for sample in stream.iter_epoch():
        if seen >= limit:
            break
        seen += 1
        items = decode_user(sample, dataset.num_items)
        histories.append(items[:-cut][-max_len:])
        targets.append(int(items[-cut]))
        if len(targets) == batch_size:
            yield EvalBatch(left_pad(histories, max_len), torch.tensor(targets, dtype=torch.int64))
            histories, targets = [], []
    if targets:
        yield EvalBatch(left_pad(histories, max_len), torch.tensor(targets, dtype=torch.int64))


def eval_batch_count(
    dataset: SequenceDataset, batch_size: int, *, rank: int = 0, world_size: int = 1, max_users: int = 0
) -> int:
    """How many batches :func:`eval_batches` yields on ``rank`` (from the manifest, without reading)."""
    stream = _eval_stream(dataset, rank, world_size)
    users = sum(dataset.users.shards[i].samples for i in stream.slot_shards(0))
    if max_users > 0:
        users = min(users, -(-max_users // world_size))
    return -(-users // batch_size)


def _ignore_sigterm(worker_id: int) -> None:
    """A loader worker ignores SIGTERM. SLURM sends it to every process of a job it preempts or cancels,
    and torch's worker handler dies of it unless the parent sent it: the training process would then
    fail at its next batch instead of stopping with a checkpoint (trainer/preemption.py). The worker
    still ends with its training process (torch's watchdog) or on SIGKILL."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
