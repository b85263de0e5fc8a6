"""Matryoshka training of fMRLRec on one or many ranks, evaluation at every nested size, and the report.

    fmrl train --config configs/demo.yaml                                   # one process
    torchrun --nproc_per_node=2 -m trainer.cli train --config configs/demo.yaml
    fmrl train --config configs/demo.yaml train.epochs=5 run.name=quick     # dotted overrides

One code path for any number of ranks (a plain process is a job of one): TorchRec shards the item tables,
the dense trunk runs under ``parallel.backend`` (sharding/fmrl.py), every rank reads its own part of the
user shards, and evaluation ranks against item representations sharded over the ranks.

Rank 0 writes the run directory (``run.out_dir/run.name``): the resolved config, the TorchRec plan,
TensorBoard scalars, the best model's weights (safetensors), the per-size test metrics (JSON and a table)
and a plot of metric against nested size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tqdm import tqdm

from data_pipeline.features import load_feature_tables
from data_pipeline.loader import SequenceDataset, TrainLoader, scan_users
from data_pipeline.sequences import TrainBatch
from data_pipeline.storage import StorageOptions
from models.fmrl import FMRLRec, NegativeSampler, candidate_set, matryoshka_loss, sampled_matryoshka_loss
from sharding.fmrl import ParallelFMRL, parallelize_fmrl
from sharding.world import World, set_cpu_threads
from trainer.checkpoint import CheckpointError, CheckpointManager
from trainer.config import Config, DataConfig, config_to_dict, dump_config
from trainer.dist import all_reduce_sum, broadcast_object, distributed
from trainer.evaluate import evaluate, evaluate_popularity
from trainer.export import export_sizes, load_trained_model
from trainer.preemption import StopRequest
from trainer.report import format_size_table, save_size_plot

log = logging.getLogger("fmrl")

EARLY_STOPPING_METRIC = "NDCG@10"


@dataclass
class RunResult:
    run_dir: str
    best_epoch: int
    steps: int
    train_losses: list[float] = field(default_factory=list)
    """Loss of every optimizer step (mean over all ranks' target positions), in order."""
    valid_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    """Validation metrics of the best epoch, per nested size."""
    test_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    """Test metrics of the best model, per nested size."""
    popularity_metrics: dict[str, float] = field(default_factory=dict)
    """Test metrics of the most-popular baseline."""
    loss_kind: str = "full"
    """"full" or "sampled" softmax, as resolved from train.loss."""
    train_seconds: float = 0.0
    """Wall time of the optimisation steps (evaluation excluded)."""
    peak_rss_mib: float = 0.0
    """This rank's peak resident memory."""
    stopped: bool = False
    """The job ended early (run.stop_after_steps or a stop request) after saving a checkpoint."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def storage_options(cfg: DataConfig) -> StorageOptions:
    options = StorageOptions.from_env()
    if cfg.s3_endpoint_url:
        options = dataclasses.replace(options, endpoint_url=cfg.s3_endpoint_url)
    return options


def open_features(
    cfg: DataConfig, dataset: SequenceDataset, options: StorageOptions, needed: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The frozen (N + 1, D) text and image tables, checked against the dataset (None, None if the model
    uses neither)."""
    if not needed:
        return None, None
    text, image, info = load_feature_tables(cfg.features_url, options)
    if info["num_items"] != dataset.num_items:
        raise ValueError(
            f"the features at {cfg.features_url} cover {info['num_items']} items but the dataset at "
            f"{dataset.url} has {dataset.num_items}: run `fmrl features {dataset.url}` again"
        )
    log.info(
        "features from %s: text %s, image %s",
        cfg.features_url,
        info.get("text_model"),
        info.get("image_model"),
    )
    return text, image


def make_run_dir(out_dir: str, name: str) -> str:
    """The run directory; rank 0 picks the name (a timestamp if empty) and every rank gets the same."""
    if "://" in out_dir:
        raise ValueError(f"run.out_dir must be a local path for now, got {out_dir!r}")
    name = str(broadcast_object(name or time.strftime("fmrl-%Y%m%d-%H%M%S")))
    run_dir = os.path.join(out_dir, name)
    if dist.get_rank() == 0:
        os.makedirs(run_dir, exist_ok=True)
    return run_dir


def resolve_loss(kind: str, num_items: int, full_max: int) -> str:
    if kind == "auto":
        return "full" if num_items <= full_max else "sampled"
    return kind


@dataclass
class StepInputs:
    """Everything a training step needs besides the batch."""

    sizes: list[int]
    num_items: int
    loss_kind: str
    chunk_mb: int
    sampler: NegativeSampler | None
    generator: torch.Generator
    device: torch.device


def forward_backward(
    parallel: ParallelFMRL, batch: TrainBatch, inputs: StepInputs
) -> tuple[float, int, torch.Tensor]:
    """Forward and backward of one micro-batch. Returns this rank's sum of position losses, its number of
    target positions, and its (K,) per-size mean losses.

    The loss is normalised by the positions of *all* ranks, so that averaging the gradients over ranks
    (DDP, FSDP2, ZeRO) gives exactly the gradient of the mean over the global batch: the same as one rank
    holding every sequence."""
    tokens, labels = batch.tokens.to(inputs.device), batch.labels.to(inputs.device)
    positions = int((labels > 0).sum())
    global_positions = float(all_reduce_sum(torch.tensor([positions]))[0])
    if inputs.loss_kind == "full":
        ids = torch.arange(inputs.num_items + 1, device=inputs.device)
        hidden, reps = parallel.forward(tokens, ids)  # (B, L, D), (N + 1, D)
        loss, per_size = matryoshka_loss(hidden, reps, labels, inputs.sizes, inputs.chunk_mb)
    else:
        assert inputs.sampler is not None
        negatives = inputs.sampler.sample(inputs.generator).to(inputs.device)  # (M,)
        ids = torch.unique(torch.cat([tokens.flatten(), labels.flatten(), negatives]))  # (U,), sorted
        hidden, reps = parallel.forward(tokens, ids)
        candidates, _ = candidate_set(labels, negatives)  # (C,) sorted, every target included
        rows = torch.searchsorted(ids, candidates)
        log_q = inputs.sampler.log_q(candidates.cpu()).to(inputs.device)
        loss, per_size = sampled_matryoshka_loss(hidden, labels, reps[rows], candidates, log_q, inputs.sizes)
    world = dist.get_world_size()
    parallel.backward(loss * (positions * world / global_positions))
    return float(loss.detach()) * positions, positions, per_size


def train(cfg: Config) -> RunResult:
    """Train, early-stop on validation NDCG@10 at the largest size, test the best model, write the report.

    Runs as one rank of a torchrun job, or as a job of one rank in a plain process."""
    with distributed() as (world, device), StopRequest(cfg.run.stop_file) as stop_request:
        if cfg.task == "dlrm":
            from trainer.train_dlrm import train_dlrm  # imports this module's helpers

            return train_dlrm(cfg, world, device, stop_request)  # type: ignore[return-value]
        return _train(cfg, world, device, stop_request)


def _train(cfg: Config, world: World, device: torch.device, stop_request: StopRequest) -> RunResult:
    main = world.rank == 0
    seed_everything(cfg.train.seed)  # the same initial model on every rank
    threads = set_cpu_threads(cfg.train.num_threads, world)
    run_dir = make_run_dir(cfg.run.out_dir, cfg.run.name)
    if main:
        dump_config(cfg, os.path.join(run_dir, "config.yaml"))
    log.info(
        "rank %d/%d on %s, %d CPU threads, run directory %s",
        world.rank,
        world.world_size,
        device,
        threads,
        run_dir,
    )

    options = storage_options(cfg.data)
    dataset = SequenceDataset.open(cfg.data.path, options)
    uses_features = cfg.model.use_text_features or cfg.model.use_image_features
    text_features, image_features = open_features(cfg.data, dataset, options, uses_features)
    stats = scan_users(dataset)
    loader = TrainLoader(
        dataset,
        stats,
        batch_size=cfg.train.batch_size,
        max_len=cfg.train.max_len,
        seed=cfg.train.seed,
        rank=world.rank,
        world_size=world.world_size,
        num_workers=cfg.data.num_workers,
        prefetch_factor=cfg.data.prefetch_factor,
    )
    model = FMRLRec(cfg.model, dataset.num_items, text_features, image_features)
    del text_features, image_features
    sizes, ks, largest = list(cfg.model.nested_sizes), cfg.eval.ks, cfg.model.nested_sizes[-1]
    trainable = model.num_parameters()
    accum = cfg.train.grad_accum_steps
    total_steps = sum(loader.steps_in_epoch(epoch) for epoch in range(cfg.train.epochs)) // accum
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    parallel = parallelize_from_config(model, cfg, total_steps=max(total_steps, 1), device=device)
    loss_kind = resolve_loss(cfg.train.loss, dataset.num_items, cfg.train.full_softmax_max_items)
    sampler = None
    if loss_kind == "sampled":
        counts = torch.from_numpy(stats.train_item_counts[1:].astype(np.float64))
        sampler = NegativeSampler(
            dataset.num_items,
            cfg.train.num_negatives,
            cfg.train.negative_sampling,
            counts if cfg.train.negative_sampling == "popularity" else None,
        )
    inputs = StepInputs(
        sizes=sizes,
        num_items=dataset.num_items,
        loss_kind=loss_kind,
        chunk_mb=cfg.model.loss_chunk_mb,
        sampler=sampler,
        # different negatives on every rank, the same on a rerun
        generator=torch.Generator().manual_seed(cfg.train.seed * 1000 + world.rank),
        device=device,
    )
    if main:
        plan = str(parallel.sparse.plan)
        log.info(
            "dataset %s: %d items, %d users; model %s: %.2fM trainable parameters; %s softmax; "
            "dense backend %s on %d rank(s); table plan:\n%s",
            dataset.url,
            dataset.num_items,
            dataset.num_users,
            sizes,
            trainable / 1e6,
            loss_kind,
            cfg.parallel.backend,
            world.world_size,
            plan,
        )
        with open(os.path.join(run_dir, "sharding_plan.txt"), "w") as f:
            f.write(plan + "\n")
    writer = None
    if cfg.run.tensorboard and main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def run_eval(split: str) -> dict[int, dict[str, float]]:
        return evaluate(
            parallel,
            dataset,
            split,
            sizes,
            ks,
            exclude_history=cfg.eval.exclude_history,
            batch_size=cfg.eval.batch_size,
            max_len=cfg.train.max_len,
            max_users=cfg.eval.max_users,
            device=device,
        )

    result = RunResult(run_dir=run_dir, best_epoch=0, steps=0, loss_kind=loss_kind)
    progress = Progress()
    checkpoints = CheckpointManager(
        cfg.run.checkpoint_dir or os.path.join(run_dir, "checkpoints"), options, cfg.run.keep_checkpoints
    )
    identity = {"config": config_to_dict(cfg), "num_items": dataset.num_items}

    def save_checkpoint() -> None:
        checkpoints.save(
            result.steps,
            training_state(parallel, loader, inputs, result, progress, world),
            {**identity, "best_step": progress.best_step},
            blocking=not cfg.run.async_checkpoint,
        )

    resume_url = checkpoints.latest() if cfg.run.resume == "auto" else cfg.run.resume
    best_state = None
    if resume_url:
        best_state = restore_training_state(
            checkpoints, resume_url, identity, parallel, loader, inputs, result, progress, world
        )
        if main:
            log.info("resumed from %s at step %d (epoch %d)", resume_url, result.steps, loader.epoch + 1)
    best_score, epochs_without_gain = progress.best_score, progress.epochs_without_gain
    if best_state is None:
        best_state = parallel.snapshot()
    keys_log = (
        open(os.path.join(run_dir, f"sample_keys.rank{world.rank}.txt"), "a")
        if cfg.run.log_sample_keys
        else None
    )

    def stop_here() -> RunResult:
        """End the job here (run.stop_after_steps or a stop request): a committed checkpoint of this
        step, no final test."""
        save_checkpoint()  # a no-op when this step's checkpoint exists already
        checkpoints.close()
        if keys_log is not None:
            keys_log.close()
        if main and stop_requested and cfg.run.stop_file:
            # consumed: tells the launcher the trainer did stop early (and a requeued job must not stop)
            with contextlib.suppress(FileNotFoundError):
                os.remove(cfg.run.stop_file)
        if main:
            reason = "stop requested" if stop_requested else "run.stop_after_steps reached"
            log.info("%s at step %d: checkpoint saved; continue with run.resume=auto", reason, result.steps)
        result.stopped = True
        return result

    def stop_due() -> bool:
        limit = bool(cfg.run.stop_after_steps) and result.steps >= cfg.run.stop_after_steps
        return limit or stop_requested

    stop_requested = False

    parallel.set_training(True)
    if stop_due():  # resumed at the limit: save in this job's layout, then stop
        return stop_here()
    micro, window = 0, [0.0, 0.0]  # micro-batches; (loss sum, positions) of the current step, all ranks
    for epoch in range(loader.epoch + 1, cfg.train.epochs + 1):
        bar = tqdm(
            loader,
            total=loader.steps_in_epoch(loader.epoch),
            desc=f"epoch {epoch}",
            disable=not (cfg.run.progress_bar and main),
            leave=False,
            # redraws flood log files (batch jobs, CI): redraw rarely when stderr is not a terminal
            mininterval=0.1 if sys.stderr.isatty() else 30.0,
        )
        epoch_start, epoch_sequences = time.perf_counter(), 0
        steps_before = result.steps - loader.batches_in_epoch // accum  # the epoch's first step
        batches_left = loader.steps_in_epoch(loader.epoch) - loader.batches_in_epoch
        for batch in bar:
            batches_left -= 1
            micro += 1
            boundary = micro % accum == 0
            parallel.set_grad_sync(boundary)
            loss_sum, positions, per_size = forward_backward(parallel, batch, inputs)
            if keys_log is not None:
                keys_log.write(" ".join(batch.keys) + "\n")
                keys_log.flush()  # readable while the run goes on
            parallel.micro_step(boundary)
            window[0] += loss_sum
            window[1] += positions
            epoch_sequences += len(batch.tokens) * world.world_size
            if not boundary:
                continue
            # one all-reduce per step: the loss, its positions, and whether any rank was asked to stop
            total = all_reduce_sum(torch.tensor([*window, float(stop_request.local())]))
            loss = float(total[0] / total[1])
            stop_requested = stop_requested or bool(total[2] > 0)
            window = [0.0, 0.0]
            result.steps += 1
            result.train_losses.append(loss)
            throughput = epoch_sequences / (time.perf_counter() - epoch_start)
            bar.set_postfix(
                loss=f"{loss:.4f}", seq_per_s=f"{throughput:.0f}", refresh=False
            )  # redraw at tqdm's pace
            if writer is not None and result.steps % cfg.run.log_every == 0:
                writer.add_scalar("train/loss", loss, result.steps)
                for size, value in zip(sizes, per_size.tolist()):  # rank 0's last micro-batch
                    writer.add_scalar(f"train/loss_size_{size}", value, result.steps)
                writer.add_scalar("train/lr", parallel.last_lr(), result.steps)
                writer.add_scalar("train/sequences_per_s", throughput, result.steps)
            # the last step of an epoch (or of training) is checkpointed after the validation below, so
            # that its checkpoint holds the early-stopping state: one checkpoint per step
            if result.steps >= total_steps:
                break
            if batches_left == 0:
                continue  # the loader ends the epoch
            if cfg.run.checkpoint_every and result.steps % cfg.run.checkpoint_every == 0:
                save_checkpoint()
            if stop_due():
                return stop_here()

        epoch_seconds = time.perf_counter() - epoch_start
        result.train_seconds += epoch_seconds
        valid = run_eval("valid")
        score = valid[largest][EARLY_STOPPING_METRIC]
        if writer is not None:
            for size, values in valid.items():
                for name, value in values.items():
                    writer.add_scalar(f"valid_size_{size}/{name}", value, result.steps)
        improved = score > best_score
        if main:
            log.info(
                "epoch %d: loss %.4f, %.0f seq/s, valid %s at size %d = %.4f%s",
                epoch,
                float(np.mean(result.train_losses[steps_before:] or [float("nan")])),
                epoch_sequences / max(epoch_seconds, 1e-9),  # training only, evaluation excluded
                EARLY_STOPPING_METRIC,
                largest,
                score,
                " (best)" if improved else "",
            )
        if improved:
            best_score, best_state, epochs_without_gain = score, parallel.snapshot(), 0
            result.best_epoch, result.valid_metrics = epoch, valid
            progress.best_step = result.steps  # the checkpoint saved next holds the best weights
        else:
            epochs_without_gain += 1
        progress.best_score, progress.epochs_without_gain = best_score, epochs_without_gain
        save_checkpoint()
        if stop_due():
            return stop_here()
        if epochs_without_gain >= cfg.train.patience:
            if main:
                log.info("early stopping: no gain in %d epochs", cfg.train.patience)
            break
        if result.steps >= total_steps:
            break
    if keys_log is not None:
        keys_log.close()
    checkpoints.close()  # the last asynchronous save commits before the run reports

    parallel.restore(best_state)
    weights = parallel.full_state_dict()
    if main:
        assert weights is not None
        save_weights(weights, os.path.join(run_dir, "model.safetensors"))
    result.test_metrics = run_eval("test")
    popularity = torch.from_numpy(stats.train_item_counts[1:].astype(np.float64))  # (N,)
    result.popularity_metrics = evaluate_popularity(
        popularity,
        dataset,
        ks,
        exclude_history=cfg.eval.exclude_history,
        batch_size=cfg.eval.batch_size,
        max_len=cfg.train.max_len,
        max_users=cfg.eval.max_users,
    )
    if writer is not None:
        for size, values in result.test_metrics.items():
            for name, value in values.items():
                writer.add_scalar(f"test_size_{size}/{name}", value, result.steps)
        writer.close()
    result.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log.info(
        "rank %d: %d steps in %.0f s (%.2f steps/s), peak RSS %.0f MiB",
        world.rank,
        result.steps,
        result.train_seconds,
        result.steps / max(result.train_seconds, 1e-9),
        result.peak_rss_mib,
    )
    if main:
        report(cfg, result)
        if cfg.run.export:
            manifest = export_sizes(
                load_trained_model(run_dir, options), os.path.join(run_dir, "export"), sizes, options
            )
            total = sum(entry["bytes"] for entry in manifest["sizes"].values())
            print(f"export: sizes {sizes} ({total / 2**20:.1f} MiB) in {os.path.join(run_dir, 'export')}")
    return result


def parallelize_from_config(
    model: FMRLRec, cfg: Config, *, total_steps: int, device: torch.device
) -> ParallelFMRL:
    """``parallelize_fmrl`` with the settings of ``cfg`` (the trainer's and the benchmarks' one way)."""
    return parallelize_fmrl(
        model,
        backend=cfg.parallel.backend,
        zero_stage=cfg.parallel.zero_stage,
        feature_sharding=cfg.parallel.feature_table_sharding,
        id_sharding=cfg.parallel.id_table_sharding,
        id_optimizer=cfg.parallel.id_table_optimizer,
        id_lr=cfg.parallel.id_table_lr or cfg.train.lr,
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        warmup_steps=cfg.train.warmup_steps,
        total_steps=total_steps,
        grad_clip=cfg.train.grad_clip,
        grad_accum_steps=cfg.train.grad_accum_steps,
        micro_batch_size=cfg.train.batch_size,
        precision=cfg.parallel.precision,
        device=device,
    )


@dataclass
class Progress:
    """Early-stopping state that a checkpoint carries besides the steps and losses."""

    best_score: float = float("-inf")
    epochs_without_gain: int = 0
    best_step: int = 0
    """Step of the checkpoint that holds the best weights (saved at that epoch's end); 0 if none yet."""


def training_state(
    parallel: ParallelFMRL,
    loader: TrainLoader,
    inputs: StepInputs,
    result: RunResult,
    progress: Progress,
    world: World,
) -> dict[str, Any]:
    """Everything a run needs to continue exactly, as a DCP state dict (tensors are live references,
    so loading fills them in place). Per-rank positions (data, RNG) are gathered into one JSON string."""
    positions: list[Any] = [None] * world.world_size
    mine = {
        "loader": loader.state_dict(),
        "torch_rng": torch.get_rng_state().tolist(),
        "negatives_rng": inputs.generator.get_state().tolist(),
    }
    dist.all_gather_object(positions, mine)
    run = {
        "steps": result.steps,
        "train_losses": result.train_losses,
        "best_epoch": result.best_epoch,
        "valid_metrics": {str(k): v for k, v in result.valid_metrics.items()},
        "train_seconds": result.train_seconds,
        "best_score": progress.best_score,
        "epochs_without_gain": progress.epochs_without_gain,
        "best_step": progress.best_step,
        "world_size": world.world_size,
    }
    state = parallel.state_dict()
    state["run"] = json.dumps(run)
    state["positions"] = json.dumps(positions)
    return state


def restore_training_state(
    checkpoints: CheckpointManager,
    url: str,
    identity: dict[str, Any],
    parallel: ParallelFMRL,
    loader: TrainLoader,
    inputs: StepInputs,
    result: RunResult,
    progress: Progress,
    world: World,
) -> list[torch.Tensor] | None:
    """Continue from checkpoint ``url``. Returns the best weights so far (a :meth:`ParallelFMRL.snapshot`)
    when an earlier checkpoint holds them, else None (the resumed weights are the best so far).

    At the saving world size the run continues exactly. At another one, DCP reshards the dense state and
    the TorchRec tables, the data loader continues the epoch with the samples no rank has read yet, and
    rank r takes the RNG states of saved rank r (fresh seeds for ranks the saved job did not have).
    """
    marker = checkpoints.marker(url)
    mismatch = incompatible(marker, identity)
    if mismatch:
        raise CheckpointError(
            f"{url} does not fit this run: " + "; ".join(mismatch) + ". Start a new run (another "
            "run.name or run.checkpoint_dir) or resume with the settings the checkpoint was saved with"
        )
    best_state = None
    best_step = marker.get("best_step", 0)
    if best_step and best_step != marker["step"]:
        best_url = checkpoints.url(best_step)
        state = parallel.state_dict()
        checkpoints.load(best_url, state, only=("dense", "tables"))
        parallel.load_state_dict(state)  # the optimizer part is the live state: unchanged
        best_state = parallel.snapshot()
    state = training_state(parallel, loader, inputs, result, progress, world)
    checkpoints.load(url, state)
    parallel.load_state_dict(state)
    run, positions = json.loads(state["run"]), json.loads(state["positions"])
    exact = loader.resume([p["loader"] for p in positions])
    if world.rank < len(positions):
        torch.set_rng_state(torch.tensor(positions[world.rank]["torch_rng"], dtype=torch.uint8))
        inputs.generator.set_state(torch.tensor(positions[world.rank]["negatives_rng"], dtype=torch.uint8))
    if not exact and world.rank == 0:
        log.warning(
            "%s was saved by %d rank(s) with %s; this job has %d rank(s): epoch %d continues with the "
            "training sequences not read yet, in another order (an exact resume needs the saving layout)",
            url,
            marker["world_size"],
            ", ".join(f"{k}={positions[0]['loader'][k]}" for k in ("num_workers", "batch_size")),
            world.world_size,
            loader.epoch + 1,
        )
    result.steps, result.train_losses = run["steps"], run["train_losses"]
    result.best_epoch, result.train_seconds = run["best_epoch"], run["train_seconds"]
    result.valid_metrics = {int(k): v for k, v in run["valid_metrics"].items()}
    progress.best_score, progress.epochs_without_gain = run["best_score"], run["epochs_without_gain"]
    progress.best_step = run.get("best_step", 0)
    return best_state


# what a checkpoint's tensors depend on: another value of these cannot load it
_SHAPING_KEYS = ("parallel.backend", "parallel.id_table_optimizer")


def incompatible(marker: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint (its commit marker) and this run in ways the saved tensors
    cannot follow: the item count, any model setting, the dense backend, the ID-table optimizer."""
    saved = marker.get("config")
    if saved is None:  # written before configs were recorded
        return []
    saved_task = saved.get("task", "fmrl")
    if saved_task != identity["config"]["task"]:
        return [f"task was {saved_task!r}, now {identity['config']['task']!r}"]
    problems = []
    if marker.get("num_items") != identity["num_items"]:
        problems.append(
            f"the dataset has {identity['num_items']} items, the checkpoint {marker.get('num_items')}"
        )
    now = identity["config"]
    for key in sorted(set(saved["model"]) | set(now["model"])):
        if saved["model"].get(key) != now["model"].get(key):
            problems.append(f"model.{key} was {saved['model'].get(key)!r}, now {now['model'].get(key)!r}")
    for dotted in _SHAPING_KEYS:
        section, key = dotted.split(".")
        if saved[section].get(key) != now[section].get(key):
            problems.append(f"{dotted} was {saved[section].get(key)!r}, now {now[section].get(key)!r}")
    return problems


def save_weights(state: dict[str, torch.Tensor], path: str) -> None:
    tmp = f"{path}.tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    os.replace(tmp, path)


def write_json(obj: object, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def report(cfg: Config, result: RunResult) -> None:
    """Print and save the per-size test table, the metrics JSON and the plot."""
    ks, largest = cfg.eval.ks, cfg.model.nested_sizes[-1]
    table = format_size_table(result.test_metrics, ks, result.popularity_metrics)
    with open(os.path.join(result.run_dir, "test_metrics.txt"), "w") as f:
        f.write(table + "\n")
    write_json(
        {
            "best_epoch": result.best_epoch,
            "steps": result.steps,
            "train_losses": result.train_losses,
            "test": {str(k): v for k, v in result.test_metrics.items()},
            "valid": {str(k): v for k, v in result.valid_metrics.items()},
            "most_popular": result.popularity_metrics,
        },
        os.path.join(result.run_dir, "metrics.json"),
    )
    plot = os.path.join(result.run_dir, "metrics_by_size.png")
    save_size_plot(
        result.test_metrics, ks, plot, "fMRL-LRU test metrics by nested size", result.popularity_metrics
    )
    model_ndcg = result.test_metrics[largest][EARLY_STOPPING_METRIC]
    popular_ndcg = result.popularity_metrics[EARLY_STOPPING_METRIC]
    print(f"\nTest metrics of the best model (epoch {result.best_epoch}), full ranking over all items:\n")
    print(table)
    print(
        f"\ntest {EARLY_STOPPING_METRIC}: fMRL-LRU (size {largest}) {model_ndcg:.4f}"
        f" vs most-popular {popular_ndcg:.4f} ({model_ndcg / max(popular_ndcg, 1e-12):.1f}x)"
    )
    print(f"plot: {plot}\nrun directory: {result.run_dir}")
