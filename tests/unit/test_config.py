"""Tests of trainer.config: YAML loading, dotted overrides, strict keys and types, validation, dumping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from models.fmrl.config import FMRLConfig
from trainer import config as config_module
from trainer.config import (
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    upgrade_saved_config,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---- defaults and shipped files ---------------------------------------------------------------------


def test_defaults() -> None:
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.model == FMRLConfig()
    assert cfg.data == DataConfig() and cfg.data.path == "runs/data/demo"
    assert cfg.data.features_url == "runs/data/demo/features" and cfg.data.num_workers == 1
    assert cfg.optim.lr == 1e-3 and cfg.train.epochs == 20 and cfg.train.max_steps == 0
    assert cfg.eval.ks == [5, 10, 20] and cfg.eval.exclude_history is False
    assert cfg.run.out_dir == "runs" and cfg.run.name == ""
    assert config_from_dict({}) == cfg


def test_empty_file_and_empty_section_mean_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "train:\n  # lr: 1.0\n", "b.yaml")) == Config()


def test_shipped_configs_exist() -> None:
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "beauty.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(str(path))
    assert isinstance(cfg, Config)
    # Every key in the file must have reached the config (nothing silently ignored or defaulted).
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    as_dict = config_to_dict(cfg)
    for section, values in raw.items():
        if not isinstance(values, dict):  # a top-level setting (task: dlrm)
            assert as_dict[section] == values, section
            continue
        for key, value in values.items():
            assert as_dict[section][key] == value, f"{section}.{key}"


def test_demo_config_values() -> None:
    cfg = load_config(str(REPO / "configs" / "demo.yaml"))
    assert cfg.model.nested_sizes == [8, 16, 32, 64, 128]
    assert (cfg.model.num_blocks, cfg.model.dropout, cfg.model.attn_dropout) == (2, 0.1, 0.1)
    assert (cfg.data.path, cfg.data.num_workers) == ("runs/data/demo", 0)
    t, o = cfg.train, cfg.optim
    assert (t.epochs, t.batch_size, o.lr) == (10, 32, 2e-3)
    assert (o.warmup_steps, t.patience, t.num_threads) == (50, 5, 0)
    assert isinstance(o.lr, float)
    assert cfg.eval == EvalConfig()
    assert cfg.run.out_dir == "runs"


def test_beauty_config_values() -> None:
    cfg = load_config(str(REPO / "configs" / "beauty.yaml"))
    m, d, t, o = cfg.model, cfg.data, cfg.train, cfg.optim
    assert m.nested_sizes == [8, 16, 32, 64, 128, 256, 512, 1024]
    assert (m.num_blocks, m.dropout, m.attn_dropout, m.r_min, m.r_max) == (2, 0.6, 0.6, 0.0, 0.1)
    assert d.path == "runs/data/beauty" and d.features_url == "runs/data/beauty/features"
    assert (t.epochs, t.batch_size, t.max_len, o.lr, o.weight_decay) == (500, 32, 50, 1e-4, 0.01)
    assert (o.warmup_steps, o.grad_clip, t.patience) == (100, 5.0, 10)
    assert cfg.eval.ks == [5, 10, 20]


# ---- overrides ----------------------------------------------------------------------------------------


def test_overrides_of_each_type() -> None:
    cfg = load_config(
        None,
        [
            "train.epochs=3",
            "optim.lr=3e-4",
            "eval.exclude_history=true",
            "model.nested_sizes=[8,16,32]",
            "eval.ks=[1, 10]",
            "run.out_dir=s3://bucket/runs",
        ],
    )
    assert cfg.train.epochs == 3
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.eval.exclude_history is True
    assert cfg.model.nested_sizes == [8, 16, 32]
    assert cfg.eval.ks == [1, 10]
    assert cfg.run.out_dir == "s3://bucket/runs"
    # Untouched keys keep their defaults.
    assert cfg.train.batch_size == TrainConfig().batch_size


def test_overrides_apply_on_top_of_file_in_order(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  epochs: 7\n  batch_size: 16\n")
    cfg = load_config(path, ["train.epochs=2", "train.epochs=4"])
    assert cfg.train.epochs == 4
    assert cfg.train.batch_size == 16


def test_int_accepted_for_float_and_converted() -> None:
    cfg = load_config(None, ["optim.lr=1", "optim.grad_clip=2"])
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert type(cfg.optim.grad_clip) is float


def test_yaml11_exponent_floats_are_floats(tmp_path: Path) -> None:
    # PyYAML reads "1e-3" as a string; float fields must still take it.
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1e-3\n  weight_decay: 5E-2\n"))
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.optim.weight_decay == pytest.approx(5e-2)


def test_str_override_keeps_text() -> None:
    cfg = load_config(None, ["run.name=2024", "run.out_dir=no"])
    assert cfg.run.name == "2024" and cfg.run.out_dir == "no"


@pytest.mark.parametrize("name", [".", "..", "a/..", "../x", "a/b", "/abs", "a\\b"])
def test_run_name_is_one_folder_name(name: str) -> None:
    """run.name=. with run.overwrite=true emptied run.out_dir; ../x wrote outside it."""
    with pytest.raises(ConfigError, match=r"^run.name must be one folder name inside run.out_dir"):
        RunConfig(name=name)
    with pytest.raises(ConfigError, match=r"^run.name must be one folder name"):
        load_config(None, [f"run.name={name}"])


@pytest.mark.parametrize(("saved", "upgraded"), [("a/b", "b"), ("../x", "x"), (".", ""), ("a/..", "")])
def test_a_saved_run_name_with_a_slash_still_loads(saved: str, upgraded: str) -> None:
    """A run saved before run.name had to be one folder name stays loadable (eval, export)."""
    cfg = config_from_dict(upgrade_saved_config({"run": {"name": saved}}))
    assert cfg.run.name == upgraded


@pytest.mark.parametrize("name", ["", "r1", "a.b", "..x", "my run"])
def test_run_name_accepts_folder_names(name: str) -> None:
    assert RunConfig(name=name).name == name  # "": a timestamped name is made when the run starts


@pytest.mark.parametrize("override", ["optim.lr", "=3", " =3", "optim..lr=1", ".lr=1"])
def test_malformed_override(override: str) -> None:
    with pytest.raises(ConfigError, match="invalid override") as info:
        load_config(None, [override])
    assert repr(override)[1:-1] in str(info.value)


def test_override_with_invalid_yaml_value() -> None:
    with pytest.raises(ConfigError, match=r"invalid override 'model.nested_sizes=\[8,'"):
        load_config(None, ["model.nested_sizes=[8,"])


def test_override_below_a_scalar() -> None:
    with pytest.raises(ConfigError, match="'optim.lr' is a number, not a section"):
        load_config(None, ["optim.lr.x=1"])


# ---- unknown keys -------------------------------------------------------------------------------------


def test_unknown_nested_key_in_override() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["optim.lrr=1e-3"])
    message = str(info.value)
    assert "unknown key 'optim.lrr'" in message
    assert "valid keys in 'optim': grad_accum_steps, grad_clip, lr," in message
    assert "did you mean 'lr'?" in message


def test_a_moved_key_names_its_new_place(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^'train\.lr' is now 'optim\.lr': rename it$"):
        load_config(None, ["train.lr=1e-3"])
    with pytest.raises(
        ConfigError, match=r"'parallel\.id_table_optimizer' is now 'parallel\.table_optimizer'"
    ):
        load_config(write(tmp_path, "parallel:\n  id_table_optimizer: sgd\n"))
    # a config saved by an earlier run (its config.yaml, a checkpoint marker) is read in today's keys
    old = {"train": {"lr": 0.5, "epochs": 3}, "parallel": {"id_table_lr": 0.2}}
    cfg = config_from_dict(upgrade_saved_config(old))
    assert (cfg.optim.lr, cfg.train.epochs, cfg.parallel.table_lr) == (0.5, 3, 0.2)


def test_unknown_nested_key_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, "eval:\n  exclude_histroy: true\n")
    with pytest.raises(
        ConfigError, match=r"unknown key 'eval.exclude_histroy'.*did you mean 'exclude_history'\?"
    ):
        load_config(path)


def test_unknown_model_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'model.num_block'.*did you mean 'num_blocks'\?"):
        load_config(None, ["model.num_block=3"])


def test_unknown_section_in_file_and_override(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown section 'trian'.*did you mean 'train'\?"):
        load_config(write(tmp_path, "trian:\n  lr: 0.1\n"))
    with pytest.raises(
        ConfigError,
        match=r"unknown section 'evl'.*valid sections: data, dlrm, eval, model, optim, parallel, run, task, train",
    ):
        load_config(None, ["evl.ks=[10]"])


def test_unknown_key_without_close_match_has_no_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.zzzzzz=1"])
    assert "unknown key 'train.zzzzzz'" in str(info.value)
    assert "did you mean" not in str(info.value)


# ---- types --------------------------------------------------------------------------------------------


def test_wrong_type_names_key_and_value() -> None:
    with pytest.raises(ConfigError, match=r"^train\.epochs must be an integer, got 'ten' \(a string\)$"):
        load_config(None, ["train.epochs=ten"])


@pytest.mark.parametrize("override", ["train.epochs=true", "data.num_workers=false", "optim.lr=true"])
def test_bool_rejected_for_numbers(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key} must be an? (integer|number), got (true|false)$"):
        load_config(None, [override])


def test_float_rejected_for_int() -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_size must be an integer, got 32\.5$"):
        load_config(None, ["train.batch_size=32.5"])


def test_wrong_type_for_bool_and_list_items() -> None:
    with pytest.raises(ConfigError, match=r"run\.progress_bar must be true or false, got 1$"):
        load_config(None, ["run.progress_bar=1"])
    with pytest.raises(ConfigError, match=r"eval\.ks\[1\] must be an integer, got 'x' \(a string\)$"):
        load_config(None, ["eval.ks=[5, x]"])
    with pytest.raises(ConfigError, match=r"model\.nested_sizes must be a list of integers, got 8$"):
        load_config(None, ["model.nested_sizes=8"])


def test_section_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'train' must be a mapping"):
        load_config(write(tmp_path, "train: 5\n"))
    with pytest.raises(ConfigError, match="'model' must be a mapping"):
        config_from_dict({"model": [8, 16]})


# ---- values -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("optim.lr=-1", r"^optim\.lr must be > 0, got -1\.0$"),
        ("optim.lr=.nan", r"^optim\.lr must be > 0"),
        ("train.epochs=0", r"^train\.epochs must be >= 1"),
        ("train.max_len=1", r"^train\.max_len must be >= 2"),
        ("optim.grad_clip=0", r"^optim\.grad_clip must be > 0"),
        ("eval.ks=[5, 20]", r"^eval\.ks must contain 10"),
        ("eval.ks=[]", r"^eval\.ks must not be empty"),
        ("eval.ks=[20, 10]", r"^eval\.ks must be strictly increasing"),
        ("eval.ks=[0, 10]", r"^eval\.ks must contain only positive"),
        ("data.path=", r"^data\.path must not be empty: give a dataset written by `fmrl data"),
        ("data.num_workers=-1", r"^data\.num_workers must be >= 0"),
        ("data.prefetch_factor=0", r"^data\.prefetch_factor must be >= 1"),
        ("data.source=x", r"data\.source"),
        ("eval.max_users=-1", r"^eval\.max_users must be >= 0"),
        ("run.log_every=0", r"^run\.log_every must be >= 1"),
    ],
)
def test_bad_values(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_model_errors_are_prefixed_with_model() -> None:
    with pytest.raises(ConfigError, match=r"^model\.nested_sizes .*increasing") as info:
        load_config(None, ["model.nested_sizes=[8, 32, 16]"])
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(ConfigError, match=r"^model\.dropout"):
        load_config(None, ["model.dropout=1.5"])


def test_sections_validate_on_direct_construction() -> None:
    with pytest.raises(ConfigError, match=r"^train\.epochs must be >= 1"):
        TrainConfig(epochs=0)
    with pytest.raises(
        ValueError, match=r"^lr must be > 0"
    ):  # a section of sharding/: the builder prefixes it
        OptimConfig(lr=0.0)
    with pytest.raises(ConfigError, match=r"^run\.out_dir must not be empty"):
        RunConfig(out_dir="")
    assert issubclass(ConfigError, ValueError)


# ---- files --------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not found") as info:
        load_config(path)
    assert path in str(info.value)


def test_yaml_syntax_error_names_path_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  epochs: 3\n   lr: 2\n")  # bad indentation on line 3
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert path in message
    assert "line 3" in message


@pytest.mark.parametrize(
    "text, key, lines",
    [
        ("train:\n  lr: 1e-3\nrun:\n  name: a\ntrain:\n  epochs: 3\n", "'train'", (1, 5)),
        ("train:\n  lr: 1e-3\n  epochs: 3\n  lr: 2e-3\n", "'lr'", (2, 4)),
    ],
    ids=["section", "key"],
)
def test_a_key_given_twice_is_an_error_naming_it_and_both_lines(
    tmp_path: Path, text: str, key: str, lines: tuple[int, int]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert path in message and f"key {key} appears twice" in message
    assert f"line {lines[0]} and line {lines[1]}" in message


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- train\n- eval\n")
    with pytest.raises(ConfigError, match="must contain a mapping") as info:
        load_config(path)
    assert path in str(info.value)


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    path = write(tmp_path, "run: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)


# ---- round trip and atomic dump -----------------------------------------------------------------------


def test_round_trip_through_dict() -> None:
    cfg = load_config(str(REPO / "configs" / "beauty.yaml"), ["run.name=x", "eval.exclude_history=true"])
    assert config_from_dict(config_to_dict(cfg)) == cfg
    # The dict is plain data, detached from the config.
    as_dict = config_to_dict(cfg)
    as_dict["eval"]["ks"].append(50)
    assert cfg.eval.ks == [5, 10, 20]


def test_round_trip_through_file(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "optim.lr=1e-10",
            "run.name=2024",
            "model.nested_sizes=[4, 8]",
            "run.out_dir=a b/c",
            "data.num_workers=3",
        ],
    )
    path = str(tmp_path / "config.yaml")
    dump_config(cfg, path)
    assert load_config(path) == cfg
    assert yaml.safe_load(Path(path).read_text(encoding="utf-8")) == config_to_dict(cfg)


def test_dump_leaves_no_temp_file_and_overwrites(tmp_path: Path) -> None:
    path = str(tmp_path / "config.yaml")
    dump_config(Config(), path)
    dump_config(load_config(None, ["train.epochs=9"]), path)
    assert os.listdir(tmp_path) == ["config.yaml"]
    assert load_config(path).train.epochs == 9


def test_failed_dump_keeps_old_file_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("old\n", encoding="utf-8")

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(config_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk on fire"):
        dump_config(Config(), str(path))
    monkeypatch.undo()
    assert path.read_text(encoding="utf-8") == "old\n"
    assert os.listdir(tmp_path) == ["config.yaml"]
