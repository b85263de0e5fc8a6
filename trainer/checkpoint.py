"""Sharded checkpoints with torch.distributed.checkpoint (DCP), on local disk or S3-compatible storage.

Layout under a checkpoint root (a folder or an ``s3://`` prefix)::

    step-000000200/            one DCP checkpoint: every rank writes its shards, rank 0 the metadata
        .metadata  __0_0.distcp  __1_0.distcp ...
        COMMIT                 written last, by rank 0, after every rank has finished writing
    step-000000400/ ...

A checkpoint counts only when its ``COMMIT`` exists: object stores have no atomic folder rename, so a
save that died half way leaves shards without a marker, and :meth:`CheckpointManager.latest` ignores it.
The marker (JSON) records the step, the world size, the run's resolved config and, for every file, its
size and sha256, computed by the rank that wrote it; loading checks them first, so a truncated or
corrupted file is named before DCP reads it. The newest ``keep_last`` complete checkpoints are kept
(plus the one a kept marker names as holding the best weights); older ones are deleted after a save.

``save(..., blocking=False)`` copies the state to CPU memory and writes it from a background thread,
on a gloo process group of its own, while training continues; the commit follows in that thread.

Storage that stops answering never holds a job forever. Every save runs on that thread (a blocking save
waits for it), with a deadline (``timeout``): while a save is slow a warning is logged every
``slow_warning`` seconds, and a save that misses the deadline on any rank is *abandoned* by all ranks
together: it is never committed (its thread checks before writing the marker), its folder is removed as
debris by a later save, and training goes on, trying again at the next checkpoint. A run stops with a
:class:`CheckpointError` only after ``max_abandoned`` abandoned saves in a row. A save that fails with
an error (storage refusing, a full disk) raises at once on every rank, naming the checkpoint, the cause
and, on a local disk, the free space: what rank 0 does alone (the existence check, clearing debris, the
marker) reports its outcome in the collective that follows, so no rank waits out the deadline in a
collective that a failed rank left. Loading has the same deadline. Uncommitted step folders (a save that
died with its job, an abandoned one) are removed by the next save. A damaged marker is named; resume=auto
loads the newest checkpoint whose marker reads (:meth:`CheckpointManager.latest_intact`).

What goes into a checkpoint is a :class:`TrainingState`: named objects with ``state_dict()`` /
``load_state_dict()``, saved and loaded as they are. The trainer's are the parallel model (the dense
model and optimizer: FSDP2 DTensors, DDP tensors or DeepSpeed's unpartitioned state; the TorchRec tables
and their fused optimizer state, ShardedTensors loaded in place; the schedule), the run's progress and
early-stopping state, and every rank's position (data loader, RNG) gathered into one JSON document
(trainer/state.py). When a checkpoint is due is the manager's business too (:meth:`CheckpointManager.due`).

Loading never runs arbitrary pickles. DCP pickles its ``.metadata`` and ``torch.save``s non-tensor
values; here the metadata is read by an unpickler that admits only DCP's own metadata classes, torch
sizes, dtypes and paths (anything else is refused, naming the file), and non-tensor values (our JSON
strings) are loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from data_pipeline.storage import (
    StorageOptions,
    StorageTimeoutError,
    atomic_write,
    bound_s3_retries,
    exists,
    is_remote,
    join,
    list_dir,
    open_read,
    remove,
    s3_filesystem_kwargs,
)
from trainer.dist import all_reduce_sum

log = logging.getLogger("fmrl")

COMMIT = "COMMIT"
_STEP_DIR = re.compile(r"^step-(\d{9})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the run that tries to load it."""


class _StorageHung(CheckpointError):
    """A save's storage call ran into ``StorageOptions.deadline``: :meth:`CheckpointManager.wait`
    abandons that save (as one past ``run.checkpoint_timeout``) instead of failing the job."""


# the globals a DCP .metadata pickle refers to (torch 2.13); everything else is refused
_METADATA_CLASSES = {
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    ),
}


