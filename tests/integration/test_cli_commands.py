"""The commands around training, as a user runs them (real subprocesses of `fmrl` on tiny real runs):
`fmrl eval` reproduces the end-of-training metrics from saved weights (fMRL per nested size, DLRM AUC and
log loss), `fmrl recommend` prints the export's top-k in the data's own item ids, and the data commands end
with a readable summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline.synthetic_ctr import prepare_synthetic_ctr
from trainer.cli import main
from trainer.export import load_recommender

REPO = Path(__file__).resolve().parents[2]
COMMON = [
    "data.num_workers=0",
    "train.epochs=1",
    "train.num_threads=1",
    "run.progress_bar=false",
    "run.loggers=[]",
]


def fmrl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainer.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.fixture(scope="module")
def fmrl_run(tiny_dataset, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("runs")
    overrides = [*COMMON, f"data.path={tiny_dataset}", f"run.out_dir={out}", "run.name=r"]
    assert main(["train", *overrides, "model.nested_sizes=[8,16,32]", "train.batch_size=32"]) == 0
    return str(out / "r")


def test_eval_of_a_run_prints_the_end_of_training_table(fmrl_run) -> None:
    done = fmrl("eval", fmrl_run)
    assert done.returncode == 0, done.stderr
    table = Path(fmrl_run, "test_metrics.txt").read_text().strip()
    assert table in done.stdout  # the same numbers from the saved weights, baseline row included
    assert done.stdout.startswith(f"test metrics of {fmrl_run} (per nested size")


def test_eval_of_a_checkpoint_on_the_validation_split_with_overrides(fmrl_run) -> None:
    done = fmrl("eval", f"{fmrl_run}/checkpoints", "--split", "valid", "eval.max_users=40", "--eval.ks=[10]")
    assert done.returncode == 0, done.stderr
    header = next(line for line in done.stdout.splitlines() if line.strip().startswith("size"))
    assert header.split() == ["size", "NDCG@10", "Recall@10", "MRR@10"]
    assert {line.split()[0] for line in done.stdout.splitlines()[3:] if line.strip()} >= {"8", "16", "32"}
    # the saved weights fix the model: changing it is refused, naming the override
    refused = fmrl("eval", fmrl_run, "model.num_blocks=3")
    assert refused.returncode == 2
    assert refused.stderr.startswith("fmrl eval: config error: 'model.num_blocks=3': the saved weights fix")


def test_eval_of_a_dlrm_run(tmp_path) -> None:
    data = str(tmp_path / "ctr")
    prepare_synthetic_ctr(data, rows=2000, seed=0, hash_buckets=50, max_samples_per_shard=1000)
    settings = ["task=dlrm", "dlrm.embedding_dim=8", "dlrm.bottom_mlp=[16,8]", "dlrm.top_mlp=[16,1]"]
    run = ["train", *COMMON, *settings, f"data.path={data}", f"run.out_dir={tmp_path}", "run.name=d"]
    assert main([*run, "train.batch_size=256", "eval.batch_size=500", "run.export=false"]) == 0
    done = fmrl("eval", str(tmp_path / "d"))
    assert done.returncode == 0, done.stderr
    saved = json.loads((tmp_path / "d" / "metrics.json").read_text())["test"]
    row = next(line for line in done.stdout.splitlines() if line.startswith("DLRM"))
    auc, logloss = (float(v) for v in row.split()[1:3])
    assert auc == pytest.approx(saved["auc"], abs=1e-4) and logloss == pytest.approx(
        saved["logloss"], abs=1e-4
    )


def test_recommend_prints_the_top_k_in_source_ids(fmrl_run) -> None:
    export = f"{fmrl_run}/export"
    recommender = load_recommender(export, 16)
    history = [12, 7, 33]
    _, ids = recommender.recommend([history], k=5)
    expected = recommender.source_ids(ids)[0]
    source = [recommender.item_ids[i] for i in history]
    done = fmrl("recommend", fmrl_run, "--history", ",".join(source), "--size", "16", "--k", "5")
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[2:]]
    assert [row[1] for row in rows] == expected and [int(row[0]) for row in rows] == [1, 2, 3, 4, 5]
    # internal ids give the same list; the largest size is the default
    internal = fmrl("recommend", export, "--history", "12,7,33", "--internal-ids", "--k", "5")
    assert internal.returncode == 0 and "(size 32, " in internal.stdout
    _, largest = load_recommender(export, 32).recommend([history], k=5)
    assert [int(line.split()[1]) for line in internal.stdout.splitlines()[2:]] == largest[0].tolist()
    # an id the export does not know is a one-line usage error naming it
    bad = fmrl("recommend", export, "--history", "no-such-item")
    assert bad.returncode == 2
    assert bad.stderr.startswith("fmrl recommend: error: --history: 'no-such-item' not in the export's 150")


def test_data_commands_end_with_a_readable_summary(tmp_path) -> None:
    done = fmrl(
        "data", "prepare-synthetic-ctr", str(tmp_path / "ctr"), "--rows", "1000", "--shard-size", "500"
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "click data set synthetic-ctr written"
    labels = {line.split()[0]: line for line in lines[1:]}
    assert set(labels) == {"dataset", "impressions", "click", "tables", "time"}
    assert (
        str(tmp_path / "ctr") in labels["dataset"]
        and "1,000 (train 800, valid 100, test 100)" in labels["impressions"]
    )
    values = [line.index(line.split()[-1]) for line in lines[1:] if len(line.split()) == 2]
    assert len(set(values)) == 1  # aligned
    assert "CTRSummary(" not in done.stdout


def test_features_ends_with_a_readable_summary(tiny_dataset) -> None:
    # the tiny data set's parts are there already (the session made them): nothing is encoded again
    done = fmrl("features", tiny_dataset, "--image-size", "32", "--chunk-size", "64")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "item features: tables written"
    assert lines[1].split() == ["features", f"{tiny_dataset}/features"]
    assert lines[2].split()[:2] == ["items", "150"] and "0 encoded, 3 already there" in lines[3]
    assert "FeaturesSummary(" not in done.stdout
