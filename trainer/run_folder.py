"""Run folders: a finished run is never overwritten, and one job at a time trains into a folder.

Which folder a job uses (``run.out_dir`` / ``run.name``):

* a new name: a new folder;
* a name whose folder holds a run (a ``config.yaml``, checkpoints, weights or metrics): refused (saying
  so when a job is training in it), unless the job resumes it (``run.resume=auto`` or a checkpoint URL)
  or says ``run.overwrite=true``, which replaces the earlier run: the lease below is held while the new
  job starts, and the earlier run is deleted (:func:`empty_run_folder`) only once the new start-up has
  passed every check (trainer/train.py, ``claim_run_folder``), so a start that fails leaves it as it was;
* ``run.name`` is one folder name (trainer/config.py refuses ``/``, ``\\``, ``.`` and ``..``), and
  :func:`empty_run_folder` empties nothing but a run folder directly inside ``run.out_dir``;
* no name: a new timestamped folder; with ``run.resume=auto``, the newest run in ``run.out_dir`` trained
  with the same config (every section but ``run``), so that the same command resumes its own run after a
  crash or a requeue.

The job holds a *lease* on the run folder (``.lease``, and ``.lease`` in ``run.checkpoint_dir`` when the
checkpoints go elsewhere): JSON naming the host, process and start time, refreshed every
:data:`HEARTBEAT_S` seconds by a background thread of rank 0 and deleted at the end. A second job on the
same run is refused with a message naming the holder. A lease whose holder is gone is taken over (with a
warning): on the same host, its process no longer exists; elsewhere, its heartbeat is older than
:data:`LEASE_TTL_S`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from data_pipeline.storage import StorageOptions, atomic_write, exists, join, open_read, remove

log = logging.getLogger("fmrl")

LEASE = ".lease"
HEARTBEAT_S = 30.0
LEASE_TTL_S = 180.0
"""A lease whose heartbeat is older than this (and whose holder cannot be checked on this host) is stale."""
RUN_MARKERS = ("config.yaml", "checkpoints", "model.safetensors", "metrics.json", "export")


class RunFolderError(RuntimeError):
    """The run folder cannot be used by this job; the message says why and what to do."""


@dataclass(frozen=True)
class RunFolder:
    """The run folder of a job, the same on every rank."""

    path: str
    replaces: bool = False
    """It holds an earlier run that ``run.overwrite`` replaces: deleted once the new start-up has passed
    every check, not before."""


def holds_run(folder: str) -> bool:
    """Whether ``folder`` holds (part of) a training run."""
    return any(os.path.exists(os.path.join(folder, name)) for name in RUN_MARKERS)


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config without its ``run`` section: what "the same config" means for ``run.resume=auto``."""
    return {key: value for key, value in config.items() if key != "run"}


def latest_run_of(out_dir: str, config: dict[str, Any]) -> str | None:
    """The newest run folder in ``out_dir`` whose ``config.yaml`` equals ``config`` (but for ``run``)."""
    import yaml

    if not os.path.isdir(out_dir):
        return None
    wanted = _comparable(config)
    found: list[tuple[float, str]] = []
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name, "config.yaml")
        try:
            with open(path, encoding="utf-8") as f:
                saved = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(saved, dict) and _comparable(saved) == wanted:
            found.append((_last_activity(os.path.join(out_dir, name)), name))
    return os.path.join(out_dir, max(found)[1]) if found else None


def _last_activity(folder: str) -> float:
    times = [os.path.getmtime(os.path.join(folder, "config.yaml"))]
    checkpoints = os.path.join(folder, "checkpoints")
    if os.path.isdir(checkpoints):
        times += [os.path.getmtime(os.path.join(checkpoints, n)) for n in os.listdir(checkpoints)]
    return max(times)


def choose_run_folder(
    out_dir: str, name: str, resume: str, overwrite: bool, config: dict[str, Any]
) -> tuple[str, bool]:
    """The run folder of this job and whether it must be emptied first (``run.overwrite``). Raises
    :class:`RunFolderError` for a folder that holds a run the job may not touch. Rank 0 only."""
    if "://" in out_dir:
        raise RunFolderError(f"run.out_dir must be a local path for now, got {out_dir!r}")
    if not name:
        if resume == "auto":
            previous = latest_run_of(out_dir, config)
            if previous is not None:
                return previous, False
        name = time.strftime("fmrl-%Y%m%d-%H%M%S")
        base, suffix = name, 1
        while os.path.exists(os.path.join(out_dir, name)):  # two runs started in the same second
            suffix += 1
            name = f"{base}-{suffix}"
        return os.path.join(out_dir, name), False
    folder = os.path.join(out_dir, name)
    if not holds_run(folder) or resume:
        return folder, False
    if overwrite:
        return folder, True
    holder = live_holder(folder)
    if holder is not None:
        raise RunFolderError(
            f"run folder {folder} holds a run that is in use by {_describe(holder)}: wait for that job to "
            "end, or start a new run with another run.name"
        )
    raise RunFolderError(
        f"run folder {folder} holds a run already: continue it with run.resume=auto, start a new one with "
        "another run.name, or replace it with run.overwrite=true (its checkpoints, weights and exports are "
        "deleted once the new start-up has passed its checks)"
    )


