"""Typed, validated run configuration: YAML files plus dotted command-line overrides.

A config is a tree of keyword-only dataclasses (``Config`` with one section per concern). YAML is read
with ``yaml.safe_load``, overrides such as ``optim.lr=3e-4`` are applied on top of it, and one generic
builder turns the resulting plain mapping into the dataclasses, checking every key and type against the
fields' type hints. Value checks live in each section's ``__post_init__``. Every error is a
``ConfigError`` that names the full dotted key, so a typo on the command line is reported as precisely as
one in a file.

Supported field types: int, float, bool, str, list[...] of those, and nested dataclasses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import itertools
import os
import re
import secrets
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, get_args, get_origin, get_type_hints

import yaml

from models.dlrm.config import DLRMConfig
from models.fmrl.config import FMRLConfig
from sharding.config import OptimConfig, ParallelConfig

if TYPE_CHECKING:
    from data_pipeline.storage import StorageOptions

__all__ = [
    "PATH_KEYS",
    "TASKS",
    "Config",
    "ConfigError",
    "DLRMSection",
    "DataConfig",
    "EvalConfig",
    "OptimConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "load_saved_config",
    "field_docs",
    "show_config",
    "with_overrides",
    "upgrade_saved_config",
    "with_absolute_paths",
]


_T = TypeVar("_T")


class ConfigError(ValueError):
    """An invalid config file, override, key, type or value; the message names the dotted key."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# Written as `value >= minimum` passing (not `value < minimum` failing) so that NaN is rejected too.
def _at_least(key: str, value: float, minimum: float) -> None:
    _require(value >= minimum, f"{key} must be >= {minimum}, got {value!r}")


def _positive(key: str, value: float) -> None:
    _require(value > 0, f"{key} must be > 0, got {value!r}")


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")


@dataclass(kw_only=True)
class DataConfig:
    """Where the dataset and its frozen item features are, and how they are read."""

    path: str = "runs/data/demo"
    """The dataset (local path or s3:// URL) written by `fmrl data prepare-synthetic` / `convert-*`;
    the default is where `make demo` prepares the synthetic demo catalog."""
    features: str = ""
    """The feature tables written by `fmrl features`; "" means <path>/features."""
    num_workers: int = 1
    """DataLoader worker processes per rank reading the user shards; 0 reads in the training process."""
    prefetch_factor: int = 4
    """Batches each worker keeps ready."""
    s3_endpoint_url: str = ""
    """S3-compatible endpoint for s3:// URLs; "" takes FSSPEC_S3_ENDPOINT_URL / AWS_ENDPOINT_URL."""

    def __post_init__(self) -> None:
        _require(
            self.path != "",
            "data.path must not be empty: give a dataset written by `fmrl data prepare-synthetic OUT` "
            "(or convert-*), e.g. data.path=runs/data/demo",
        )
        _at_least("data.num_workers", self.num_workers, 0)
        _at_least("data.prefetch_factor", self.prefetch_factor, 1)

    @property
    def features_url(self) -> str:
        return self.features or self.path.rstrip("/") + "/features"

    def storage_options(self) -> StorageOptions:
        """How to reach object storage: the environment's settings, with ``s3_endpoint_url`` if set."""
        from data_pipeline.storage import StorageOptions

        options = StorageOptions.from_env()
        if self.s3_endpoint_url:
            options = dataclasses.replace(options, endpoint_url=self.s3_endpoint_url)
        return options


