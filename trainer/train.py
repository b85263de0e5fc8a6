"""Single-process Matryoshka training of fMRLRec, evaluation at every nested size, and the final report.

    fmrl train --config configs/demo.yaml
    fmrl train --config configs/demo.yaml train.epochs=5 run.name=quick     # dotted overrides

The run directory (``run.out_dir/run.name``) receives the resolved config, TensorBoard scalars, the best
model's weights (safetensors), the per-size test metrics (JSON and a table) and a plot of metric against
nested size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from data_pipeline.features import load_feature_tables
from data_pipeline.loader import SequenceDataset, TrainLoader, eval_batches, scan_users
from data_pipeline.sequences import TrainBatch
from data_pipeline.storage import StorageOptions
from models.fmrl import FMRLRec, matryoshka_loss
from sharding.world import World, set_cpu_threads
from trainer.config import Config, DataConfig, dump_config
from trainer.evaluate import evaluate, evaluate_popularity
from trainer.optim import build_optimizer, cosine_with_warmup
from trainer.report import format_size_table, save_size_plot

log = logging.getLogger("fmrl")

EARLY_STOPPING_METRIC = "NDCG@10"


@dataclass
class RunResult:
    run_dir: str
    best_epoch: int
    steps: int
    train_losses: list[float] = field(default_factory=list)
    """Loss of every optimizer step, in order."""
    valid_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    """Validation metrics of the best epoch, per nested size."""
    test_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    """Test metrics of the best model, per nested size."""
    popularity_metrics: dict[str, float] = field(default_factory=dict)
    """Test metrics of the most-popular baseline."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def storage_options(cfg: DataConfig) -> StorageOptions:
    options = StorageOptions.from_env()
    if cfg.s3_endpoint_url:
        options = dataclasses.replace(options, endpoint_url=cfg.s3_endpoint_url)
    return options


