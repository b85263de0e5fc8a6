"""Sharded checkpoints with torch.distributed.checkpoint (DCP), on local disk or S3-compatible storage.

Layout under a checkpoint root (a folder or an ``s3://`` prefix)::

    step-000000200/            one DCP checkpoint: every rank writes its shards, rank 0 the metadata
        .metadata  __0_0.distcp  __1_0.distcp ...
        COMMIT                 written last, by rank 0, after every rank has finished writing
    step-000000400/ ...

A checkpoint counts only when its ``COMMIT`` exists: object stores have no atomic folder rename, so a
save that died half way leaves shards without a marker, and :meth:`CheckpointManager.latest` ignores it.
The newest ``keep_last`` complete checkpoints are kept; older ones are deleted after a successful save.

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

import io
import json
import logging
import pickle
import re
import time
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


def _fsspec_kwargs(options: StorageOptions | None) -> dict[str, Any]:
    if options is None:
        return {}
    client_kwargs = {
        k: v for k, v in (("endpoint_url", options.endpoint_url), ("region_name", options.region)) if v
    }
    kwargs: dict[str, Any] = {"client_kwargs": client_kwargs}
    for name in ("key", "secret", "token"):
        if getattr(options, name):
            kwargs[name] = getattr(options, name)
    return kwargs


class CheckpointManager:
    """Save, list and load sharded checkpoints under ``root``. Collective: every rank calls save/load."""

    def __init__(self, root: str, options: StorageOptions | None = None, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root, self.options, self.keep_last = root.rstrip("/"), options, keep_last

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

    def save(self, step: int, state: dict[str, Any], info: dict[str, Any] | None = None) -> str:
        """Write ``state`` as checkpoint ``step``; the commit marker goes last. Returns its URL."""
        url = self.url(step)
        start = time.monotonic()
        try:
            dcp.save(state, storage_writer=self._writer(url))
        except CheckpointException as e:  # no marker is written: the previous checkpoint stays the latest
            causes = "; ".join(f"rank {rank}: {type(x).__name__}: {x}" for rank, x in e.failures.items())
            raise CheckpointError(f"saving checkpoint {url} failed (it is not committed): {causes}") from e
        dist.barrier()  # every rank's shards are written before the marker says so
        if dist.get_rank() == 0:
            marker = {"step": step, "world_size": dist.get_world_size(), "time": time.time(), **(info or {})}
            with atomic_write(join(url, COMMIT), self.options) as f:
                f.write(json.dumps(marker, indent=1, sort_keys=True).encode())
            self._prune()
        dist.barrier()
        log.info("checkpoint %s saved in %.1f s", url, time.monotonic() - start)
        return url

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

    def load(self, url: str, state: dict[str, Any]) -> dict[str, Any]:
        """Fill ``state`` in place from checkpoint ``url`` (DCP reshards across world sizes where the
        tensors allow it). Returns the commit marker."""
        marker = self.marker(url)
        try:
            dcp.load(state, storage_reader=self._reader(url), planner=_SafeLoadPlanner())
        except CheckpointError:
            raise
        except CheckpointException as e:  # a BaseException: DCP's wrapper of every rank's failure
            causes = "; ".join(f"rank {rank}: {type(x).__name__}: {x}" for rank, x in e.failures.items())
            raise CheckpointError(f"loading checkpoint {url} failed: {causes}") from e
        except Exception as e:
            raise CheckpointError(f"loading checkpoint {url} failed: {type(e).__name__}: {e}") from e
        return marker

    def _prune(self) -> None:
        for _, url in self.complete()[: -self.keep_last]:
            remove(url, self.options, recursive=True)
            log.info("removed old checkpoint %s", url)