@dataclass(kw_only=True)
class TrainConfig:
    """The training loop: epochs and batches, early stopping, the loss (the dense optimizer: ``optim``)."""

    epochs: int = 20
    """Maximum number of passes over the training data."""
    batch_size: int = 64
    """Samples (sequences, impressions) per rank and micro-batch: a step of R ranks takes
    batch_size x R x optim.grad_accum_steps samples."""
    max_len: int = 50
    """Model input window: only the last max_len items of a sequence are fed to the model."""
    patience: int = 10
    """Epochs without improvement of the validation score (fMRL: NDCG@10 at the largest nested size;
    DLRM: AUC) before stopping."""
    seed: int = 42
    """Seed of parameter initialisation, shuffling, dropout and sampled negatives."""
    num_threads: int = 0
    """torch intra-op threads; 0 divides the machine's cores evenly among the ranks on it."""
    max_steps: int = 0
    """Stop after this many optimisation steps in total; 0 means no limit (smoke tests use it)."""
    skip_nonfinite_steps: int = 0
    """Optimizer steps with a non-finite loss or gradient norm that are skipped (no update of the dense
    weights, logged and counted) before the run fails; 0: the first one fails the run (exit code 1).
    fsdp2 and ddp only. The trained tables' fused optimizer steps inside backward: not undone."""
    loss: str = "auto"
    """"full" softmax over every item, "sampled" softmax (in-batch + sampled negatives, logQ-corrected),
    or "auto": full up to train.full_softmax_max_items items, sampled above."""
    full_softmax_max_items: int = 200_000
    """Largest catalog for the full softmax: loss "auto" picks it up to here, and an explicit "full"
    above it is refused (every rank would look up every item and hold the (N + 1, D) item matrix and its
    gradient each step); raise it to force the full softmax where `fmrl plan` says it fits."""
    num_negatives: int = 1024
    """Sampled negatives per step and rank for the sampled softmax."""
    negative_sampling: str = "uniform"
    """Distribution of sampled negatives: "uniform" or "popularity" (training counts ** 0.75)."""

    def __post_init__(self) -> None:
        _at_least("train.epochs", self.epochs, 1)
        _at_least("train.batch_size", self.batch_size, 1)
        _at_least("train.max_len", self.max_len, 2)
        _at_least("train.patience", self.patience, 1)
        _at_least("train.num_threads", self.num_threads, 0)
        _at_least("train.max_steps", self.max_steps, 0)
        _at_least("train.skip_nonfinite_steps", self.skip_nonfinite_steps, 0)
        _one_of("train.loss", self.loss, ("auto", "full", "sampled"))
        _at_least("train.full_softmax_max_items", self.full_softmax_max_items, 1)
        _at_least("train.num_negatives", self.num_negatives, 1)
        _one_of("train.negative_sampling", self.negative_sampling, ("uniform", "popularity"))

    def loss_for(self, num_items: int) -> str:
        """The softmax a catalog of ``num_items`` items trains with, "full" or "sampled"; ConfigError for
        "full" asked above train.full_softmax_max_items."""
        if self.loss == "auto":
            return "full" if num_items <= self.full_softmax_max_items else "sampled"
        _require(
            self.loss != "full" or num_items <= self.full_softmax_max_items,
            f"train.loss=full with {num_items:,} items is above train.full_softmax_max_items="
            f"{self.full_softmax_max_items:,}: every rank would look up all {num_items + 1:,} items and hold "
            "the (N + 1, D) item matrix each step; use train.loss=sampled (or auto), or raise "
            "train.full_softmax_max_items if `fmrl plan` says it fits",
        )
        return self.loss


def _default_ks() -> list[int]:
    return [5, 10, 20]


@dataclass(kw_only=True)
class EvalConfig:
    """Ranking evaluation (Recall@k and NDCG@k over the full catalog)."""

    ks: list[int] = field(default_factory=_default_ks)
    """Cut-offs k of the reported metrics; must contain 10 because early stopping monitors NDCG@10."""
    exclude_history: bool = False
    """Mask the user's history items out of the ranking; fMRLRec does not, LRURec does."""
    batch_size: int = 256
    """Users per evaluation batch."""
    max_users: int = 0
    """Evaluate on the first max_users users only (the same ones every time); 0 means all users."""

    def __post_init__(self) -> None:
        ks = self.ks
        _require(len(ks) > 0, "eval.ks must not be empty")
        _require(all(k > 0 for k in ks), f"eval.ks must contain only positive values, got {ks}")
        _require(
            all(b > a for a, b in itertools.pairwise(ks)), f"eval.ks must be strictly increasing, got {ks}"
        )
        _require(10 in ks, f"eval.ks must contain 10 (early stopping monitors NDCG@10), got {ks}")
        _at_least("eval.batch_size", self.batch_size, 1)
        _at_least("eval.max_users", self.max_users, 0)


