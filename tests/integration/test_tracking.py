"""Experiment tracking (run.loggers): MLflow gets the same scalars as TensorBoard, the resolved config
and the report's files, in a local store (continued on resume) and on a real `mlflow server`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import yaml

from trainer.config import load_config
from trainer.tracking import MLFLOW_RUN_FILE, default_tracking_uri, mlflow_key
from trainer.train import train

TINY = [
    "data.num_workers=0",
    "model.nested_sizes=[8,16,32]",
    "train.epochs=1",
    "train.batch_size=32",
    "optim.warmup_steps=2",
    "train.num_threads=1",
    "eval.batch_size=64",
    "run.progress_bar=false",
    "run.export=false",
    "run.log_every=1",
]
REPORT = {"config.yaml", "test_metrics.txt", "metrics.json", "metrics_by_size.png", "train.log"}


def mlflow_run_id(run_dir) -> str:
    with open(os.path.join(run_dir, MLFLOW_RUN_FILE)) as f:
        return json.load(f)["run_id"]


def tensorboard_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_mlflow_local_store_logs_what_tensorboard_does_and_continues_on_resume(
    tmp_path, tiny_dataset
) -> None:
    from mlflow import MlflowClient

    overrides = [
        *TINY,
        "train.epochs=2",
        f"data.path={tiny_dataset}",
        f"run.out_dir={tmp_path}",
        "run.name=tracked",
        "run.loggers=[tensorboard,mlflow]",
    ]
    assert train(load_config(None, [*overrides, "run.stop_after_steps=3"])).stopped
    run_dir = tmp_path / "tracked"
    run_id = mlflow_run_id(run_dir)
    client = MlflowClient(default_tracking_uri(str(tmp_path)))
    assert client.get_run(run_id).info.status == "KILLED"  # stopped, to be resumed
    result = train(load_config(None, [*overrides, "run.resume=auto"]))

    assert mlflow_run_id(run_dir) == run_id  # the resumed job continued the same MLflow run
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    experiment = client.get_experiment_by_name("fmrl")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert experiment.artifact_location == f"{tmp_path}/mlartifacts"

    # the same scalars as TensorBoard, at the same steps, with the same values
    scalars = tensorboard_scalars(run_dir)
    assert {"train/loss", "valid_size_32/NDCG@10", "test_size_8/Recall@10"} <= set(scalars)
    assert set(run.data.metrics) == {mlflow_key(tag) for tag in scalars}
    for tag, points in scalars.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, mlflow_key(tag)))
        assert [s for s, _ in history] == [s for s, _ in points], tag
        assert [v for _, v in history] == pytest.approx([v for _, v in points], rel=1e-6), tag
    assert len(scalars["train/loss"]) == result.steps  # both jobs' steps (run.log_every=1)

    # the resolved config as parameters and as a file; the report's files
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert run.data.params["optim.lr"] == str(saved["optim"]["lr"])
    assert run.data.params["model.nested_sizes"] == "[8, 16, 32]"
    assert {a.path for a in client.list_artifacts(run_id)} == REPORT
    table = client.download_artifacts(run_id, "test_metrics.txt", str(tmp_path / "download"))
    assert open(table).read() == (run_dir / "test_metrics.txt").read_text()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (SQLite store, artefacts served through it); its URL."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "mlflow-server.log", "wb")
    command = [
        os.path.join(os.path.dirname(sys.executable), "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{tmp_path}/server.db",
        "--artifacts-destination",
        str(tmp_path / "server-artifacts"),
    ]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy for 127.0.0.1
    deadline = time.monotonic() + 180
    try:
        while True:
            assert process.poll() is None, (tmp_path / "mlflow-server.log").read_text()[-3000:]
            try:
                with opener.open(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer /health"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, 15)  # the server and its workers
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
        log.close()


def test_a_run_logs_to_a_real_mlflow_server(tmp_path, tiny_dataset, mlflow_server) -> None:
    from mlflow import MlflowClient

    overrides = [
        *TINY,
        f"data.path={tiny_dataset}",
        f"run.out_dir={tmp_path}",
        "run.name=served",
        "run.loggers=[mlflow]",
        f"run.mlflow_tracking_uri={mlflow_server}",
        "run.mlflow_experiment=served-test",
    ]
    result = train(load_config(None, overrides))
    run_dir = tmp_path / "served"
    assert not (run_dir / "tensorboard").exists()

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("served-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == mlflow_run_id(run_dir)
    assert run.info.status == "FINISHED" and run.info.run_name == "served"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, result.steps + 1))
    assert run.data.metrics["test_size_32/NDCG_at_10"] == pytest.approx(result.test_metrics[32]["NDCG@10"])
    assert run.data.params["run.mlflow_experiment"] == "served-test"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == REPORT
    plot = client.download_artifacts(run.info.run_id, "metrics_by_size.png", str(tmp_path / "download"))
    assert open(plot, "rb").read() == (run_dir / "metrics_by_size.png").read_bytes()
