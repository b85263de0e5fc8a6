"""bench/scale_runs.py keeps what each finished run measured as a record in the repository and writes its
table from the records alone, so the table survives the machine that ran the runs (runs/ does not), and
it refuses to rewrite a table that shows runs it has no record of.

The run folder here is written the way a finished ``fmrl train`` leaves it (metrics.json, the rank logs,
a checkpoint, model.safetensors); the training itself is what the distributed tests exercise.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import pytest


@pytest.fixture
def scale_runs(tmp_path, monkeypatch, bench_script):
    scale_runs = bench_script("scale_runs")
    monkeypatch.setattr(scale_runs, "RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(scale_runs, "RESULTS", str(tmp_path / "results"))
    return scale_runs


def finish_run(scale_runs, key: str, ndcg: float) -> None:
    folder = os.path.join(scale_runs.RUNS, scale_runs.SCALE_RUNS[key].name)
    os.makedirs(os.path.join(folder, "checkpoints", "step-00000300"))
    with open(os.path.join(folder, "checkpoints", "step-00000300", "shard-0.distcp"), "wb") as f:
        f.write(b"\0" * 4096)
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(b"\0" * 2048)
    metrics = {
        "test": {"64": {"NDCG@10": ndcg, "Recall@10": 2 * ndcg}},
        "most_popular": {"NDCG@10": ndcg / 100, "Recall@10": ndcg / 50},
        "steps": 300,
        "epochs": 1,
        "trainable_parameters": 643_300_000,
    }
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    finished = time.mktime(time.strptime("2026-12-01 10:18:00", "%Y-%m-%d %H:%M:%S"))
    os.utime(os.path.join(folder, "metrics.json"), (finished, finished))
    for rank, rss in ((0, 7893), (1, 7959)):
        with open(os.path.join(folder, f"train-rank{rank}.log"), "w") as f:
            f.write(
                f"2026-12-01 10:00:00,001 INFO step 100 (1.50 steps/s)\n"
                f"2026-12-01 10:09:00,001 INFO validation NDCG@10 0.0060 (evaluated in 277.0 s)\n"
                f"2026-12-01 10:18:00,001 INFO peak RSS {rss} MiB\n"
            )


def write_table(scale_runs, monkeypatch, output: str, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["scale_runs.py", "--report-only", "--output", output, *args])
    scale_runs.main()


def row(text: str, key: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {key} |"))


def test_a_finished_run_is_recorded_and_still_reported_after_its_folder_is_gone(
    scale_runs, tmp_path, monkeypatch
):
    finish_run(scale_runs, "10m", 0.0065)
    output = str(tmp_path / "scale.md")
    with open(output, "w") as f:
        f.write("# scale\n")
    write_table(scale_runs, monkeypatch, output)

    record = json.load(open(os.path.join(scale_runs.RESULTS, "scale-10m.json")))
    assert record["ranks"] == 2 and record["config"] == "configs/scale-10m.yaml"
    assert record["date"] == "2026-12-01"  # the day the run finished, not the day of the report
    assert record["facts"]["ndcg"] == pytest.approx(0.0065)
    assert record["facts"]["peak_rss_mib"] == [7893, 7959]
    assert record["facts"]["wall_min"] == pytest.approx(18.0)
    assert "| 10m | 2 | 643.3M | 300 (1) | 1.50 | 7893-7959 MiB |" in open(output).read()
    assert "(not run yet)" in row(open(output).read(), "1m")

    shutil.rmtree(scale_runs.RUNS)  # a new machine: the run folders are gone, the record is not
    os.remove(output)
    write_table(scale_runs, monkeypatch, output)
    text = open(output).read()
    assert "0.0065 (64)" in row(text, "10m") and "100x" in row(text, "10m")
    assert f"Machine: {record['machine']}" in text and f"Date: {record['date']}" in text


def test_a_table_with_runs_that_have_no_record_is_not_rewritten(scale_runs, tmp_path, monkeypatch):
    finish_run(scale_runs, "10m", 0.0065)
    output = str(tmp_path / "scale.md")
    with open(output, "w") as f:
        f.write("# scale\n")
    write_table(scale_runs, monkeypatch, output)
    os.remove(os.path.join(scale_runs.RESULTS, "scale-10m.json"))
    shutil.rmtree(scale_runs.RUNS)
    before = open(output).read()

    with pytest.raises(SystemExit) as stopped:
        write_table(scale_runs, monkeypatch, output)
    assert "10m" in str(stopped.value) and "--drop-missing-runs" in str(stopped.value)
    assert open(output).read() == before

    write_table(scale_runs, monkeypatch, output, "--drop-missing-runs")
    assert "(not run yet)" in row(open(output).read(), "10m")


def test_the_proof_run_keeps_its_plan_start_up_resume_export_and_funnel(scale_runs, tmp_path, monkeypatch):
    finish_run(scale_runs, "20m", 0.0040)
    folder = os.path.join(scale_runs.RUNS, "scale-20m")
    with open(os.path.join(folder, "train.log"), "a") as f:
        f.write(
            "2026-12-01 10:00:02,001 INFO [rank 0] rank 0 start-up 12.3 s: features opened 0.0 s\n"
            "2026-12-01 10:05:00,001 INFO [rank 0] resumed from /x/checkpoints/step-000000150 at step 150 "
            "(epoch 1)\n"
        )
    with open(f"{folder}.plan.txt", "w") as f:
        f.write("## 2 x cpu\nBusiest rank: 7.00 GiB of 64 GiB host memory (all of the above)\n")
    with open(os.path.join(folder, "bench-export.json"), "w") as f:
        json.dump({"code": 0, "seconds": 95.0, "peak_rss_mib": 3100.0, "gib": 3.2}, f)
    deploy = {
        "users": 200,
        "size": 32,
        "funnel": {"prefix": 8, "candidates": 200},
        "num_items": 20_000_000,
        "load_seconds": 9.0,
        "recall10_exact": 0.02,
        "recall10_funnel": 0.015,
        "funnel_overlap_with_exact_top10": 0.6,
        "ms_per_user_exact": 80.0,
        "ms_per_user_funnel": 30.0,
        "peak_rss_mib": 2900.0,
        "torch_threads": 1,
    }
    with open(os.path.join(folder, "bench-deploy.json"), "w") as f:
        json.dump(deploy, f)
    output = str(tmp_path / "scale.md")
    with open(output, "w") as f:
        f.write("# scale\n")
    write_table(scale_runs, monkeypatch, output)

    facts = json.load(open(os.path.join(scale_runs.RESULTS, "scale-20m.json")))["facts"]
    assert facts["plan_busiest_rank_gib"] == 7.0 and "Busiest rank" in facts["plan"]
    assert facts["startup_seconds"] == [12.3] and facts["resumed_at"] == [150]
    assert facts["export"]["seconds"] == 95.0 and facts["deploy"] == deploy
    shutil.rmtree(scale_runs.RUNS)  # the second table too comes from the record alone
    write_table(scale_runs, monkeypatch, output)
    proof = next(line for line in open(output).read().splitlines() if line.startswith("| 20m | 7.00 GiB"))
    # plan 7.00 GiB = 7,168 MiB against the ranks' 7,893 and 7,959 MiB
    assert "| 7.71-7.77 GiB | -9.9% to -9.2% | 12.3 s | 150 |" in proof
    assert "8,32: 3.20 GiB, 95 s, 3,100 MiB" in proof
    assert "Recall@10 0.015 through the funnel (prefix 8, 200 candidates), 0.020 exact" in proof
    assert "60% of exact top 10 found; 30.0 against 80.0 ms per user" in proof
