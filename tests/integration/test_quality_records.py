"""bench/quality.py keeps what each finished run measured as a record in the repository and writes its report
from the records alone, so the report survives the machine that trained the runs (runs/ does not), and it
refuses to rewrite a report with fewer runs than the report already shows.

The run folders here are written the way ``fmrl train`` writes them (metrics.json, beside the bench's own
quality_run.json); the training itself is what tests/integration/test_quality_guard.py exercises.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def quality(tmp_path, monkeypatch, bench_script):
    quality = bench_script("quality")
    monkeypatch.setattr(quality, "RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(quality, "RESULTS", str(tmp_path / "results"))
    return quality


def finish_run(quality, study_name: str, seed: int, ndcg_at_256: float) -> str:
    """A run folder as a finished ``fmrl train`` and the bench leave it."""
    study = next(s for s in quality.STUDIES if s.name == study_name)
    folder = quality.run_dir(study, seed)
    os.makedirs(folder)
    sizes = quality.ML_SIZES if study.data == "ml-100k" else quality.BEAUTY_SIZES
    for override in study.overrides:  # a single-size study: model.nested_sizes=[m]
        if override.startswith("model.nested_sizes="):
            sizes = tuple(json.loads(override.split("=", 1)[1]))
    test = {str(m): {metric: ndcg_at_256 * m / sizes[-1] for metric in quality.METRICS} for m in sizes}
    metrics = {
        "test": test,
        "most_popular": {metric: 0.01 for metric in quality.METRICS},
        "epochs": 30,
        "best_epoch": 20,
        "steps": 900,
        "train_seconds": 600.0,
        "trainable_parameters": 123456,
        "train_losses": [7.2, 7.1, 7.0],
    }
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    with open(os.path.join(folder, "quality_run.json"), "w") as f:
        json.dump({"wall_seconds": 700.0, "attempts": 1}, f)
    return folder


def run_main(quality, monkeypatch, output: str, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["quality.py", "--report-only", "--output", output, *args])
    quality.main()


def test_a_finished_run_is_recorded_and_reported_after_its_folder_is_gone(quality, tmp_path, monkeypatch):
    for seed, value in ((42, 0.0450), (43, 0.0400)):
        finish_run(quality, "ml-100k", seed, value)
    output = str(tmp_path / "quality.md")
    with open(output, "w") as f:
        f.write("# quality\n")
    run_main(quality, monkeypatch, output)

    records = sorted(os.listdir(quality.RESULTS))
    assert records == ["ml-100k-s42.json", "ml-100k-s43.json"]
    record = json.load(open(os.path.join(quality.RESULTS, "ml-100k-s42.json")))
    assert record["seed"] == 42 and record["config"] == "configs/ml-100k-official.yaml"
    assert record["metrics"]["test"]["256"]["NDCG@10"] == pytest.approx(0.0450)
    assert record["bench"]["wall_seconds"] == 700.0
    assert "train_losses" not in record["metrics"]  # per-step losses stay in the run folder

    shutil.rmtree(quality.RUNS)  # a new machine: the run folders are gone, the records are not
    outcomes = quality.load_outcomes()
    assert list(outcomes) == ["ml-100k"]
    assert outcomes["ml-100k"].values(256, "NDCG@10") == pytest.approx([0.0450, 0.0400])
    assert outcomes["ml-100k"].runs[43]["wall_seconds"] == 700.0
    assert quality.reported_runs(output) == {"ml-100k-s42", "ml-100k-s43"}
    assert "| 256 | 0.0425 ± 0.0035 |" in open(output).read()

    # a record is enough: the run is not trained again
    monkeypatch.setattr(quality, "run", lambda *a, **k: pytest.fail("a recorded run was trained again"))
    quality.train(next(s for s in quality.STUDIES if s.name == "ml-100k"), 42)


def test_the_report_is_not_rewritten_with_fewer_runs_than_it_shows(quality, tmp_path, monkeypatch):
    for seed in (42, 43, 44):
        finish_run(quality, "ml-100k", seed, 0.04 + seed / 10000)
    finish_run(quality, "ml-100k-single", 42, 0.0420)
    output = str(tmp_path / "quality.md")
    with open(output, "w") as f:
        f.write("# quality\n")
    run_main(quality, monkeypatch, output)
    reported = quality.reported_runs(output)
    assert reported == {"ml-100k-s42", "ml-100k-s43", "ml-100k-s44", "ml-100k-single-s42"}

    # the records of two runs are lost (say, never committed); a third study's run is new
    os.remove(os.path.join(quality.RESULTS, "ml-100k-s44.json"))
    os.remove(os.path.join(quality.RESULTS, "ml-100k-single-s42.json"))
    shutil.rmtree(quality.RUNS)
    finish_run(quality, "ml-100k-independent-16", 42, 0.0300)
    before = open(output).read()
    with pytest.raises(SystemExit) as stopped:
        run_main(quality, monkeypatch, output)
    message = str(stopped.value)
    assert "ml-100k-s44, ml-100k-single-s42" in message and "--drop-missing-runs" in message
    assert open(output).read() == before  # nothing the user had is lost
    assert os.path.exists(os.path.join(quality.RESULTS, "ml-100k-independent-16-s42.json"))

    run_main(quality, monkeypatch, output, "--drop-missing-runs")  # asked for: written without them
    assert quality.reported_runs(output) == {"ml-100k-s42", "ml-100k-s43", "ml-100k-independent-16-s42"}


def test_nested_slices_are_compared_with_the_mean_over_the_independent_models_seeds(
    quality, tmp_path, monkeypatch
):
    for seed, value in ((42, 0.0450), (43, 0.0400)):  # nested slices at 64: 0.01125, 0.0100
        finish_run(quality, "ml-100k", seed, value)
    for seed, value in ((42, 0.0100), (43, 0.0110)):  # independent size-64 models
        finish_run(quality, "ml-100k-independent-64", seed, value)
    output = str(tmp_path / "quality.md")
    with open(output, "w") as f:
        f.write("# quality\n")
    run_main(quality, monkeypatch, output)
    report = open(output).read()
    # mean 0.010625 against mean 0.0105: +1.2 %, the independent side over both of its seeds
    assert "| 64 | 0.0106 ± 0.0009 | 0.0105 ± 0.0007 | 2 | +1.2 % |" in report
    assert "| 16 | 0.0027 ± 0.0002 | (not run) |" in report


def test_the_sampled_softmax_table_keeps_rows_that_have_no_record(
    quality, tmp_path, monkeypatch, bench_script
):
    sampled_softmax = bench_script("sampled_softmax")
    output = str(tmp_path / "scale.md")
    shutil.copy(os.path.join(REPO, "docs", "scale.md"), output)
    every = {s.name for s in [sampled_softmax.FULL, *sampled_softmax.SAMPLED]}
    assert sampled_softmax.reported_studies(output) == every  # the rows measured so far

    before = open(output).read()
    monkeypatch.setattr(sys, "argv", ["sampled_softmax.py", "--report-only", "--output", output])
    with pytest.raises(SystemExit) as stopped:
        sampled_softmax.main()
    assert "beauty-full" in str(stopped.value) and "--drop-missing-runs" in str(stopped.value)
    assert open(output).read() == before