def _existing_parent(path: str) -> str:
    path = os.path.abspath(path.removeprefix("file://"))
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _mentions_enospc(error: BaseException) -> bool:
    """Whether a full disk caused ``error`` (directly, chained, or inside a DCP failure)."""
    seen: set[int] = set()
    stack: list[BaseException] = [error]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e):
            return True
        # torch.save's zip writer reports a short write as "unexpected pos ..." rather than ENOSPC
        if "unexpected pos" in str(e):
            return True
        stack += [x for x in (e.__cause__, e.__context__) if x is not None]
        stack += [_unwrapped(x) for x in getattr(e, "failures", {}).values()]
    return False


def _unwrapped(failure: Any) -> BaseException:
    """DCP reports each rank's failure as (exception, traceback)."""
    return failure[0] if isinstance(failure, tuple) else failure


def _describe_failure(failure: Any, remote: bool = False) -> str:
    error = _unwrapped(failure)
    # on object storage a short write is a dropped connection, not a full disk
    if _mentions_enospc(error) and not (remote and "unexpected pos" in str(error)):
        return f"No space left on device ({type(error).__name__}: {error})"
    return f"{type(error).__name__}: {error}"


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f: Any, url: str) -> None:
        super().__init__(f)
        self.url = url

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise CheckpointError(
            f"{self.url}: the checkpoint metadata refers to {module}.{name}, which a DCP checkpoint never "
            "contains; refusing to load it (it may have been tampered with)"
        )