def empty_run_folder(folder: str, out_dir: str) -> None:
    """Delete everything in the run folder ``folder`` but the lease (``run.overwrite``). Refuses
    (:class:`RunFolderError`) anything that is not a run folder directly inside ``out_dir``: not a link,
    not ``out_dir`` itself, holding a run. Whatever path led here, nothing else is emptied."""
    real, parent = os.path.realpath(folder), os.path.realpath(out_dir)
    if os.path.islink(folder) or real == parent or os.path.dirname(real) != parent or not holds_run(real):
        raise RunFolderError(
            f"refusing to empty {folder}: run.overwrite empties only a run folder directly inside "
            f"run.out_dir={out_dir}"
        )
    for name in os.listdir(folder):
        if name == LEASE:
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def _holder() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job": os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or "",
        "token": secrets.token_hex(8),
        "started": time.time(),
        "heartbeat": time.time(),
    }


def _describe(holder: dict[str, Any]) -> str:
    job = f", job {holder['job']}" if holder.get("job") else ""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"process {holder.get('pid')} on host {holder.get('host')}{job} (started {started})"


def live_holder(folder: str) -> dict[str, Any] | None:
    """The holder of the lease on the local run folder ``folder`` (host, pid ...) if it may still be
    running, else None."""
    try:
        with open(os.path.join(folder, LEASE), encoding="utf-8") as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and _alive(holder) else None


def _alive(holder: dict[str, Any]) -> bool:
    """Whether a lease's holder may still be running (a lease of this very process is left from an
    earlier run in it: runs in one process follow each other)."""
    if holder.get("host") == socket.gethostname():
        if holder.get("pid") == os.getpid():
            return False
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, KeyError, TypeError, ValueError):
            return True
        return True
    return time.time() - float(holder.get("heartbeat", 0)) < LEASE_TTL_S


class RunLease:
    """This job's lease on a run folder (and its checkpoint location); rank 0 acquires and releases it."""

    def __init__(self, locations: list[str], options: StorageOptions | None = None) -> None:
        self.urls = [join(location, LEASE) for location in dict.fromkeys(locations)]
        self.options = options
        self.holder = _holder()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self, url: str) -> dict[str, Any] | None:
        if not exists(url, self.options):
            return None
        try:
            with open_read(url, self.options) as f:
                data = json.loads(f.read())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}  # unreadable: treated like a lease of an unknown holder

    def _write(self, url: str) -> None:
        with atomic_write(url, self.options) as f:
            f.write(json.dumps(self.holder).encode())

    def acquire(self) -> None:
        for url in self.urls:
            current = self._read(url)
            if current is not None and current.get("token") != self.holder["token"]:
                if _alive(current):
                    raise RunFolderError(
                        f"{url}: this run is in use by {_describe(current)}; two jobs must not train into "
                        "one run. Wait for it to end, or use another run.name. If that job is gone, "
                        f"delete {url} (a lease on another host expires {LEASE_TTL_S:.0f} s after its "
                        "last heartbeat)"
                    )
                log.warning("taking over the stale lease %s of %s", url, _describe(current))
            self._write(url)
            time.sleep(0.05)  # two jobs taking over one stale lease: the later write wins, the other sees it
            if (self._read(url) or {}).get("token") != self.holder["token"]:
                raise RunFolderError(
                    f"{url}: another job took this run at the same moment; use another run.name"
                )
        self._thread = threading.Thread(target=self._heartbeat, name="fmrl-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.holder["heartbeat"] = time.time()
            for url in self.urls:
                with contextlib.suppress(Exception):  # a missed heartbeat is not worth failing the run
                    self._write(url)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for url in self.urls:
            with contextlib.suppress(Exception):
                if (self._read(url) or {}).get("token") == self.holder["token"]:
                    remove(url, self.options)
