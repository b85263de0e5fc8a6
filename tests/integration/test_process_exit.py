"""How a process ends (trainer/process_exit.py): one that used a gloo group skips interpreter
finalisation, where the process group's leftover threads can abort it, but keeps its exit status, its
atexit handlers and its buffered output; any other process exits as Python would."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import atexit, os, sys

    from trainer.process_exit import run_as_process

    MARKS = sys.argv[1]


    def mark(name):
        with open(os.path.join(MARKS, name), "w") as f:
            f.write(name)


    class Finalised:
        # runs while the interpreter finalises its modules (by then the module's names may be gone)
        def __del__(self, open=open, path=os.path.join(MARKS, "finalised")):
            with open(path, "w") as f:
                f.write("finalised")


    KEEP = Finalised()
    atexit.register(mark, "atexit")


    def main():
        mode = sys.argv[2]
        if mode.startswith("group"):
            import torch

            from trainer.dist import distributed

            with distributed():
                # DDP keeps the group's C++ object (and its gloo threads) alive past destroy_process_group
                model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
                model(torch.ones(3, 4)).sum().backward()
        sys.stdout.write("buffered output, no newline")  # must still reach the pipe
        if mode.endswith("raise"):
            raise ValueError("a bug")
        if mode.endswith("message"):
            sys.exit("fmrl: stopped with a message")
        return 3


    run_as_process(main)
    """
)


def run(tmp_path, mode: str) -> subprocess.CompletedProcess:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path), mode], capture_output=True, text=True, timeout=120
    )


def test_a_process_that_used_a_gloo_group_keeps_status_output_and_atexit_but_skips_finalisation(tmp_path):
    done = run(tmp_path, "group")
    assert done.returncode == 3, done.stderr
    assert done.stdout == "buffered output, no newline"
    assert (tmp_path / "atexit").exists()  # log handlers, TensorBoard writers, temporary folders: all run
    assert not (tmp_path / "finalised").exists()  # the finalisation (where the abort happens) is skipped


def test_an_uncaught_exception_in_a_group_process_prints_its_traceback_and_exits_1(tmp_path):
    done = run(tmp_path, "group-raise")
    assert done.returncode == 1
    assert "ValueError: a bug" in done.stderr and "Traceback" in done.stderr
    assert (tmp_path / "atexit").exists()


def test_a_process_without_a_group_exits_as_python_does(tmp_path):
    done = run(tmp_path, "plain")
    assert done.returncode == 3
    assert done.stdout == "buffered output, no newline"
    assert (tmp_path / "atexit").exists() and (tmp_path / "finalised").exists()
    stopped = run(tmp_path, "plain-message")
    assert stopped.returncode == 1 and "fmrl: stopped with a message" in stopped.stderr
