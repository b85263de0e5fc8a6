"""The project's logs: one line format on the terminal and in each run's log file, the libraries' known
noise filtered, and the progress bars.

* :func:`configure_logging` (called once by ``fmrl``'s ``main``): the ``fmrl`` logger writes to stderr
  through a handler of its own, ``2026-05-04 12:00:00,123 INFO [rank 1] message`` (the rank only under
  torchrun), and does not propagate to the root logger. Libraries configure the root logger as they
  please (fbgemm_gpu calls ``logging.basicConfig()`` on import, which turns a propagated line into
  ``INFO:fmrl:message``); our lines keep their format whatever they do. Libraries' own warnings go
  through the root logger at WARNING.
* :func:`run_log_file`: while a run is in progress, every record of the ``fmrl`` logger, DEBUG
  included, is appended to ``<run dir>/train.log`` (rank 0) or ``<run dir>/train-rank<N>.log`` (rank N,
  created only if that rank logs something); a run that fails records its traceback there. A resumed
  run appends to the same file; a run that replaces an earlier one (``run.overwrite``) holds its records
  in memory until the earlier run is deleted, then writes them to a new file.
* :func:`quiet_library_noise`: message-specific filters for the warnings that TorchRec and torch print
  on every run and that need no action from a user (each filter says why it is safe). Anything else,
  from the same libraries too, still shows.
* :func:`progress_bar`: the training and evaluation progress bars (tqdm, rank 0).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import resource
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

LOGGER = "fmrl"
LOG_FILE = "train.log"
_T = TypeVar("_T")


def log_file_name(rank: int) -> str:
    """The log file of ``rank`` in a run folder: ``train.log`` for rank 0, ``train-rank<N>.log`` else."""
    return LOG_FILE if rank == 0 else f"train-rank{rank}.log"


class LogFormatter(logging.Formatter):
    """``<time> <LEVEL> [rank N] <message>``; the rank is shown in jobs of more than one process (read
    from torchrun's ``RANK`` / ``WORLD_SIZE``)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(rank_prefix)s%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        record.rank_prefix = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
        return super().format(record)


class _ConsoleHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The ``fmrl`` logger's terminal handler (a class of its own, so that a second call replaces it)."""


def configure_logging(debug: bool = False) -> None:
    """The ``fmrl`` logger on stderr in the project's format (INFO, or DEBUG with ``debug``), independent
    of the root logger; libraries' records at WARNING and above on the root logger; the known library
    noise filtered. Safe to call again (the handler is replaced, not added)."""
    logger = logging.getLogger(LOGGER)
    for handler in [h for h in logger.handlers if isinstance(h, _ConsoleHandler)]:
        logger.removeHandler(handler)
    console = _ConsoleHandler(sys.stderr)
    console.setFormatter(LogFormatter())
    console.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.addHandler(console)
    logger.setLevel(logging.DEBUG)  # the handlers choose: the terminal INFO, a run's log file DEBUG
    logger.propagate = False
    # libraries' own records (WARNING and above); a no-op when a library configured the root already
    root_handler = logging.StreamHandler(sys.stderr)
    root_handler.setFormatter(LogFormatter())
    logging.basicConfig(level=logging.WARNING, handlers=[root_handler])
    quiet_library_noise()


class _HeldRecords(logging.Handler):
    """Keeps records in memory (a run log held back while run.overwrite's earlier run is still there)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class RunLog:
    """This rank's log file of a run (:func:`run_log_file`)."""

    def __init__(self, path: str, file: logging.FileHandler | None, held: _HeldRecords | None) -> None:
        self.path, self.file, self.held = path, file, held
        self.handler: logging.Handler | None = held or file
        if self.handler is not None:
            logging.getLogger(LOGGER).addHandler(self.handler)

    def write_held(self) -> None:
        """Write the records held back so far to the file, and every later one directly."""
        if self.held is None or self.file is None:
            return
        logger = logging.getLogger(LOGGER)
        logger.removeHandler(self.held)
        for record in self.held.records:
            self.file.handle(record)
        self.held, self.handler = None, self.file
        logger.addHandler(self.file)

    def close(self) -> None:
        if self.handler is not None:
            logging.getLogger(LOGGER).removeHandler(self.handler)
        if self.file is not None:
            self.file.close()


@contextlib.contextmanager
def run_log_file(run_dir: str, rank: int, hold: bool = False) -> Iterator[RunLog]:
    """Append every ``fmrl`` record (DEBUG and above) to this rank's log file in ``run_dir`` (see
    :func:`log_file_name`) for the duration of the block; an exception leaving the block is recorded
    with its traceback. A rank on a host that does not see ``run_dir`` (another node without a shared
    file system) keeps no file. With ``hold`` (``run.overwrite``: the file is the earlier run's until it
    is deleted) the records stay in memory until :meth:`RunLog.write_held`; a block left before that
    writes nothing, so a failed start leaves the earlier run's log as it was (the failure is on the
    terminal)."""
    path = os.path.join(run_dir, log_file_name(rank))
    if not os.path.isdir(run_dir):
        yield RunLog(path, None, None)
        return
    logger = logging.getLogger(LOGGER)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8", delay=hold or rank != 0)
    handler.setFormatter(LogFormatter())
    handler.setLevel(logging.DEBUG)
    level = logger.level
    if logger.getEffectiveLevel() > logging.DEBUG:
        logger.setLevel(
            logging.DEBUG
        )  # not set up by configure_logging (a test, a script): the file wants all
    run_log = RunLog(path, handler, _HeldRecords() if hold else None)
    try:
        yield run_log
    except BaseException as error:
        logger.debug("the run ended with %s", type(error).__name__, exc_info=True)
        raise
    finally:
        run_log.close()
        logger.setLevel(level)


# --------------------------------------------------------------------------------- library noise

# Warnings raised with `warnings.warn`: (message regex, category). Each matches one message only.
_WARNING_FILTERS: list[tuple[str, type[Warning]]] = [
    # TorchRec's planner builds a HeuristicalStorageReservation when none is given and warns that it may
    # over-estimate the dense tensors' size in a *dry run* (no tensors materialised). Our plans are made
    # on the real model, and the reservation only bounds the per-rank memory budget of the plan, which
    # sharding/ fixes per table anyway (ParameterConstraints); `fmrl launch --dry-run` plans nothing.
    (r"HeuristicalStorageReservation is known to cause issues", FutureWarning),
    # torch 2.13 deprecated DistributedDataParallel's `broadcast_buffers` argument; TorchRec 1.8 still
    # passes broadcast_buffers=False when it wraps data-parallel tables (table_sharding=data_parallel).
    # The behaviour is unchanged in this torch version; nothing a user can act on.
    (r"`broadcast_buffers` is deprecated", FutureWarning),
    # TorchRec's tables are ShardedTensors, and reading a sharded table's full value (saving the best
    # weights, the export) goes through them; torch announces DTensor as their successor. Nothing to
    # change on our side until TorchRec moves its tables to DTensor.
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
]

# Records of library loggers: logger name -> message regex. Each matches one message only.
_LOGGER_FILTERS: dict[str, str] = {
    # sharding/ builds TorchRec's Topology from the job's world size, local world size and device (what
    # TopologyFactory would resolve); TorchRec 1.8 warns about every direct construction. The pinned
    # version does not fail (see docs/training.md, "Logs"); revisit when TorchRec is upgraded.
    "torchrec.distributed.planner.types": r"The topology was constructed directly rather than via",
    # The same planner, on the same reservation as above: the dense size estimate matters in dry runs.
    "torchrec.distributed.planner.storage_reservations": r"There is a known issue with TorchRec's dense "
    r"tensor size calculation in dry run",
    # torch.fx notes (once per process) that is_fx_tracing() is also true under torch.export; TorchRec's
    # modules call it on every forward. We neither trace nor export with torch.fx.
    "torch.fx._symbolic_trace": r"is_fx_tracing will return true for both fx.symbolic_trace and torch.export",
}


class _DropMessage(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_library_noise() -> None:
    """Install the message-specific filters above (idempotent)."""
    for message, category in _WARNING_FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, pattern in _LOGGER_FILTERS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropMessage(pattern))


# --------------------------------------------------------------------------------- progress bars


def progress_bar(iterable: Iterable[_T], *, total: int, desc: str, enabled: bool, initial: int = 0) -> Any:
    """A tqdm bar over ``iterable`` (``total`` items, ``initial`` of them done already) if ``enabled``,
    cleared when done; iterate it, and ``set_postfix`` on it. Redrawn rarely when stderr is not a
    terminal: redraws flood the log files of batch jobs and CI."""
    from tqdm import tqdm

    return tqdm(
        iterable,
        total=total,
        initial=initial,
        desc=desc,
        disable=not enabled,
        leave=False,
        mininterval=0.1 if sys.stderr.isatty() else 30.0,
    )


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_mib() -> float:
    """This process's resident memory now, in MiB (where /proc is not there: the peak so far, which is
    no less)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mib()


class StartupPhases:
    """Wall time of each phase of a rank's start-up, logged in one line by :meth:`report`::

    rank 0 start-up 41.2 s: features opened 0.4 s, users scanned 3.1 s, ...; RSS 1290 MiB, peak 1290 MiB
    """

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.started = self.last = time.perf_counter()
        self.phases: list[tuple[str, float]] = []

    def done(self, phase: str) -> None:
        """``phase`` ended now (it began where the previous one ended)."""
        now = time.perf_counter()
        self.phases.append((phase, now - self.last))
        self.last = now

    def report(self) -> None:
        parts = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in self.phases)
        logging.getLogger("fmrl").info(
            "rank %d start-up %.1f s: %s; RSS %.0f MiB, peak %.0f MiB",
            self.rank,
            self.last - self.started,
            parts,
            resident_mib(),
            peak_rss_mib(),
        )