class _SafeMetadataReader:
    """Mixin for DCP's file-system readers: read .metadata with the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))  # type: ignore[attr-defined]
        with self.fs.create_stream(path, "rb") as f:  # type: ignore[attr-defined]
            metadata = _MetadataUnpickler(io.BytesIO(f.read()), str(path)).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # type: ignore[attr-defined]
        return metadata


class _SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """Non-tensor values (our JSON strings) are loaded with weights_only=True, never as full pickles."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            # torch's message advises weights_only=False, i.e. running whatever the file says: never that
            detail = next(
                (line.strip() for line in str(error).splitlines() if "unsupported global" in line.lower()), ""
            )
            raise CheckpointError(
                f"entry {read_item.dest_index.fqn!r} holds a pickle of more than plain data"
                + (f" ({detail})" if detail else "")
                + "; refusing to load it: the checkpoint was not written by fmrl or was tampered with"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _copy_to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``state`` in new CPU memory, DTensors and TorchRec ShardedTensors included (DCP's
    DefaultStager does not take ShardedTensors in torch 2.13)."""
    from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

    return _copy_state_dict(state, _create_cpu_state_dict(state))


def _fingerprint(url: str, options: StorageOptions | None) -> dict[str, Any]:
    """{"bytes": size, "sha256": hex digest} of one file, read in 8 MiB blocks."""
    digest, size = hashlib.sha256(), 0
    with open_read(url, options) as f:
        while block := f.read(8 << 20):
            digest.update(block)
            size += len(block)
    return {"bytes": size, "sha256": digest.hexdigest()}


def _fsspec_kwargs(options: StorageOptions | None) -> dict[str, Any]:
    # the same timeouts and bounded retries as every other S3 access (data_pipeline.storage)
    return {} if options is None else s3_filesystem_kwargs(options)


class TrainingState:
    """Named parts whose ``state_dict()`` entries together make one checkpoint (the entries of different
    parts must not share a key) and that take them back with ``load_state_dict()``."""

    def __init__(self, **parts: Any) -> None:
        self.parts = parts
        self._keys: dict[str, list[str]] = {}

    def state_dict(self) -> dict[str, Any]:
        """Every part's entries (live tensors: a DCP load fills them in place). Collective when a part's is."""
        state: dict[str, Any] = {}
        for name, part in self.parts.items():
            entries = part.state_dict()
            clash = state.keys() & entries.keys()
            if clash:
                raise ValueError(f"checkpoint part {name!r} repeats the entries {sorted(clash)}")
            self._keys[name] = list(entries)
            state.update(entries)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Give each part its entries back; a part none of whose entries were loaded is left as it is."""
        for name, part in self.parts.items():
            entries = {key: state[key] for key in self._keys.get(name, []) if key in state}
            if entries:
                part.load_state_dict(entries)


@dataclass
class _Save:
    """A save in flight."""

    url: str
    future: Future[None]
    start: float
    cancelled: threading.Event


class CheckpointManager:
    """Save, list and load sharded checkpoints under ``root``. Collective: every rank calls save/load."""

    def __init__(
        self,
        root: str,
        options: StorageOptions | None = None,
        keep_last: int = 3,
        *,
        every: int = 0,
        timeout: float = 600.0,
        slow_warning: float = 60.0,
        max_abandoned: int = 3,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root, self.options, self.keep_last, self.every = root.rstrip("/"), options, keep_last, every
        self.timeout, self.slow_warning, self.max_abandoned = timeout, slow_warning, max_abandoned
        self._group: Any = None
        self._executor: ThreadPoolExecutor | None = None
        self._pending: _Save | None = None
        self._abandoned_in_a_row = 0

    def url(self, step: int) -> str:
        return join(self.root, f"step-{step:09d}")

    def due(self, step: int) -> bool:
        """Whether a checkpoint is due at ``step`` between epoch ends (every ``every`` steps; 0: never).
        The trainer saves at every epoch end and when a job stops early anyway."""
        return bool(self.every) and step % self.every == 0

    def _writer(self, url: str) -> Any:
        if is_remote(url):
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

            writer = FsspecWriter(url, **_fsspec_kwargs(self.options))
            self._bound_retries(writer)
            return writer
        return dcp.FileSystemWriter(url)

    def _bound_retries(self, reader_or_writer: Any) -> None:
        """DCP's fsspec reader and writer make their own s3fs file system: the same retries as ours."""
        if self.options is not None:
            bound_s3_retries(reader_or_writer.fs.fs, self.options)

    def _reader(self, url: str) -> Any:
        if is_remote(url):
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

            class SafeFsspecReader(_SafeMetadataReader, FsspecReader):
                pass

            reader = SafeFsspecReader(url, **_fsspec_kwargs(self.options))
            self._bound_retries(reader)
            return reader

        class SafeFileSystemReader(_SafeMetadataReader, dcp.FileSystemReader):
            pass

        return SafeFileSystemReader(url)

    def save(
        self,
        step: int,
        state: TrainingState | dict[str, Any],
        info: dict[str, Any] | None = None,
        *,
        blocking: bool = True,
    ) -> str:
        """Write ``state`` (a :class:`TrainingState`, or a DCP state dict) as checkpoint ``step``; the
        commit marker goes last. Returns its URL. Collective.

        ``blocking=False`` copies ``state`` to fresh CPU memory on this thread (so training may change
        the live tensors right away) and writes, verifies and commits in a background thread; the next
        :meth:`save` or :meth:`wait` waits for it and re-raises its error. At most one save is in flight.
        A save that misses its deadline is abandoned (see the module docstring).
        """
        self.wait()
        url, start = self.url(step), time.monotonic()
        if isinstance(state, TrainingState):
            state = state.state_dict()
        group = self._process_group()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        staged = state
        if not blocking:
            staged = _copy_to_cpu(state)
            log.info(
                "checkpoint %s staged in %.2f s; writing in the background", url, time.monotonic() - start
            )
        cancelled = threading.Event()
        future = self._executor.submit(
            self._write_and_commit, url, step, staged, info or {}, group, start, cancelled
        )
        self._pending = _Save(url, future, start, cancelled)
        if blocking:
            self.wait()
        return url

    def wait(self) -> str | None:
        """Wait for the save in flight, if any (at most until its deadline); its URL once committed, None
        if it was abandoned. Its failure is raised here (as CheckpointError), and the checkpoint is not
        committed. Collective."""
        if self._pending is None:
            return None
        pending, self._pending = self._pending, None
        # a storage call that ran into its own deadline ends the save early: abandoned all the same
        finished = self._wait_for(pending) and not isinstance(pending.future.exception(), _StorageHung)
        if dist.is_initialized() and dist.get_world_size() > 1:  # all ranks abandon it, or none does
            # on the group's device: NCCL, the default group on GPUs, has no CPU tensors
            finished = float(all_reduce_sum(torch.tensor([0.0 if finished else 1.0]))[0]) == 0
        if finished:
            pending.future.result()
            self._abandoned_in_a_row = 0
            return pending.url
        hung = pending.future.exception() if pending.future.done() else None
        pending.cancelled.set()  # should its writes ever finish, the marker is not written
        # its thread and process group may stay stuck in the hung connection: the next save gets new ones
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        self._executor, self._group = None, None
        self._abandoned_in_a_row += 1
        cause = (
            f"was given up ({hung})"
            if isinstance(hung, _StorageHung)
            else f"did not finish within {self.timeout:.0f} s (storage not answering?)"
        )
        message = f"checkpoint {pending.url} {cause}: abandoned, not committed ({self._abandoned_in_a_row} in a row)"
        if self._abandoned_in_a_row >= self.max_abandoned:
            raise CheckpointError(
                f"{message}; giving up after {self.max_abandoned} abandoned saves in a row. The newest "
                f"committed checkpoint is {self.latest_or_unknown()}; resume from it once {self.root} answers"
            )
        log.error("%s; training goes on and the next checkpoint tries again", message)
        return None

    def _wait_for(self, pending: _Save) -> bool:
        """Whether the save finished (with or without an error) before its deadline; logs while slow."""
        while True:
            left = pending.start + self.timeout - time.monotonic()
            try:
                pending.future.exception(timeout=max(0.0, min(left, self.slow_warning)))
                return True
            except FutureTimeout:
                if time.monotonic() >= pending.start + self.timeout:
                    return False
                log.warning(
                    "checkpoint %s: still saving after %.0f s (gives up after %.0f s)",
                    pending.url,
                    time.monotonic() - pending.start,
                    self.timeout,
                )

    def latest_or_unknown(self) -> str:
        try:
            return self.latest() or "(none)"
        except Exception:  # the storage that just failed may not answer this either
            return "(unknown: the storage does not answer)"

    def close(self) -> None:
        """Finish the save in flight and stop the background thread."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown()
                self._executor = None

    def _redact(self, text: str) -> str:
        """Messages built from storage errors must not carry credentials."""
        return self.options.redact(text) if self.options is not None else text

    def _process_group(self) -> Any:
        """A gloo group of its own: a background save's collectives must not interleave with the
        training's on the default group. Created at the first save, which every rank reaches together."""
        if self._group is None and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")
        return self._group

    def _write_and_commit(
        self,
        url: str,
        step: int,
        state: dict[str, Any],
        info: dict[str, Any],
        group: Any,
        start: float,
        cancelled: threading.Event,
    ) -> None:
        rank = dist.get_rank(group) if group is not None else 0
        # every rank must take the same branch: rank 0 looks (and clears the debris), all follow
        if self._on_rank_0(url, group, lambda: self._prepare(url)):  # e.g. a job resumed here stops again
            log.info("checkpoint %s exists already; not overwritten", url)
            return
        try:
            dcp.save(state, storage_writer=self._writer(url), process_group=group)
        except CheckpointException as e:  # no marker is written: the previous checkpoint stays the latest
            remote = is_remote(url)
            causes = "; ".join(f"rank {r}: {_describe_failure(x, remote)}" for r, x in e.failures.items())
            probe = ""
            if rank == 0:  # every rank has stopped writing (DCP gathered the failures): drop the part
                try:
                    if exists(url, self.options):
                        remove(url, self.options, recursive=True)
                except Exception as gone:  # a dead endpoint: DCP's own error may not say so, this does
                    probe = f"; {type(gone).__name__}: {gone}"
            raise CheckpointError(
                self._redact(f"saving checkpoint {url} failed (it is not committed): {causes}{probe}")
                + self._space_note(e)
            ) from e
        # each rank fingerprints the files it wrote; rank 0 records them all in the marker
        mine: dict[str, Any] | str
        try:
            mine = self._fingerprints(url, dist.get_rank(group))
        except Exception as e:  # every rank must reach the gather, or the others hang
            mine = f"rank {dist.get_rank(group)}: {type(e).__name__}: {e}"
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, mine, group=group)
        failed = [x for x in gathered if isinstance(x, str)]
        if failed:
            raise CheckpointError(
                self._redact(f"saving checkpoint {url} failed (it is not committed): " + "; ".join(failed))
            )
        files = {name: record for part in gathered for name, record in part.items()}
        marker = {
            "step": step,
            "world_size": dist.get_world_size(group),
            "time": time.time(),
            "bytes": sum(record["bytes"] for record in files.values()),
            "files": files,
            **info,
        }
        self._on_rank_0(url, group, lambda: self._commit(url, marker, cancelled))
        log.info("checkpoint %s saved in %.1f s", url, time.monotonic() - start)

    def _on_rank_0(self, url: str, group: Any, action: Callable[[], Any]) -> Any:
        """``action()`` on rank 0, its result on every rank, and its failure raised on every rank as a
        CheckpointError naming the checkpoint and the cause. Collective: a rank that skipped the
        broadcast after a storage error would leave the others waiting in it until the save's deadline,
        and the save would then be abandoned with the cause unsaid."""
        box: list[Any] = [None]
        if group is None or dist.get_rank(group) == 0:
            try:
                box = [(True, action(), False)]
            except Exception as e:
                box = [(False, self._redact(f"{type(e).__name__}: {e}"), isinstance(e, StorageTimeoutError))]
        if group is not None:
            dist.broadcast_object_list(box, src=0, group=group)
        ok, value, timed_out = box[0]
        if timed_out:
            raise _StorageHung(f"rank 0: {value}")
        if not ok:
            raise CheckpointError(f"saving checkpoint {url} failed (it is not committed): rank 0: {value}")
        return value

    def _prepare(self, url: str) -> bool:
        """Rank 0 before a save: whether ``url`` is committed already; if not, the debris goes."""
        if self._committed_intact(url):
            return True
        self._remove_debris(keep=url)
        return False

    def _commit(self, url: str, marker: dict[str, Any], cancelled: threading.Event) -> None:
        """Rank 0 after every rank has written and fingerprinted its files: the marker, then pruning."""
        if cancelled.is_set():  # abandoned meanwhile: the job has moved on without it
            return
        with atomic_write(join(url, COMMIT), self.options) as f:
            f.write(json.dumps(marker, indent=1, sort_keys=True).encode())
        try:
            self._prune()
        except Exception as e:  # the checkpoint is committed; old ones stay until the next save prunes
            log.warning("checkpoint %s committed, but removing old checkpoints failed: %s", url, e)

    def _committed_intact(self, url: str) -> bool:
        """Whether ``url`` holds a committed checkpoint with a readable marker. One whose marker is
        damaged (resume=auto skipped it) is removed, so that this save writes the step afresh."""
        if not exists(join(url, COMMIT), self.options):
            return False
        try:
            self.marker(url)
        except CheckpointError as e:
            log.warning("replacing checkpoint %s: %s", url, e)
            remove(url, self.options, recursive=True)
            return False
        return True

    def remove_debris(self) -> None:
        """Delete uncommitted step folders left by saves that did not finish (call it on one rank, with
        no save in flight, e.g. when a job starts)."""
        self._remove_debris(keep="")

    def _remove_debris(self, keep: str) -> None:
        """Delete step folders without a commit marker (a save that died, an abandoned one), except
        ``keep`` (the save starting now): they hold no usable checkpoint and only fill the storage."""
        if not exists(self.root, self.options):
            return
        for name in list_dir(self.root, self.options):
            if not _STEP_DIR.match(name.rstrip("/").rsplit("/", 1)[-1]) or name.rstrip("/") == keep:
                continue
            if not exists(join(name, COMMIT), self.options):
                remove(name, self.options, recursive=True)
                log.warning("removed the uncommitted checkpoint folder %s (a save that did not finish)", name)

    def _space_note(self, error: BaseException) -> str:
        """For a failed local save: whether the disk is full, and how much space is left."""
        if is_remote(self.root):
            return ""
        try:
            free = shutil.disk_usage(_existing_parent(self.root)).free
        except OSError:
            return ""
        full = _mentions_enospc(error) or free < 16 * 2**20
        prefix = "; No space left on device" if full else ""
        return f"{prefix} ({self.root} has {free / 2**20:.1f} MiB free)"

    def _fingerprints(self, url: str, rank: int) -> dict[str, dict[str, Any]]:
        """Size and sha256 of the files ``rank`` wrote (DCP names them ``__<rank>_<n>.distcp``; rank 0
        also writes ``.metadata``)."""
        names = [n.rstrip("/").rsplit("/", 1)[-1] for n in list_dir(url, self.options)]
        mine = [n for n in names if n.startswith(f"__{rank}_") or (rank == 0 and n == ".metadata")]
        return {name: _fingerprint(join(url, name), self.options) for name in sorted(mine)}

    def verify(self, url: str, marker: dict[str, Any]) -> None:
        """Check every file the marker records against its size and sha256 (spread over the ranks);
        CheckpointError naming the damaged files. Markers written before fingerprints are trusted."""
        files = marker.get("files")
        if files is None:
            return
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        problems = []
        for name in sorted(files)[rank::world]:
            path, expected = join(url, name), files[name]
            try:
                found = _fingerprint(path, self.options)
            except FileNotFoundError:
                problems.append(f"{path} is missing")
                continue
            if found["bytes"] != expected["bytes"]:
                problems.append(
                    f"{path} has {found['bytes']} bytes but was saved with {expected['bytes']} (truncated?)"
                )
            elif found["sha256"] != expected["sha256"]:
                problems.append(f"{path} does not match its sha256 recorded at save time (corrupted)")
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, problems)
            problems = [p for part in gathered for p in part]
        if problems:
            raise CheckpointError(f"checkpoint {url} is damaged: " + "; ".join(sorted(problems)))

    def complete(self) -> list[tuple[int, str]]:
        """(step, url) of every committed checkpoint, oldest first."""
        if not exists(self.root, self.options):
            return []
        found = []
        for name in list_dir(self.root, self.options):
            match = _STEP_DIR.match(name.rstrip("/").rsplit("/", 1)[-1])
            if match:
                url = self.url(int(match.group(1)))
                if exists(join(url, COMMIT), self.options):
                    found.append((int(match.group(1)), url))
        return sorted(found)

    def latest(self) -> str | None:
        """The newest committed checkpoint, or None."""
        done = self.complete()
        return done[-1][1] if done else None

    def latest_intact(self) -> str | None:
        """The newest committed checkpoint whose commit marker can be read (what ``run.resume=auto``
        loads), or None. A newer one with a damaged marker is skipped with a warning naming it: its files
        cannot be checked without the marker, so it is never loaded, and never deleted either."""
        for _, url in reversed(self.complete()):
            try:
                self.marker(url)
            except CheckpointError as e:
                log.warning("skipping checkpoint %s: %s", url, e)
                continue
            return url
        return None

    def marker(self, url: str) -> dict[str, Any]:
        """The commit marker of ``url``; CheckpointError naming it if there is none (an incomplete
        checkpoint) or it is not the JSON object a save writes (a damaged file)."""
        path = join(url, COMMIT)
        if not exists(path, self.options):
            raise CheckpointError(
                f"{url} has no {COMMIT} marker: the save did not finish, it cannot be loaded"
            )
        with open_read(path, self.options) as f:
            raw = f.read()
        try:
            marker = json.loads(raw.decode("utf-8"))
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError both are ValueErrors
            raise CheckpointError(f"{path}: the commit marker is damaged (not JSON text: {e})") from None
        if not isinstance(marker, dict):
            raise CheckpointError(f"{path}: the commit marker is damaged (not the JSON object a save writes)")
        return marker

    def load(
        self, url: str, state: TrainingState | dict[str, Any], only: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """Fill ``state`` from checkpoint ``url`` (DCP reshards across world sizes where the tensors allow
        it): a DCP state dict in place, a :class:`TrainingState` part by part. ``only`` restricts it to
        those top-level entries. Returns the commit marker. Collective."""
        marker = self.marker(url)
        self.verify(url, marker)
        parts = state if isinstance(state, TrainingState) else None
        full = parts.state_dict() if parts is not None else state
        assert isinstance(full, dict)
        # the entries not asked for stay as they are (live tensors: the current state)
        state = {key: value for key, value in full.items() if key in only} if only else full
        loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-load")
        future = loader.submit(dcp.load, state, storage_reader=self._reader(url), planner=_SafeLoadPlanner())
        loader.shutdown(wait=False)
        try:
            try:
                future.result(timeout=self.timeout)
            except FutureTimeout:
                raise CheckpointError(
                    f"loading checkpoint {url} did not finish within {self.timeout:.0f} s (storage not answering?)"
                ) from None
        except CheckpointError:
            raise
        except CheckpointException as e:  # a BaseException: DCP's wrapper of every rank's failure
            causes = self._redact(
                "; ".join(f"rank {rank}: {_describe_failure(x)}" for rank, x in e.failures.items())
            )
            raise CheckpointError(f"loading checkpoint {url} failed: {causes}") from e
        except Exception as e:
            raise CheckpointError(
                self._redact(f"loading checkpoint {url} failed: {type(e).__name__}: {e}")
            ) from e
        if parts is not None:
            full.update(state)  # DCP replaced the non-tensor entries (JSON strings) in its dict
            parts.load_state_dict(full)
        return marker

    def read_full(self, url: str) -> dict[str, Any]:
        """Every value of checkpoint ``url`` as full tensors (and the JSON strings), keyed by DCP's
        flattened names (``dense.trunk.blocks.0...``, ``tables.id...``). Needs no process group: for
        export and inspection in one process, whatever world size saved it."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        marker = self.marker(url)
        self.verify(url, marker)
        reader = self._reader(url)
        metadata = reader.read_metadata()
        state: dict[str, Any] = {
            fqn: torch.empty(item.size, dtype=item.properties.dtype)
            if isinstance(item, TensorStorageMetadata)
            else ""
            for fqn, item in metadata.state_dict_metadata.items()
        }
        try:
            dcp.load(state, storage_reader=self._reader(url), planner=_SafeLoadPlanner(), no_dist=True)
        except CheckpointException as e:
            causes = self._redact("; ".join(_describe_failure(x) for x in e.failures.values()))
            raise CheckpointError(f"reading checkpoint {url} failed: {causes}") from e
        return state

    def _prune(self) -> None:
        """Delete all but the newest ``keep_last`` complete checkpoints, except one that a kept
        checkpoint names as holding the best weights (its marker's ``best_step``)."""
        done = self.complete()
        kept = done[-self.keep_last :]
        needed = set()
        for _, url in kept:
            try:
                needed.add(self.marker(url).get("best_step"))
            except CheckpointError:  # a damaged marker: resume=auto skips it, it still costs no data
                continue
        for step, url in done[: -self.keep_last]:
            if step not in needed:
                remove(url, self.options, recursive=True)
                log.info("removed old checkpoint %s", url)