LOGGERS = ("tensorboard", "mlflow")
"""The names run.loggers accepts (trainer/tracking.py)."""


@dataclass(kw_only=True)
class RunConfig:
    """Where outputs go and how progress is reported."""

    out_dir: str = "runs"
    """Parent folder of run folders: a local path or a URL (kept a str since it may become remote)."""
    name: str = ""
    """Run folder name inside out_dir: one folder name (no "/" or "\\", not "." or ".."); "" derives a
    timestamped name."""
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where the training scalars (loss, learning rate, throughput, validation and test metrics) go:
    "tensorboard" (event files in <run dir>/tensorboard) and/or "mlflow" (the scalars, the resolved
    config and the final report's files; see mlflow_tracking_uri); [] for none."""
    mlflow_tracking_uri: str = ""
    """MLflow tracking server or store (run.loggers has "mlflow"), e.g. http://127.0.0.1:5000 or
    sqlite:///runs/mlflow.db; "" means sqlite:///<out_dir>/mlflow.db with artefacts in
    <out_dir>/mlartifacts."""
    mlflow_experiment: str = "fmrl"
    """MLflow experiment the run is logged under (created if missing)."""
    progress_bar: bool = True
    """Show a progress bar on the terminal."""
    log_every: int = 10
    """Log training metrics every this many optimisation steps."""
    checkpoint_dir: str = ""
    """Where sharded checkpoints go (a folder or s3:// prefix); "" means <run dir>/checkpoints."""
    checkpoint_every: int = 0
    """Save a checkpoint every this many steps (and at the end of every epoch); 0 means only at epoch ends."""
    keep_checkpoints: int = 3
    """Complete checkpoints kept; older ones are deleted after each successful save (except the one
    holding the best weights so far, which a resumed run needs)."""
    checkpoint_timeout: float = 600.0
    """Seconds a checkpoint save (or load) may take. A save that takes longer (storage that stopped
    answering) is abandoned, never committed, and training goes on, trying again at the next checkpoint;
    a warning is logged every minute while a save is slow."""
    checkpoint_max_abandoned: int = 3
    """Abandoned saves in a row after which the job stops with an error."""
    async_checkpoint: bool = False
    """Write checkpoints in a background thread while training goes on (the state is first copied to
    CPU memory); a save finishes before the next one starts and before the run ends."""
    resume: str = ""
    """"" starts fresh; "auto" continues from the newest complete checkpoint of this run (if any; with no
    run.name, of the newest run in out_dir trained with the same config); a URL continues from that
    checkpoint."""
    overwrite: bool = False
    """Start afresh in a run folder that holds a run (its checkpoints, weights and exports are deleted);
    without it such a folder is refused unless the run is resumed."""
    stop_after_steps: int = 0
    """End the job after this many steps in total (checkpoint, no final test), as a preempted or
    time-limited job would; the schedule is not changed. A job resumed at or past it stops at once,
    after saving its checkpoint in this job's layout. 0 means run to the end."""
    stop_file: str = ""
    """If this file appears, every rank stops at the next step boundary after saving a checkpoint, and
    rank 0 deletes the file (the SLURM template creates it on the preemption warning and requeues the
    job if it is gone). SIGUSR1 to a training process stops it the same way."""
    stop_grace_s: float = 20.0
    """After SIGTERM (scancel, a preemption, `kill` of torchrun or of `fmrl train`), the seconds a
    process has to reach the next step boundary and commit its checkpoint; past it the process logs
    that it stops without one and exits 1 (the last committed checkpoint stays). Keep it under the time
    the sender waits before SIGKILL: SLURM's KillWait (30 s by default), torchrun's --shutdown-timeout
    (30 s by default)."""
    export: bool = True
    """At the end, write a standalone model at every nested size to <run dir>/export (`fmrl export`)."""
    log_sample_keys: bool = False
    """Append every step's sample keys to sample_keys.rank<r>.txt in the run folder (resume tests)."""

    def __post_init__(self) -> None:
        _require(self.out_dir != "", "run.out_dir must not be empty")
        _require(
            self.name not in (".", "..") and not any(c in self.name for c in "/\\\0"),
            f"run.name must be one folder name inside run.out_dir (no '/' or '\\', not '.' or '..'), got "
            f"'{self.name}'; leave it out for a timestamped name",
        )
        _at_least("run.log_every", self.log_every, 1)
        _at_least("run.checkpoint_every", self.checkpoint_every, 0)
        _at_least("run.keep_checkpoints", self.keep_checkpoints, 1)
        _positive("run.checkpoint_timeout", self.checkpoint_timeout)
        _at_least("run.checkpoint_max_abandoned", self.checkpoint_max_abandoned, 1)
        _at_least("run.stop_after_steps", self.stop_after_steps, 0)
        _positive("run.stop_grace_s", self.stop_grace_s)
        for i, logger in enumerate(self.loggers):
            _one_of(f"run.loggers[{i}]", logger, LOGGERS)
        _require(len(set(self.loggers)) == len(self.loggers), f"run.loggers repeats a name: {self.loggers}")
        _require(
            not self.mlflow_tracking_uri or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", self.mlflow_tracking_uri),
            f"run.mlflow_tracking_uri must be a URI such as http://127.0.0.1:5000 or sqlite:///runs/mlflow.db, "
            f"got {self.mlflow_tracking_uri!r}",
        )
        _require(self.mlflow_experiment != "", "run.mlflow_experiment must not be empty")


def _dlrm_default(name: str) -> Any:
    return getattr(DLRMConfig(), name)


@dataclass(kw_only=True)
class DLRMSection:
    """CTR model hyperparameters (models.dlrm.config.DLRMConfig) for ``task: dlrm``, except what the data
    set fixes: the number of dense features and the categorical features' names and table sizes come from
    its dataset.json. ``model`` picks DLRM (default) or one of the models the DLRM paper compares it with;
    the section keeps its name ``dlrm`` so that earlier configs and checkpoints read as they are."""

    model: str = _dlrm_default("model")
    """"dlrm", "wide_deep", "deepfm", "dcn" (v1), "dcn_v2" or "xdeepfm" (models/ctr)."""

    embedding_dim: int = _dlrm_default("embedding_dim")
    """Width D of every embedding row (and of the bottom MLP's output)."""
    bottom_mlp: list[int] = field(default_factory=lambda: _dlrm_default("bottom_mlp"))
    """Output widths of the bottom (dense) MLP's layers; the last must be embedding_dim."""
    top_mlp: list[int] = field(default_factory=lambda: _dlrm_default("top_mlp"))
    """Output widths of the top (over) MLP's layers; the last must be 1 (the logit)."""
    interaction: str = _dlrm_default("interaction")
    """"dot" (pairwise dot products, DLRM) or "dcn" (low-rank cross layers, DCN-v2 / MLPerf DLRMv2)."""
    dcn_num_layers: int = _dlrm_default("dcn_num_layers")
    """Cross layers of the "dcn" interaction."""
    dcn_low_rank_dim: int = _dlrm_default("dcn_low_rank_dim")
    """Rank of each cross layer's factorisation (dlrm "dcn", dcn_v2)."""
    dcn_num_experts: int = _dlrm_default("dcn_num_experts")
    """dcn_v2: low-rank experts per cross layer (more than 1: a gated mixture, DCN-Mix)."""
    dcn_structure: str = _dlrm_default("dcn_structure")
    """dcn / dcn_v2: "stacked" (top MLP over the cross output) or "parallel" (beside a deep tower)."""
    dcn_deep_mlp: list[int] = field(default_factory=lambda: _dlrm_default("dcn_deep_mlp"))
    """dcn / dcn_v2 "parallel": output widths of the deep tower's layers."""
    cin_layers: list[int] = field(default_factory=lambda: _dlrm_default("cin_layers"))
    """xdeepfm: feature maps of each CIN layer."""
    wide_crosses: list[str] = field(default_factory=list)
    """wide_deep: hand-made crossed features, "a*b" with a, b categorical feature names (e.g. cat_3*cat_7)."""
    wide_cross_buckets: int = _dlrm_default("wide_cross_buckets")
    """wide_deep: rows of each crossed feature's hashed table."""

    def __post_init__(self) -> None:
        # the crosses' feature names are checked against the data set when the run opens it
        named = sorted({name for cross in self.wide_crosses for name in str(cross).split("*") if name})
        try:  # DLRMConfig's own checks, on a stand-in data set
            self.model_config(num_dense=1, hash_buckets=[2] * max(1, len(named)), feature_names=named or None)
        except ValueError as exc:
            text = str(exc)
            names = _init_fields(type(self))
            if text.split(" ", 1)[0] in names:
                raise ConfigError(f"dlrm.{text}") from None
            raise ConfigError(f"dlrm: {text}") from None

    def model_config(
        self, *, num_dense: int, hash_buckets: list[int], feature_names: list[str] | None
    ) -> DLRMConfig:
        """The model's config for a data set with these features."""
        return DLRMConfig(
            num_dense=num_dense,
            hash_buckets=list(hash_buckets),
            feature_names=feature_names,
            embedding_dim=self.embedding_dim,
            bottom_mlp=list(self.bottom_mlp),
            top_mlp=list(self.top_mlp),
            interaction=self.interaction,  # type: ignore[arg-type]  # checked by DLRMConfig
            dcn_num_layers=self.dcn_num_layers,
            dcn_low_rank_dim=self.dcn_low_rank_dim,
            model=self.model,  # type: ignore[arg-type]  # checked by DLRMConfig
            dcn_num_experts=self.dcn_num_experts,
            dcn_structure=self.dcn_structure,  # type: ignore[arg-type]  # checked by DLRMConfig
            dcn_deep_mlp=list(self.dcn_deep_mlp),
            cin_layers=list(self.cin_layers),
            wide_crosses=list(self.wide_crosses),
            wide_cross_buckets=self.wide_cross_buckets,
        )


TASKS = ("fmrl", "dlrm")


@dataclass(kw_only=True)
class Config:
    """The whole run configuration: one section per concern."""

    task: str = "fmrl"
    """What is trained: "fmrl" (fMRLRec on user sequences; section model) or "dlrm" (DLRM on a CTR data
    set written by `fmrl data prepare-synthetic-ctr` / `convert-criteo` / `convert-obp`; section dlrm)."""
    model: FMRLConfig = field(default_factory=FMRLConfig)
    """Model hyperparameters (defined and validated in models.fmrl.config)."""
    dlrm: DLRMSection = field(default_factory=DLRMSection)
    """DLRM hyperparameters (task dlrm)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The dataset."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop: epochs, batches, early stopping, the loss."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW on the dense part (defined and validated in sharding.config)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Ranking evaluation."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Distribution over ranks: dense backend, table sharding, precision (defined in sharding.config)."""
    run: RunConfig = field(default_factory=RunConfig)
    """Outputs and logging."""

    def __post_init__(self) -> None:
        _one_of("task", self.task, TASKS)
        # the other task's model section would be silently ignored: refuse it, as an unknown key is
        unused = "dlrm" if self.task == "fmrl" else "model"
        if getattr(self, unused) != type(getattr(self, unused))():
            raise ConfigError(
                f"section '{unused}' configures the {'DLRM' if unused == 'dlrm' else 'fMRLRec'} model, "
                f"but task is {self.task!r}: remove it or set task={'dlrm' if unused == 'dlrm' else 'fmrl'}"
            )
        _require(
            not (self.train.skip_nonfinite_steps and self.parallel.backend == "deepspeed"),
            "train.skip_nonfinite_steps needs parallel.backend fsdp2 or ddp: DeepSpeed's engine has no "
            "step without an update",
        )


# ---------------------------------------------------------------------------------------------------------
# Generic dict <-> dataclass machinery


# what a key takes, in the words of a YAML file rather than Python's type names
_SCALAR_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_SCALAR_PLURALS = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}

