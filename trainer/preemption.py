"""Stop requests: a job told to stop (a preemption, a time limit, a cancel) checkpoints and exits cleanly.

A request comes from either

* ``run.stop_file``: the file exists. The SLURM template's batch shell creates it when it receives the
  ``--signal=B:USR1@<secs>`` warning, because torchrun does not forward SIGUSR1 to its workers;
* SIGUSR1 delivered to a training process itself (a plain ``fmrl train`` under ``srun --signal=USR1``);
* SIGTERM delivered to a training process itself: what SLURM sends to every process of a job it
  preempts, cancels (``scancel``) or ends at its time limit, and what the torchrun agent forwards to its
  workers at once when it gets SIGTERM (torch 2.13, torch/distributed/elastic/agent/server/api.py:
  ``SimpleElasticAgent.run`` catches its ``SignalException`` and closes the workers with the same
  signal, then SIGKILLs them after ``--shutdown-timeout``, env ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``,
  30 s by default). SIGTERM also starts a grace clock of ``run.stop_grace_s``: a process that has not
  committed its stop checkpoint by then (no step boundary came: a long validation, the final test, a
  step slower than the grace) logs that it leaves without one, releases the run's lease and exits 1,
  before the sender's SIGKILL would end it unannounced. Training since the newest committed checkpoint
  is then lost; there is no checkpoint of half a step;
* the loss of the torchrun agent that started this worker (killed, say, with ``kill -9``): its workers
  would otherwise train on headless, holding the run while a restarted job starts beside them.

The signal handler only sets a flag: leaving in the middle of a collective would hang the other ranks.
Every rank reports its flag with the step's loss all-reduce (no extra collective), so all ranks see the
request at the same step boundary; the trainer then saves a checkpoint, rank 0 deletes the stop file
(so the launcher knows the request was acted on), and it returns without the final test: the process
exits 0 (it stopped as asked, its work kept). ``run.resume=auto`` continues from that checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("fmrl")

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
"""The signals a training process turns into a stop request."""

GRACE_EXPIRED_EXIT_CODE = 1

_terminated = threading.Event()


def terminated() -> bool:
    """Whether this process has received SIGTERM while a :class:`StopRequest` was open: its launcher
    (torchrun, SLURM) is ending the job."""
    return _terminated.is_set()


"""Exit status of a process whose stop grace ran out before its checkpoint: a failure while running."""


class StopRequest:
    """Watches ``stop_file`` (if given), SIGUSR1 and SIGTERM while it is open (a context manager).

    ``grace_s`` bounds the time from SIGTERM to a committed stop checkpoint (see the module docstring);
    :meth:`stopped` tells it the checkpoint is committed, :meth:`on_grace_expired` adds what must still
    be done when the grace runs out (release the run's lease)."""

    def __init__(self, stop_file: str = "", grace_s: float = 20.0) -> None:
        self.stop_file = stop_file
        self.grace_s = grace_s
        self._signalled = False
        self._previous: dict[int, Any] = {}
        # under torchrun the parent is the elastic agent; if it dies this process is re-parented
        self._agent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        self._agent_gone = False
        self._grace: threading.Timer | None = None
        self._stopped = threading.Event()
        self._at_expiry: list[Callable[[], None]] = []

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        if self._grace is not None:
            self._grace.cancel()

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signalled = True
        if signum == signal.SIGTERM:
            _terminated.set()
        if signum == signal.SIGTERM and self._grace is None:
            # a thread, so that the grace runs out even while the main thread validates or tests
            self._grace = threading.Timer(self.grace_s, self._grace_expired)
            self._grace.daemon = True
            self._grace.start()
            log.warning(
                "SIGTERM received: stopping at the next step boundary with a checkpoint (run.stop_grace_s=%g)",
                self.grace_s,
            )

    def on_grace_expired(self, action: Callable[[], None]) -> None:
        """Run ``action`` (from another thread) if the SIGTERM grace runs out before :meth:`stopped`."""
        self._at_expiry.append(action)

    def stopped(self) -> None:
        """The stop checkpoint is committed: the grace clock, if running, has nothing left to guard."""
        self._stopped.set()
        if self._grace is not None:
            self._grace.cancel()

    def _grace_expired(self) -> None:
        if self._stopped.is_set():
            return
        log.error(
            "SIGTERM received %g s ago and no step boundary was reached within run.stop_grace_s: exiting "
            "without a stop checkpoint (run.resume=auto continues from the newest committed one)",
            self.grace_s,
        )
        for action in self._at_expiry:
            try:
                action()
            except Exception:  # the exit must not wait on what could not be tidied
                log.debug("while exiting after the stop grace", exc_info=True)
        for handler in log.handlers:
            handler.flush()
        sys.stderr.flush()
        # the main thread may be inside a collective or a native call: it cannot be unwound from here
        os._exit(GRACE_EXPIRED_EXIT_CODE)

    def agent_gone(self) -> bool:
        """Whether the torchrun agent that started this worker has died (checked now)."""
        if self._agent is not None and not self._agent_gone and os.getppid() != self._agent:
            self._agent_gone = True
            log.error(
                "the torchrun agent (pid %d) that started this worker is gone: stopping after a checkpoint "
                "instead of training on without it",
                self._agent,
            )
        return self._agent_gone

    def local(self) -> bool:
        """Whether this process has been asked to stop (before the ranks agree)."""
        return (
            self._signalled or (bool(self.stop_file) and os.path.exists(self.stop_file)) or self.agent_gone()
        )
