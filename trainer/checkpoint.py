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

What goes into a checkpoint is assembled by the trainer (:func:`trainer.train.training_state`): the
dense model and optimizer (FSDP2 DTensors or DDP tensors, through
``torch.distributed.checkpoint.state_dict``), the TorchRec item tables and their fused optimizer state
(ShardedTensors, loaded in place), the schedule, and per-rank positions (data loader, RNG) gathered into
one JSON document.

Loading never runs arbitrary pickles. DCP pickles its ``.metadata`` and ``torch.save``s non-tensor
values; here the metadata is read by an unpickler that admits only DCP's own metadata classes, torch
sizes, dtypes and paths (anything else is refused, naming the file), and non-tensor values (our JSON
strings) are loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from data_pipeline.storage import (
    StorageOptions,
    atomic_write,
    exists,
    is_remote,
    join,
    list_dir,
    open_read,
    remove,
    s3_filesystem_kwargs,
)

log = logging.getLogger("fmrl")

COMMIT = "COMMIT"
_STEP_DIR = re.compile(r"^step-(\d{9})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the run that tries to load it."""


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

        obj = torch.load(value, weights_only=True)
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


class CheckpointManager:
    """Save, list and load sharded checkpoints under ``root``. Collective: every rank calls save/load."""

    def __init__(self, root: str, options: StorageOptions | None = None, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root, self.options, self.keep_last = root.rstrip("/"), options, keep_last
        self._group: Any = None
        self._executor: ThreadPoolExecutor | None = None
        self._pending: tuple[str, Future[None]] | None = None

    def url(self, step: int) -> str:
        return join(self.root, f"step-{step:09d}")

    def _writer(self, url: str) -> Any:
        if is_remote(url):
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

            return FsspecWriter(url, **_fsspec_kwargs(self.options))
        return dcp.FileSystemWriter(url)

    def _reader(self, url: str) -> Any:
        if is_remote(url):
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

            class SafeFsspecReader(_SafeMetadataReader, FsspecReader):
                pass

            return SafeFsspecReader(url, **_fsspec_kwargs(self.options))

        class SafeFileSystemReader(_SafeMetadataReader, dcp.FileSystemReader):
            pass

        return SafeFileSystemReader(url)

    def save(
        self, step: int, state: dict[str, Any], info: dict[str, Any] | None = None, *, blocking: bool = True
    ) -> str:
        """Write ``state`` as checkpoint ``step``; the commit marker goes last. Returns its URL.

        ``blocking=False`` copies ``state`` to fresh CPU memory on this thread (so training may change
        the live tensors right away) and writes, verifies and commits in a background thread; the next
        :meth:`save` or :meth:`wait` waits for it and re-raises its error. At most one save is in flight.
        """
        self.wait()
        url, start = self.url(step), time.monotonic()
        if exists(join(url, COMMIT), self.options):  # e.g. a job resumed at this step stops again
            log.info("checkpoint %s exists already; not overwritten", url)
            return url
        group = self._process_group()
        if blocking:
            self._write_and_commit(url, step, state, info or {}, group, start)
            return url
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        staged = _copy_to_cpu(state)
        log.info("checkpoint %s staged in %.2f s; writing in the background", url, time.monotonic() - start)
        assert self._executor is not None
        self._pending = (
            url,
            self._executor.submit(self._write_and_commit, url, step, staged, info or {}, group, start),
        )
        return url

    def wait(self) -> str | None:
        """Wait for the asynchronous save in flight, if any; its URL once committed. Its failure is
        raised here (as CheckpointError), and the checkpoint is not committed."""
        if self._pending is None:
            return None
        url, future = self._pending
        self._pending = None
        future.result()
        return url

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
        self, url: str, step: int, state: dict[str, Any], info: dict[str, Any], group: Any, start: float
    ) -> None:
        try:
            dcp.save(state, storage_writer=self._writer(url), process_group=group)
        except CheckpointException as e:  # no marker is written: the previous checkpoint stays the latest
            causes = self._redact(
                "; ".join(f"rank {rank}: {type(x).__name__}: {x}" for rank, x in e.failures.items())
            )
            raise CheckpointError(f"saving checkpoint {url} failed (it is not committed): {causes}") from e
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
        if dist.get_rank(group) == 0:
            marker = {
                "step": step,
                "world_size": dist.get_world_size(group),
                "time": time.time(),
                "bytes": sum(record["bytes"] for record in files.values()),
                "files": files,
                **info,
            }
            with atomic_write(join(url, COMMIT), self.options) as f:
                f.write(json.dumps(marker, indent=1, sort_keys=True).encode())
            self._prune()
        dist.barrier(group=group)
        log.info("checkpoint %s saved in %.1f s", url, time.monotonic() - start)

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

    def marker(self, url: str) -> dict[str, Any]:
        """The commit marker of ``url``; CheckpointError if there is none (an incomplete checkpoint)."""
        path = join(url, COMMIT)
        if not exists(path, self.options):
            raise CheckpointError(
                f"{url} has no {COMMIT} marker: the save did not finish, it cannot be loaded"
            )
        with open_read(path, self.options) as f:
            return json.loads(f.read())

    def load(self, url: str, state: dict[str, Any], only: tuple[str, ...] = ()) -> dict[str, Any]:
        """Fill ``state`` in place from checkpoint ``url`` (DCP reshards across world sizes where the
        tensors allow it); ``only`` restricts it to those top-level keys. Returns the commit marker."""
        marker = self.marker(url)
        self.verify(url, marker)
        if only:
            state = {key: value for key, value in state.items() if key in only}
        try:
            dcp.load(state, storage_reader=self._reader(url), planner=_SafeLoadPlanner())
        except CheckpointError:
            raise
        except CheckpointException as e:  # a BaseException: DCP's wrapper of every rank's failure
            causes = self._redact(
                "; ".join(f"rank {rank}: {type(x).__name__}: {x}" for rank, x in e.failures.items())
            )
            raise CheckpointError(f"loading checkpoint {url} failed: {causes}") from e
        except Exception as e:
            raise CheckpointError(
                self._redact(f"loading checkpoint {url} failed: {type(e).__name__}: {e}")
            ) from e
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
            causes = self._redact("; ".join(f"{type(x).__name__}: {x}" for x in e.failures.values()))
            raise CheckpointError(f"reading checkpoint {url} failed: {causes}") from e
        return state

    def _prune(self) -> None:
        """Delete all but the newest ``keep_last`` complete checkpoints, except one that a kept
        checkpoint names as holding the best weights (its marker's ``best_step``)."""
        done = self.complete()
        kept = done[-self.keep_last :]
        needed = {self.marker(url).get("best_step") for _, url in kept}
        for step, url in done[: -self.keep_last]:
            if step not in needed:
                remove(url, self.options, recursive=True)
                log.info("removed old checkpoint %s", url)
