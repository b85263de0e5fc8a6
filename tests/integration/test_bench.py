"""The bench scripts run end to end in their --quick mode (smoke tests; their numbers are not checked),
and --no-write leaves docs/benchmarks.md alone.

.venv/bin/python -m pytest -q tests/integration/test_bench.py
"""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_quick(tmp_path, script: str, *args: str, timeout: int = 180) -> str:
    """stdout of ``bench/<script> --quick --no-write``; fails if it exits non-zero or writes anything."""
    output = tmp_path / "benchmarks.md"
    command = [
        sys.executable,
        os.path.join(REPO, "bench", script),
        "--quick",
        "--no-write",
        "--output",
        str(output),
    ]
    done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    assert not output.exists(), "--no-write must not write the section"
    return done.stdout


def test_data_bench_prints_every_table(tmp_path):
    out = run_quick(tmp_path, "data.py")
    for heading in (
        "<!-- bench/data.py:begin -->",
        "### Training loader",
        "| storage | workers | samples/s |",
        "### Item shards",
        "### Feature extraction",
        "### Training consumption (demo) and the 10x requirement",
        "### 1M-item generation",
        "<!-- bench/data.py:end -->",
    ):
        assert heading in out, heading
    for storage in ("| local | 0 |", "| local | 2 |", "| S3 (moto) | 0 |", "| S3 (moto) | 2 |"):
        assert storage in out, storage
    assert "sequences/s" in out and "items/s" in out


def test_scaling_bench_prints_the_table(tmp_path):
    out = run_quick(tmp_path, "scaling.py", "--backends", "fsdp2")
    assert (
        "| backend | ranks | threads/rank | ms/step, median (range) | sequences/s | peak RSS per rank (MiB) |"
        in out
    )
    assert "| fsdp2 | 1 | 2 |" in out and "| fsdp2 | 2 | 1 |" in out
    assert "<!-- bench/scaling.py:begin -->" in out and "<!-- bench/scaling.py:end -->" in out


def test_checkpoint_bench_prints_the_table(tmp_path):
    out = run_quick(tmp_path, "checkpoint.py")
    assert "<!-- bench/checkpoint.py:begin -->" in out and "<!-- bench/checkpoint.py:end -->" in out
    assert "## Checkpoints: save and load (`bench/checkpoint.py`)" in out
    assert "| config | ranks | storage | MB (files) | sync save | load |" in out
    assert "| demo | 1 | local disk |" in out and "| demo | 1 | S3 (moto) |" in out
    assert "The loaded weights equal the saved ones." in out


def test_dlrm_bench_prints_the_tables(tmp_path):
    out = run_quick(tmp_path, "dlrm.py")
    assert "<!-- bench/dlrm.py:begin -->" in out and "<!-- bench/dlrm.py:end -->" in out
    assert (
        "| implementation | ranks | threads/rank | ms/step, median (range) | samples/s | peak RSS per rank (MiB) |"
        in out
    )
    assert "| implementation | ranks | train loss, last pass | test AUC | test log loss | NE |" in out
    section = out[out.index("<!-- bench/dlrm.py:begin -->") :]
    for implementation in ("ours (FSDP2)", "TorchRec DLRM (DDP)"):
        for ranks, threads in ((1, 2), (2, 1)):
            assert f"| {implementation} | {ranks} | {threads} |" in section, (implementation, ranks)  # speed
            assert section.count(f"| {implementation} | {ranks} |") == 2, (implementation, ranks)  # + AUC


def test_ctr_models_bench_prints_the_table_and_the_claims(tmp_path):
    out = run_quick(tmp_path, "ctr_models.py", timeout=600)  # 2 torchrun jobs training 7 models each
    assert "<!-- bench/ctr_models.py:begin -->" in out and "<!-- bench/ctr_models.py:end -->" in out
    section = out[out.index("<!-- bench/ctr_models.py:begin -->") :]
    header = (
        "| model | table params | dense params | MFLOPs/sample | samples/s, 1 rank | samples/s, 2 ranks |"
    )
    assert header in section
    for model in (
        "DLRM",
        "Wide & Deep",
        "Wide & Deep + true crosses",
        "DeepFM",
        "DCN (v1)",
        "DCN v2",
        "xDeepFM",
    ):
        assert f"| {model} | " in section, model
    assert "| claim (DLRM paper, §2–3) | measured here | verdict |" in section
    for claim in ("most computationally efficient", "the CIN is the most expensive", "hand-made crosses"):
        assert claim in section, claim
