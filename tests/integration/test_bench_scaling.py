"""bench/scaling.py runs end to end on 1 and 2 gloo ranks (a smoke test; its numbers are not checked).

.venv/bin/python -m pytest -q tests/integration/test_bench_scaling.py
"""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEADER = (
    "| backend | ranks | threads/rank | ms/step, median (range) | sequences/s | peak RSS per rank (MiB) |"
)


def test_quick_run_prints_the_table(tmp_path):
    output = tmp_path / "benchmarks.md"
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "bench", "scaling.py"),
            "--quick",
            "--no-write",
            "--backends",
            "fsdp2",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert HEADER in done.stdout
    assert "| fsdp2 | 1 | 2 |" in done.stdout and "| fsdp2 | 2 | 1 |" in done.stdout
    assert "<!-- bench/scaling.py:begin -->" in done.stdout and "<!-- bench/scaling.py:end -->" in done.stdout
    assert not output.exists(), "--no-write must not write the section"
