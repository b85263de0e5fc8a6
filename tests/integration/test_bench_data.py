"""bench/data.py runs end to end on a tiny dataset (a smoke test; its numbers are not checked).

.venv/bin/python -m pytest -q tests/integration/test_bench_data.py
"""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEADINGS = (
    "<!-- bench/data.py:begin -->",
    "### Training loader",
    "| storage | workers | samples/s |",
    "### Item shards",
    "### Feature extraction",
    "### Training consumption (demo) and the 10x requirement",
    "### 1M-item generation",
    "<!-- bench/data.py:end -->",
)


def test_quick_run_prints_every_table(tmp_path):
    output = tmp_path / "benchmarks.md"
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "bench", "data.py"),
            "--quick",
            "--no-write",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    for heading in HEADINGS:
        assert heading in done.stdout, heading
    for storage in ("| local | 0 |", "| local | 2 |", "| S3 (moto) | 0 |", "| S3 (moto) | 2 |"):
        assert storage in done.stdout, storage
    assert "sequences/s" in done.stdout and "items/s" in done.stdout
    assert not output.exists(), "--no-write must not write the section"
