"""Stop requests: a job told to stop (a preemption or time-limit warning) checkpoints and exits cleanly.

A request comes from either

* ``run.stop_file``: the file exists. The SLURM template's batch shell creates it when it receives the
  ``--signal=B:USR1@<secs>`` warning, because torchrun does not forward SIGUSR1 to its workers;
* SIGUSR1 delivered to a training process itself (a plain ``fmrl train`` under ``srun --signal=USR1``);
* the loss of the torchrun agent that started this worker (killed, say, with ``kill -9``): its workers
  would otherwise train on headless, holding the run while a restarted job starts beside them.

The signal handler only sets a flag: leaving in the middle of a collective would hang the other ranks.
Every rank reports its flag with the step's loss all-reduce (no extra collective), so all ranks see the
request at the same step boundary; the trainer then saves a checkpoint, rank 0 deletes the stop file
(so the launcher knows the request was acted on), and it returns without the final test.
``run.resume=auto`` continues from that checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

log = logging.getLogger("fmrl")


class StopRequest:
    """Watches ``stop_file`` (if given) and SIGUSR1 while it is open (a context manager)."""

    def __init__(self, stop_file: str = "") -> None:
        self.stop_file = stop_file
        self._signalled = False
        self._previous: Any = None
        # under torchrun the parent is the elastic agent; if it dies this process is re-parented
        self._agent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        self._agent_gone = False

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGUSR1, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signalled = True

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
