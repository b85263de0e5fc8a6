"""`fmrl plan` against a real job: the per-rank host memory the plan counts for a 2-rank CPU run at 1M
items is within 15 % of the peak resident memory each rank of that run reaches (its own log line), with
every part of the job on: sharded tables from birth, popularity negatives, sharded evaluation, the
best-weights snapshot, a checkpoint and the final weights.

    .venv/bin/python -m pytest -q tests/integration/test_plan_memory.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from data_pipeline.synthetic_scale import prepare_synthetic_scale

BIN = os.path.dirname(sys.executable)
TOLERANCE = 0.15

CONFIG = """\
model:
  nested_sizes: [32, 64, 128]
  num_blocks: 1
  use_text_features: true
  use_image_features: false
  use_id_embedding: true
  use_attributes: true
data:
  path: {data}
  num_workers: 0
train:
  epochs: 1
  max_steps: 4
  batch_size: 64
  max_len: 20
  loss: sampled
  num_negatives: 1024
  negative_sampling: popularity
  num_threads: 1
optim:
  warmup_steps: 1
parallel:
  backend: fsdp2
  table_sharding: column_wise
  feature_table_sharding: column_wise
  table_optimizer: adagrad
eval:
  max_users: 50
  batch_size: 50
run:
  out_dir: {out}
  name: plan-memory
  export: false
  progress_bar: false
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[str, str]:
    """(config path, run folder) of a finished 2-rank run at 1M items."""
    root = tmp_path_factory.mktemp("plan-memory")
    data = str(root / "catalog")
    prepare_synthetic_scale(
        data,
        num_items=1_000_000,
        num_users=20_000,
        num_categories=500,
        num_brands=10_000,
        text_dim=16,
        max_samples_per_shard=10_000,  # two user shards: one for each rank
    )
    config = root / "config.yaml"
    config.write_text(CONFIG.format(data=data, out=root / "runs"))
    done = subprocess.run(
        [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "trainer.cli", "train"]
        + ["--config", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return str(config), str(root / "runs" / "plan-memory")


def peak_rss_mib(run_dir: str) -> dict[int, float]:
    """Each rank's peak RSS, from its own end-of-run log line."""
    found: dict[int, float] = {}
    for name in os.listdir(run_dir):
        if re.fullmatch(r"train(-rank\d+)?\.log", name):
            for line in open(os.path.join(run_dir, name)):
                if m := re.search(r"rank (\d+): \d+ steps .* peak RSS (\d+) MiB", line):
                    found[int(m.group(1))] = float(m.group(2))
    return found


def test_plan_counts_the_peak_memory_of_each_rank_within_15_percent(job) -> None:
    config, run_dir = job
    planned = subprocess.run(
        [os.path.join(BIN, "fmrl"), "plan", "--config", config, "--world-size", "2", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert planned.returncode == 0, planned.stdout[-2000:] + planned.stderr[-3000:]
    # the plan read the catalog of the config's data set: 1M items, 10,500 attribute ids, 2 per item
    assert "1,000,000 items (the data set" in planned.stdout
    assert "| attribute | 10,501 x 128 |" in planned.stdout
    assert "the popularity sampler's 1,000,000 x float64 table" in planned.stdout
    plan_gib = float(re.search(r"Busiest rank: ([\d.]+) GiB of", planned.stdout).group(1))
    measured = peak_rss_mib(run_dir)
    assert sorted(measured) == [0, 1], measured
    for rank, mib in measured.items():
        error = (plan_gib * 1024 - mib) / mib
        assert abs(error) <= TOLERANCE, (
            f"rank {rank}: plan {plan_gib:.2f} GiB, measured peak {mib / 1024:.2f} GiB ({error:+.0%})\n"
            + planned.stdout
        )
