"""DLRM in the shared training loop (``task: dlrm``): click-through-rate prediction with the same trainer,
launchers and checkpoints as fMRLRec.

    fmrl data prepare-synthetic-ctr runs/data/synthetic-ctr                 # the embedded CTR data set
    fmrl train --config configs/dlrm-synthetic.yaml                         # one process
    torchrun --nproc_per_node=2 -m trainer.cli train --config configs/dlrm-synthetic.yaml

TorchRec shards the embedding tables and the dense MLPs run under ``parallel.backend``
(sharding/dlrm.py); every rank reads its own shards of the ``train`` split (:class:`CTRTrainLoader`, the
same resumable machinery as the sequence loader) and the loss is binary cross-entropy. After every epoch
the validation split gives ROC AUC and log loss and early stopping follows the validation AUC. At the end
the best model is tested against the constant predictor (the training click rate): its log loss is the
denominator of the normalised entropy (NE, He et al. 2014), so NE < 1 means the model has learnt
something beyond the base rate. The loop itself is :func:`trainer.train.train`.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.ctr import CTRBatch, CTRDataset, iter_ctr_batches, split_shards
from data_pipeline.loader import CTRTrainLoader
from data_pipeline.storage import StorageOptions
from models.dlrm import DLRM, ctr_loss, roc_auc
from sharding.dlrm import ParallelDLRM, parallelize_dlrm
from sharding.world import World
from trainer.config import Config
from trainer.dist import all_reduce_sum
from trainer.export import export_model, load_trained_model
from trainer.train import RunResult, TrainingTask, dense_settings, total_training_steps, write_json

log = logging.getLogger("fmrl")

EARLY_STOPPING_METRIC = "auc"


def forward_backward(parallel: ParallelDLRM, batch: CTRBatch, world_size: int) -> tuple[float, int]:
    """Forward and backward of one micro-batch. Returns this rank's BCE sum and impression count.

    The loss is scaled by this rank's share of the global batch, so that averaging the gradients over
    ranks (DDP, FSDP2, ZeRO; TorchRec divides the table gradients by the world size too) gives exactly
    the gradient of the mean over the global batch, also when the ranks' last batches differ in size."""
    count = len(batch.labels)
    global_count = float(all_reduce_sum(torch.tensor([count]))[0])
    logits = parallel.forward(batch.dense, batch.sparse)  # (B,)
    loss = ctr_loss(logits, batch.labels.to(logits.device))
    parallel.backward(loss * (count * world_size / global_count))
    return float(loss.detach()) * count, count


