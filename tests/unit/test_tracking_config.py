"""run.loggers and the MLflow keys: validation that names the key, old configs upgraded, MLflow-safe keys."""

from __future__ import annotations

import pytest

from trainer.config import ConfigError, config_to_dict, load_config, upgrade_saved_config
from trainer.tracking import mlflow_key


def test_loggers_default_and_choices() -> None:
    assert load_config(None, []).run.loggers == ["tensorboard"]
    assert load_config(None, ["run.loggers=[tensorboard, mlflow]"]).run.loggers == ["tensorboard", "mlflow"]
    assert load_config(None, ["run.loggers=[]"]).run.loggers == []


def test_a_bad_logger_is_an_error_naming_the_key() -> None:
    with pytest.raises(
        ConfigError, match=r"run\.loggers\[1\] must be one of 'tensorboard', 'mlflow', got 'wandb'"
    ):
        load_config(None, ["run.loggers=[tensorboard, wandb]"])
    with pytest.raises(ConfigError, match=r"run\.loggers repeats a name"):
        load_config(None, ["run.loggers=[mlflow, mlflow]"])
    with pytest.raises(ConfigError, match=r"run\.mlflow_tracking_uri must be a URI"):
        load_config(None, ["run.mlflow_tracking_uri=runs/mlruns"])


def test_the_replaced_tensorboard_key_says_what_to_write() -> None:
    with pytest.raises(ConfigError, match=r"'run\.tensorboard' was replaced by run\.loggers"):
        load_config(None, ["run.tensorboard=false"])


def test_saved_configs_with_run_tensorboard_are_upgraded() -> None:
    saved = config_to_dict(load_config(None, []))
    del saved["run"]["loggers"]
    assert (
        upgrade_saved_config({**saved, "run": {**saved["run"], "tensorboard": False}})["run"]["loggers"] == []
    )
    on = upgrade_saved_config({**saved, "run": {**saved["run"], "tensorboard": True}})
    assert on["run"]["loggers"] == ["tensorboard"] and "tensorboard" not in on["run"]


def test_mlflow_keys() -> None:
    assert mlflow_key("valid_size_32/NDCG@10") == "valid_size_32/NDCG_at_10"
    assert mlflow_key("train/sequences_per_s") == "train/sequences_per_s"
    assert mlflow_key("a+b") == "a_b"
