"""DLRM in the shared training loop (``task: dlrm``): click-through-rate prediction with the same trainer,
launchers and checkpoints as fMRLRec. ``dlrm.model`` picks the architecture: DLRM (the default), or one of
the models the DLRM paper compares it with (wide_deep, deepfm, dcn, dcn_v2, xdeepfm; models/ctr), all on
this same path (sharding, checkpoints, resume, export).

    fmrl data prepare-synthetic-ctr runs/data/synthetic-ctr                 # the embedded CTR data set
    fmrl train --config configs/dlrm-synthetic.yaml                         # one process
    torchrun --nproc_per_node=2 -m trainer.cli train --config configs/dlrm-synthetic.yaml

TorchRec shards the embedding tables and the dense MLPs run under ``parallel.backend``
(sharding/dlrm.py); every rank reads its own shards of the ``train`` split (:class:`CTRTrainLoader`, the
same resumable machinery as the sequence loader) and the loss is binary cross-entropy. After every epoch
the validation split gives ROC AUC and log loss and early stopping follows the validation AUC. At the end
the best model is tested against the constant predictor (the training click rate): its log loss is the
denominator of the normalised entropy (NE, He et al. 2014), so NE < 1 means the model has learnt
something beyond the base rate (trainer/evaluation/ctr.py). The loop itself is :func:`trainer.train.train`.
"""

from __future__ import annotations

import logging
import os

import torch

from data_pipeline.ctr import CTRBatch, CTRDataset
from data_pipeline.loader import CTRTrainLoader
from data_pipeline.storage import StorageOptions
from models.ctr import build_ctr_model
from models.dlrm import ctr_loss
from sharding.config import OptimConfig, ParallelConfig
from sharding.dlrm import ParallelDLRM, parallelize_dlrm
from sharding.world import World
from trainer.config import DataConfig, DLRMSection, EvalConfig, TrainConfig
from trainer.dist import all_reduce_sum
from trainer.evaluation.ctr import constant_logloss, ctr_score, evaluate_ctr
from trainer.export import export_model, load_trained_model
from trainer.tasks.base import RunResult, TrainingTask, total_training_steps, write_json

log = logging.getLogger("fmrl")

EARLY_STOPPING_METRIC = "auc"
MODEL_LABELS = {
    "dlrm": "DLRM",
    "wide_deep": "Wide & Deep",
    "deepfm": "DeepFM",
    "dcn": "DCN",
    "dcn_v2": "DCN v2",
    "xdeepfm": "xDeepFM",
}
"""``dlrm.model`` -> the model's name in tables and logs."""


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


class DLRMTask(TrainingTask):
    """DLRM on a CTR data set (``data.path``, written by ``fmrl data convert-criteo`` and friends)."""

    sample_unit = "impressions"
    model_section = "dlrm"
    early_stopping = "valid AUC"

    def __init__(
        self,
        *,
        model: DLRMSection,
        data: DataConfig,
        train: TrainConfig,
        optim: OptimConfig,
        parallel: ParallelConfig,
        evaluation: EvalConfig,
        export: bool,
        world: World,
        device: torch.device,
        options: StorageOptions,
    ) -> None:
        self.model_name = MODEL_LABELS[model.model]
        self.world, self.options, self.eval_batch_size, self.export = (
            world,
            options,
            evaluation.batch_size,
            export,
        )
        dataset = self.dataset = CTRDataset.open(data.path, options)
        self.loader = CTRTrainLoader(
            dataset,
            batch_size=train.batch_size,
            seed=train.seed,
            rank=world.rank,
            world_size=world.world_size,
            num_workers=data.num_workers,
            prefetch_factor=data.prefetch_factor,
            options=options,
        )
        model_cfg = model.model_config(
            num_dense=len(dataset.dense_features),
            hash_buckets=dataset.hash_buckets,
            feature_names=dataset.sparse_features,
        )
        # tables on meta: sharded from birth, each rank generates only its shards' rows
        dlrm = build_ctr_model(model_cfg, sparse_device="meta")
        parameters = sum(p.numel() for p in dlrm.parameters())
        self.total_steps = total_training_steps(
            self.loader, train.epochs, optim.grad_accum_steps, train.max_steps
        )
        self.parallel = parallelize_dlrm(
            dlrm,
            parallel,
            optim,
            total_steps=self.total_steps,
            micro_batch_size=train.batch_size,
            device=device,
        )
        # the data facts that shape the tables (and let `fmrl export` rebuild the model from a checkpoint)
        self.identity = {
            "num_dense": len(dataset.dense_features),
            "hash_buckets": dataset.hash_buckets,
            "sparse_features": dataset.sparse_features,
        }
        if world.rank == 0:
            log.info(
                "CTR data set %s: %d dense, %d categorical features, %s impressions; model %s (%s interaction): "
                "%.2fM parameters; dense backend %s on %d rank(s); table plan:\n%s",
                dataset.url,
                len(dataset.dense_features),
                len(dataset.sparse_features),
                dataset.rows,
                model_cfg.model,
                model_cfg.interaction if model_cfg.model == "dlrm" else "its own",
                parameters / 1e6,
                parallel.backend,
                world.world_size,
                self.parallel.sparse.plan,
            )

    def train_step(self, batch: CTRBatch) -> tuple[float, float, int]:
        loss_sum, count = forward_backward(self.parallel, batch, self.world.world_size)
        return loss_sum, count, count

    def evaluate(self, split: str) -> dict[str, float]:
        return evaluate_ctr(
            self.parallel,
            self.dataset.url,
            split,
            self.eval_batch_size,
            self.world,
            self.options,
            progress=self.progress_bar,
        )

    def score(self, metrics: dict[str, float]) -> float:
        return ctr_score(metrics)

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
        table = format_ctr_table(result, self.model_name)
        with open(os.path.join(result.run_dir, "test_metrics.txt"), "w") as f:
            f.write(table + "\n")
        write_json(
            {
                "best_epoch": result.best_epoch,
                "steps": result.steps,
                "skipped_steps": result.skipped_steps,
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
        if self.export:
            out = os.path.join(result.run_dir, "export")
            manifest = export_model(load_trained_model(result.run_dir, self.options), out, None, self.options)
            print(f"export: {self.model_name} ({manifest['bytes'] / 2**20:.1f} MiB) in {out}")


def format_ctr_table(result: RunResult, model: str = "DLRM") -> str:
    rows = [(model, result.test_metrics), ("constant (training click rate)", result.baseline_metrics)]
    lines = [f"{'model':<32}{'AUC':>8}{'log loss':>10}{'NE':>8}"]
    lines += [f"{name:<32}{m['auc']:>8.4f}{m['logloss']:>10.4f}{m['ne']:>8.4f}" for name, m in rows]
    return "\n".join(lines)