def evaluate_ctr(
    parallel: ParallelDLRM,
    url: str,
    split: str,
    batch_size: int,
    world: World,
    options: StorageOptions | None = None,
) -> dict[str, float]:
    """ROC AUC and mean log loss of ``split``, exact over all its impressions, in batches of ``batch_size``
    impressions over all ranks. Rank r reads shards r, r+R, ... of the split (:func:`split_shards`), so
    the split is read once in all. The table lookups are collective: every rank makes as many forward
    calls as the rank with the most batches, a rank with no rows left looking up one dummy row. The
    scores are gathered on every rank. The AUC is NaN if the split has one class only."""
    per_rank = max(1, batch_size // world.world_size)
    rows = sum(
        e.samples for e in split_shards(url, split, options, rank=world.rank, world_size=world.world_size)
    )
    calls = torch.tensor([math.ceil(rows / per_rank)])
    dist.all_reduce(calls, op=dist.ReduceOp.MAX)
    batches = iter_ctr_batches(
        url, split, per_rank, options=options, rank=world.rank, world_size=world.world_size
    )
    scores, labels = [], []
    parallel.set_training(False)
    with torch.no_grad():
        for _ in range(int(calls[0])):
            batch = next(batches, None)
            if batch is None:  # this rank is done: it still joins the lookup, with one row
                parallel.forward(
                    torch.zeros(1, parallel.model.cfg.num_dense),
                    torch.zeros(1, parallel.model.cfg.num_sparse, dtype=torch.int64),
                )
                continue
            scores.append(parallel.forward(batch.dense, batch.sparse).cpu())
            labels.append(batch.labels)
    parallel.set_training(True)
    mine = (torch.cat(scores).numpy(), torch.cat(labels).numpy()) if scores else None
    parts: list[Any] = [None] * world.world_size
    dist.all_gather_object(parts, mine)
    logits = torch.from_numpy(np.concatenate([p[0] for p in parts if p is not None]))
    clicks = torch.from_numpy(np.concatenate([p[1] for p in parts if p is not None]))
    logloss = float(ctr_loss(logits.double(), clicks))
    try:
        auc = roc_auc(logits, clicks)
    except ValueError:
        auc = float("nan")
    return {"auc": auc, "logloss": logloss, "impressions": float(len(clicks))}


def constant_logloss(train_rate: float, test_rate: float) -> float:
    """Mean log loss on a split with click rate ``test_rate`` of always predicting ``train_rate``."""
    p = min(max(train_rate, 1e-12), 1 - 1e-12)
    return -(test_rate * math.log(p) + (1 - test_rate) * math.log(1 - p))


def _score(metrics: dict[str, float]) -> float:
    """Early-stopping score: the AUC, or minus the log loss on a split with one class (no AUC)."""
    return metrics["auc"] if math.isfinite(metrics["auc"]) else -metrics["logloss"]


class DLRMTask(TrainingTask):
    """DLRM on a CTR data set (``data.path``, written by ``fmrl data convert-criteo`` and friends)."""

    sample_unit = "impressions"
    model_section = "dlrm"
    early_stopping = "valid AUC"

    def __init__(self, cfg: Config, world: World, device: torch.device, options: StorageOptions) -> None:
        self.cfg, self.world, self.options = cfg, world, options
        dataset = self.dataset = CTRDataset.open(cfg.data.path, options)
        self.loader = CTRTrainLoader(
            dataset,
            batch_size=cfg.train.batch_size,
            seed=cfg.train.seed,
            rank=world.rank,
            world_size=world.world_size,
            num_workers=cfg.data.num_workers,
            prefetch_factor=cfg.data.prefetch_factor,
            options=options,
        )
        model_cfg = cfg.dlrm.model_config(
            num_dense=len(dataset.dense_features),
            hash_buckets=dataset.hash_buckets,
            feature_names=dataset.sparse_features,
        )
        model = DLRM(model_cfg)
        parameters = sum(p.numel() for p in model.parameters())
        self.total_steps = total_training_steps(self.loader, cfg.train)
        self.parallel = parallelize_from_config(model, cfg, total_steps=self.total_steps, device=device)
        # the data facts that shape the tables (and let `fmrl export` rebuild the model from a checkpoint)
        self.identity = {
            "num_dense": len(dataset.dense_features),
            "hash_buckets": dataset.hash_buckets,
            "sparse_features": dataset.sparse_features,
        }
        if world.rank == 0:
            log.info(
                "CTR data set %s: %d dense, %d categorical features, %s impressions; DLRM (%s interaction): "
                "%.2fM parameters; dense backend %s on %d rank(s); table plan:\n%s",
                dataset.url,
                len(dataset.dense_features),
                len(dataset.sparse_features),
                dataset.rows,
                model_cfg.interaction,
                parameters / 1e6,
                cfg.parallel.backend,
                world.world_size,
                self.parallel.sparse.plan,
            )

    def train_step(self, batch: CTRBatch) -> tuple[float, float, int]:
        loss_sum, count = forward_backward(self.parallel, batch, self.world.world_size)
        return loss_sum, count, count

    def evaluate(self, split: str) -> dict[str, float]:
        return evaluate_ctr(
            self.parallel, self.dataset.url, split, self.cfg.eval.batch_size, self.world, self.options
        )

    def score(self, metrics: dict[str, float]) -> float:
        return _score(metrics)

    def describe(self, metrics: dict[str, float]) -> str:
        return f"AUC {metrics['auc']:.4f}, log loss {metrics['logloss']:.4f}"

    def scalars(self, split: str, metrics: dict[str, float]) -> dict[str, float]:
        return {f"{split}/{name}": value for name, value in metrics.items()}

    def test(self) -> tuple[dict[str, float], dict[str, float]]:
        test = self.evaluate("test")
        splits = self.dataset.meta["splits"]
        baseline = constant_logloss(splits["train"]["positive_rate"], splits["test"]["positive_rate"])
        test["ne"] = test["logloss"] / baseline
        return test, {"auc": 0.5, "logloss": baseline, "ne": 1.0}

    def report(self, result: RunResult) -> None:
        """Print and save the test table and metrics.json."""
        table = format_ctr_table(result)
        with open(os.path.join(result.run_dir, "test_metrics.txt"), "w") as f:
            f.write(table + "\n")
        write_json(
            {
                "best_epoch": result.best_epoch,
                "steps": result.steps,
                "train_losses": result.train_losses,
                "valid": result.valid_metrics,
                "test": result.test_metrics,
                "constant": result.baseline_metrics,
            },
            os.path.join(result.run_dir, "metrics.json"),
        )
        impressions = int(result.test_metrics["impressions"])
        print(
            f"\nTest metrics of the best model (epoch {result.best_epoch}) on {impressions:,} impressions:\n"
        )
        print(table)
        print(f"\nrun directory: {result.run_dir}")
        if self.cfg.run.export:
            out = os.path.join(result.run_dir, "export")
            manifest = export_model(load_trained_model(result.run_dir, self.options), out, None, self.options)
            print(f"export: DLRM ({manifest['bytes'] / 2**20:.1f} MiB) in {out}")


def parallelize_from_config(
    model: DLRM, cfg: Config, *, total_steps: int, device: torch.device
) -> ParallelDLRM:
    """``parallelize_dlrm`` with the settings of ``cfg`` (the trainer's and the benchmarks' one way)."""
    return parallelize_dlrm(
        model,
        table_sharding=cfg.parallel.id_table_sharding,
        table_optimizer=cfg.parallel.id_table_optimizer,
        table_lr=cfg.parallel.id_table_lr or cfg.train.lr,
        **dense_settings(cfg, total_steps=total_steps, device=device),
    )


def format_ctr_table(result: RunResult) -> str:
    rows = [("DLRM", result.test_metrics), ("constant (training click rate)", result.baseline_metrics)]
    lines = [f"{'model':<32}{'AUC':>8}{'log loss':>10}{'NE':>8}"]
    lines += [f"{name:<32}{m['auc']:>8.4f}{m['logloss']:>10.4f}{m['ne']:>8.4f}" for name, m in rows]
    return "\n".join(lines)
