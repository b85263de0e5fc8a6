"""How a process of this project ends: normally, or without interpreter finalisation once it has used a
gloo process group (``exit_process``). Kept free of torch imports: the CLI imports it to exit."""

from __future__ import annotations

import atexit
import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

_joined_a_group = False


def mark_group_joined() -> None:
    """Called by trainer/dist.py when this process initialises a process group."""
    global _joined_a_group
    _joined_a_group = True


def exit_process(code: int) -> NoReturn:
    """End this process with exit status ``code``.

    A process that used a gloo group ends without interpreter finalisation. DDP and FSDP2 keep the
    process group's C++ object alive after ``destroy_process_group`` (torch 2.13; a two-rank job shows
    the ``pt_gloo_runloop`` and ``gloo_tcp_loop`` threads still running in its atexit handlers), so its
    threads are torn down while the interpreter finalises, and now and then one of them takes the
    process down with "terminate called without an active exception" (SIGABRT): torchrun then reports a
    finished job as failed. Here the atexit handlers run as usual (log handlers, TensorBoard writers,
    temporary folders), the standard streams are flushed, and ``os._exit`` skips the finalisation.
    Other processes exit normally.
    """
    if not _joined_a_group:
        sys.exit(code)
    atexit._run_exitfuncs()  # what the interpreter would run first on its way out
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can reach it
            pass
    os._exit(code)


def run_as_process(main: Callable[[], int | None]) -> NoReturn:
    """Run a process's ``main`` and end it through ``exit_process``: its return value (None: 0) is the
    exit status; ``sys.exit(code)`` inside it keeps its meaning; an uncaught exception prints its
    traceback and exits with 1, as Python would."""
    try:
        code = main() or 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:  # sys.exit("message"): Python prints the message and exits with 1
            print(stop.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        code = 130  # the shell's convention for a process stopped by Ctrl-C
    except BaseException:  # the process ends here either way; print what Python would have printed
        traceback.print_exc()
        code = 1
    exit_process(code)