# PyYAML implements YAML 1.1, which reads "1e-3" (no dot, unsigned exponent) as a string; float fields
# therefore also take strings that are plain decimal literals, so `optim.lr=3e-4` works as users expect.
_FLOAT_LITERAL = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _describe(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if get_origin(tp) is list:
        (item,) = get_args(tp)
        return f"a list of {_SCALAR_PLURALS.get(item, repr(item))}"
    return _SCALAR_NAMES.get(tp, repr(tp))


def _show(value: Any) -> str:
    """A value as YAML writes it (``true``, ``32.5``, ``[1, 2]``, ``{a: 1}``, ``null``); a string quoted
    and said to be one, since ``'8'`` and ``8`` read alike otherwise."""
    return f"'{value}' (a string)" if isinstance(value, str) else _yaml_value(value)


def _type_error(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{key} must be {_describe(tp)}, got {_show(value)}")


MOVED_KEYS = {
    "train.lr": "optim.lr",
    "train.weight_decay": "optim.weight_decay",
    "train.warmup_steps": "optim.warmup_steps",
    "train.grad_clip": "optim.grad_clip",
    "train.grad_accum_steps": "optim.grad_accum_steps",
    "parallel.id_table_sharding": "parallel.table_sharding",
    "parallel.id_table_optimizer": "parallel.table_optimizer",
    "parallel.id_table_lr": "parallel.table_lr",
}
"""Keys that moved (old -> new): a config that uses an old one is told the new one; configs saved by
earlier runs (run folders, checkpoint markers) are upgraded when read (:func:`upgrade_saved_config`)."""


REPLACED_KEYS = {"run.tensorboard": "run.loggers (a list: run.loggers=[tensorboard], or [] for none)"}
"""Keys replaced by a key of another type (old -> what to write instead); saved configs are upgraded."""


def upgrade_saved_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """A config saved by an earlier version (a run's config.yaml, a checkpoint marker's) in today's
    keys (:data:`MOVED_KEYS`, :data:`REPLACED_KEYS`)."""
    out = {key: dict(value) if isinstance(value, Mapping) else value for key, value in data.items()}
    if isinstance(out.get("run"), dict) and "tensorboard" in out["run"]:
        out["run"]["loggers"] = ["tensorboard"] if out["run"].pop("tensorboard") else []
    name = out.get("run", {}).get("name") if isinstance(out.get("run"), dict) else None
    if isinstance(name, str) and (name in (".", "..") or any(c in name for c in "/\\\0")):
        # saved before run.name had to be one folder name: the run is found by its path, not its name,
        # so the saved config keeps loading (eval, export) with the name's last component
        last = name.replace("\\", "/").replace("\0", "").rstrip("/").rsplit("/", 1)[-1]
        out["run"]["name"] = "" if last in ("", ".", "..") else last
    for old, new in MOVED_KEYS.items():
        old_section, old_key = old.split(".")
        new_section, new_key = new.split(".")
        if old_key in out.get(old_section, {}):
            out.setdefault(new_section, {})[new_key] = out[old_section].pop(old_key)
    return out


def _unknown_key(prefix: str, name: object, valid: Sequence[str]) -> ConfigError:
    moved = MOVED_KEYS.get(_join(prefix, str(name)))
    if moved:
        return ConfigError(f"'{_join(prefix, str(name))}' is now '{moved}': rename it")
    replaced = REPLACED_KEYS.get(_join(prefix, str(name)))
    if replaced:
        return ConfigError(f"'{_join(prefix, str(name))}' was replaced by {replaced}")
    valid = sorted(valid)
    if prefix:
        message = f"unknown key '{_join(prefix, str(name))}' (valid keys in '{prefix}': {', '.join(valid)})"
    else:
        message = f"unknown section '{name}' (valid sections: {', '.join(valid)})"
    close = difflib.get_close_matches(str(name), valid, n=1)
    if close:
        message += f"; did you mean '{close[0]}'?"
    return ConfigError(message)


def _init_fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the type hint ``tp`` and return it in canonical form (int -> float etc.)."""
    if dataclasses.is_dataclass(tp):
        # A section whose keys are all commented out reads as null; treat it as "all defaults".
        return _build(tp, {} if value is None else value, key)
    if get_origin(tp) is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value)
        (item_tp,) = get_args(tp)
        return [_convert(item, item_tp, f"{key}[{i}]") for i, item in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        # bool is a subclass of int, but `epochs: true` is a mistake, not 1.
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"{key}: unsupported config field type {tp!r}")
    raise _type_error(key, tp, value)


def _build(cls: type[_T], data: Any, prefix: str) -> _T:
    """Build dataclass ``cls`` from a mapping, strictly; ``prefix`` is its dotted key ("" for the root)."""
    if not isinstance(data, Mapping):
        what = f"'{prefix}'" if prefix else "the config"
        raise ConfigError(f"{what} must be a mapping of keys to values, got {_show(data)}")
    fields = _init_fields(cls)
    for name in data:
        if name not in fields:
            raise _unknown_key(prefix, name, list(fields))
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{key}'")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as exc:
        # Sections defined elsewhere (the model's) raise plain ValueErrors whose message starts with the
        # field name; prefixing the section turns that into the full dotted key.
        raise ConfigError(_join(prefix, str(exc))) from exc


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {name: _to_plain(getattr(value, name)) for name in _init_fields(type(value))}
    if isinstance(value, (list, tuple)):
        return [_to_plain(item) for item in value]
    return value


# ---------------------------------------------------------------------------------------------------------
# Overrides


def _field_type(parts: Sequence[str], override: str) -> Any:
    """Resolve the type hint that a dotted key points at, or raise the same unknown-key error as a file."""
    tp: Any = Config
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"invalid override '{override}': '{prefix}' is {_describe(tp)}, not a section")
        fields = _init_fields(tp)
        if part not in fields:
            raise _unknown_key(prefix, part, list(fields))
        tp = get_type_hints(tp)[part]
    return tp


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or not all(parts):
        raise ConfigError(
            f"invalid override '{override}': expected KEY=VALUE with a dotted KEY, e.g. 'optim.lr=3e-4'"
        )
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"invalid override '{override}': the value is not valid YAML ({problem})") from exc
    if _field_type(parts, override) is str and not isinstance(value, str):
        # `run.name=2024` or `run.name=no` mean the text, not the YAML int or bool.
        value = raw.strip()
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = {}
        elif isinstance(child, Mapping):
            child = dict(child)
        else:
            raise ConfigError(
                f"'{'.'.join(parts[: depth + 1])}' must be a mapping of keys to values, got {_show(child)}"
            )
        node[part] = child
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------------------------------------------------
# Public API


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Build a validated ``Config`` from plain nested mappings; missing keys take their defaults."""
    return _build(Config, data, "")


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dicts and lists of ``cfg``; ``config_from_dict(config_to_dict(cfg)) == cfg``."""
    return _to_plain(cfg)


def with_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """``cfg`` with dotted ``KEY=VALUE`` overrides applied (as :func:`load_config` applies them to a file)."""
    data = config_to_dict(cfg)
    for override in overrides:
        _apply_override(data, override)
    return config_from_dict(data)


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain YAML keeps the last one
    silently, so half of a section would be ignored)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"key {key!r} appears twice in one mapping (line {seen[key]} and line {line}): "
                    "YAML would keep only the last one; merge them"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_StrictLoader)  # noqa: S506  (a SafeLoader subclass)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"invalid YAML in {path}{where}: {problem}") from exc
    if data is None:  # an empty file means all defaults
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must contain a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | None, overrides: Sequence[str] = ()) -> Config:
    """Load a config from a YAML file (``None``: all defaults) and apply dotted ``KEY=VALUE`` overrides.

    Override values are parsed as YAML (``optim.lr=3e-4``, ``model.nested_sizes=[8,16,32]``,
    ``eval.exclude_history=true``) and applied in order on top of the file. A whole section can be
    replaced with a mapping value (``train={epochs: 3}``).
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'KEY=VALUE' strings, not a single str")
    data = {} if path is None else _read_yaml(path)
    for override in overrides:
        _apply_override(data, override)
    return config_from_dict(data)


PATH_KEYS = (
    ("data", "path"),
    ("data", "features"),
    ("run", "out_dir"),
    ("run", "checkpoint_dir"),
    ("run", "stop_file"),
    ("run", "resume"),
)
"""The config keys that hold file locations. Relative local paths among them mean: relative to the
directory the command runs in (like any command-line tool); a run stores them absolute."""


def with_absolute_paths(cfg: Config, base: str | None = None) -> Config:
    """``cfg`` with every relative local path of :data:`PATH_KEYS` made absolute against ``base`` (default:
    the current directory). URLs (``s3://...``), empty values and ``run.resume=auto`` stay as they are."""
    base = os.path.abspath(base or os.getcwd())
    sections: dict[str, dict[str, str]] = {}
    for section, key in PATH_KEYS:
        value = getattr(getattr(cfg, section), key)
        if not value or "://" in value or (section, key, value) == ("run", "resume", "auto"):
            continue
        if not os.path.isabs(value):
            sections.setdefault(section, {})[key] = os.path.normpath(os.path.join(base, value))
    changes = {
        section: dataclasses.replace(getattr(cfg, section), **keys) for section, keys in sections.items()
    }
    return dataclasses.replace(cfg, **changes) if changes else cfg


def load_saved_config(path: str) -> Config:
    """The config a run saved (its ``config.yaml``), also from an earlier version (:data:`MOVED_KEYS`)."""
    return config_from_dict(upgrade_saved_config(_read_yaml(path)))


class _Dumper(yaml.SafeDumper):
    """Block-style sections with flow-style lists (``ks: [5, 10, 20]``), which read best in a config."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)


_Dumper.add_representer(list, _represent_list)


def dump_config(cfg: Config, path: str) -> None:
    """Write ``cfg`` as YAML to ``path`` atomically: readers see the old file or the complete new one."""
    text = yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    path = os.fspath(path)
    directory, base = os.path.split(os.path.abspath(path))
    # Same folder, so os.replace is a rename within one file system; mode 0o666 lets the umask apply,
    # which mkstemp's 0o600 would not.
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------------------
# Documentation of the keys


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of dataclass ``cls`` (the string literal under each field), by field name,
    read from its source with ``ast``: the one place a key's meaning is written is beside the key."""
    import ast
    import inspect

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(following.value.value)
    return docs


def _yaml_value(value: Any) -> str:
    text = yaml.dump(value, Dumper=_Dumper, default_flow_style=True, width=10**6, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def show_config(cfg: Config, width: int = 100) -> str:
    """``cfg`` as YAML that loads back to ``cfg``, each key under a comment with its doc and its default
    (``fmrl config show``)."""
    lines: list[str] = []

    def comment(text: str, indent: str) -> None:
        # the docstrings' own line breaks are for their source width: rewrap each paragraph
        for paragraph in text.split("\n\n"):
            text_width = width - len(indent) - 2
            wrapped = textwrap.wrap(" ".join(paragraph.split()), text_width, break_on_hyphens=False) or [""]
            lines.extend(f"{indent}# {part}".rstrip() for part in wrapped)

    def section(obj: Any, default: Any, indent: str) -> None:
        docs = field_docs(type(obj))
        for name in _init_fields(type(obj)):
            value, value_default = getattr(obj, name), getattr(default, name)
            doc = docs.get(name, "")
            if dataclasses.is_dataclass(value):
                if doc:
                    comment(doc, indent)
                lines.append(f"{indent}{name}:")
                section(value, value_default, indent + "  ")
                continue
            plain, plain_default = _to_plain(value), _to_plain(value_default)
            comment(f"{doc} (default: {_yaml_value(plain_default)})".strip(), indent)
            lines.append(f"{indent}{name}: {_yaml_value(plain)}")

    comment(" ".join((Config.__doc__ or "").split()), "")
    section(cfg, Config(), "")
    return "\n".join(lines) + "\n"