def open_features(
    cfg: DataConfig, dataset: SequenceDataset, options: StorageOptions
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The frozen (N + 1, D) text and image tables, checked against the dataset."""
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
    if "://" in out_dir:
        raise ValueError(f"run.out_dir must be a local path for now, got {out_dir!r}")
    name = name or time.strftime("fmrl-%Y%m%d-%H%M%S")
    run_dir = os.path.join(out_dir, name)
    os.makedirs(run_dir, exist_ok=True)
    return run_dir


def train_step(
    model: FMRLRec,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: TrainBatch,
    grad_clip: float,
) -> tuple[float, torch.Tensor]:
    """One optimizer step. Returns the loss and the (K,) per-size losses."""
    optimizer.zero_grad(set_to_none=True)  # before the forward pass: old gradients would add to its peak
    hidden, items = model(batch.tokens)  # (B, L, D), (N+1, D)
    loss, per_size = matryoshka_loss(
        hidden, items, batch.labels, model.cfg.nested_sizes, model.cfg.loss_chunk_mb
    )
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.item(), per_size


def trainable_state(model: FMRLRec) -> dict[str, torch.Tensor]:
    """A detached copy of everything but the frozen feature tables (they never change)."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in frozen}


def save_weights(state: dict[str, torch.Tensor], path: str) -> None:
    tmp = f"{path}.tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    os.replace(tmp, path)


def write_json(obj: object, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def train(cfg: Config) -> RunResult:
    """Train, early-stop on validation NDCG@10 at the largest size, test the best model, write the report."""
    world = World.from_env()
    if world.world_size > 1:
        raise RuntimeError(
            "this trainer runs as one process; launch it with plain `fmrl train`, not torchrun"
        )
    seed_everything(cfg.train.seed)
    threads = set_cpu_threads(cfg.train.num_threads, world)
    run_dir = make_run_dir(cfg.run.out_dir, cfg.run.name)
    dump_config(cfg, os.path.join(run_dir, "config.yaml"))
    log.info("run directory %s (%d CPU threads)", run_dir, threads)

    options = storage_options(cfg.data)
    dataset = SequenceDataset.open(cfg.data.path, options)
    text_features, image_features = open_features(cfg.data, dataset, options)
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
    sizes, ks, largest = cfg.model.nested_sizes, cfg.eval.ks, cfg.model.nested_sizes[-1]
    log.info(
        "dataset %s: %d items, %d users; model %s: %.2fM trainable parameters",
        dataset.url,
        dataset.num_items,
        dataset.num_users,
        sizes,
        model.num_parameters() / 1e6,
    )

    total_steps = sum(loader.steps_in_epoch(epoch) for epoch in range(cfg.train.epochs))
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay)
    scheduler = cosine_with_warmup(optimizer, cfg.train.warmup_steps, total_steps)
    writer = None
    if cfg.run.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def validation_batches():
        return eval_batches(
            dataset, "valid", cfg.eval.batch_size, cfg.train.max_len, max_users=cfg.eval.max_users
        )

    def test_batches():
        return eval_batches(
            dataset, "test", cfg.eval.batch_size, cfg.train.max_len, max_users=cfg.eval.max_users
        )

    result = RunResult(run_dir=run_dir, best_epoch=0, steps=0)
    best_score, best_state, epochs_without_gain = float("-inf"), trainable_state(model), 0
    model.train()
    for epoch in range(1, cfg.train.epochs + 1):
        batches_per_epoch = loader.steps_in_epoch(loader.epoch)
        bar = tqdm(
            loader,
            total=batches_per_epoch,
            desc=f"epoch {epoch}",
            disable=not cfg.run.progress_bar,
            leave=False,
            # redraws flood log files (batch jobs, CI): redraw rarely when stderr is not a terminal
            mininterval=0.1 if sys.stderr.isatty() else 30.0,
        )
        window_start, window_sequences = time.perf_counter(), 0
        for batch in bar:
            loss, per_size = train_step(model, optimizer, scheduler, batch, cfg.train.grad_clip)
            result.steps += 1
            result.train_losses.append(loss)
            window_sequences += len(batch.tokens)
            throughput = window_sequences / (time.perf_counter() - window_start)
            bar.set_postfix(loss=f"{loss:.4f}", seq_per_s=f"{throughput:.0f}")
            if writer is not None and result.steps % cfg.run.log_every == 0:
                writer.add_scalar("train/loss", loss, result.steps)
                for size, value in zip(sizes, per_size.tolist()):
                    writer.add_scalar(f"train/loss_size_{size}", value, result.steps)
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], result.steps)
                writer.add_scalar("train/sequences_per_s", throughput, result.steps)
            if result.steps >= total_steps:
                break

        valid = evaluate(model, validation_batches(), sizes, ks, cfg.eval.exclude_history)
        score = valid[largest][EARLY_STOPPING_METRIC]
        if writer is not None:
            for size, values in valid.items():
                for name, value in values.items():
                    writer.add_scalar(f"valid_size_{size}/{name}", value, result.steps)
        improved = score > best_score
        log.info(
            "epoch %d: loss %.4f, valid %s at size %d = %.4f%s",
            epoch,
            np.mean(result.train_losses[-batches_per_epoch:]),
            EARLY_STOPPING_METRIC,
            largest,
            score,
            " (best)" if improved else "",
        )
        if improved:
            best_score, best_state, epochs_without_gain = score, trainable_state(model), 0
            result.best_epoch, result.valid_metrics = epoch, valid
        else:
            epochs_without_gain += 1
            if epochs_without_gain >= cfg.train.patience:
                log.info("early stopping: no gain in %d epochs", cfg.train.patience)
                break
        if result.steps >= total_steps:
            break

    missing, unexpected = model.load_state_dict(best_state, strict=False)
    assert not unexpected and all(not p.requires_grad for n, p in model.named_parameters() if n in missing)
    save_weights(best_state, os.path.join(run_dir, "model.safetensors"))

    result.test_metrics = evaluate(model, test_batches(), sizes, ks, cfg.eval.exclude_history)
    popularity = torch.from_numpy(stats.train_item_counts[1:].astype(np.float64))  # (N,)
    result.popularity_metrics = evaluate_popularity(popularity, test_batches(), ks, cfg.eval.exclude_history)
    if writer is not None:
        for size, values in result.test_metrics.items():
            for name, value in values.items():
                writer.add_scalar(f"test_size_{size}/{name}", value, result.steps)
        writer.close()
    report(cfg, result)
    return result


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
