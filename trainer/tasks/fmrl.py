"""fMRLRec in the shared training loop (``task: fmrl``, the default): Matryoshka training of the nested
LRU model, evaluation at every nested size, early stopping on NDCG@10 at the largest size, the per-size
report against the most-popular baseline.

TorchRec shards the item tables, the dense trunk runs under ``parallel.backend`` (sharding/fmrl.py), every
rank reads its own part of the user shards, and evaluation ranks against item representations sharded
over the ranks. The loop itself is :func:`trainer.train.train`; :meth:`FMRLTask.from_config` picks the
config sections the task uses.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.features import FeatureTableReader, open_feature_tables
from data_pipeline.loader import SequenceDataset, TrainLoader, read_item_source_ids, scan_users
from data_pipeline.sequences import TrainBatch
from data_pipeline.storage import StorageOptions
from models.fmrl import (
    FMRLRec,
    NegativeSampler,
    candidate_set,
    matryoshka_loss,
    sampled_matryoshka_loss,
)
from models.fmrl.config import FMRLConfig
from sharding.config import OptimConfig, ParallelConfig
from sharding.fmrl import ParallelFMRL, parallelize_fmrl
from sharding.world import World
from trainer.config import DataConfig, EvalConfig, TrainConfig
from trainer.dist import all_reduce_sum
from trainer.evaluation.ranking import evaluate, evaluate_popularity
from trainer.export import ItemCatalog, export_items, open_attributes, open_run_items
from trainer.logs import StartupPhases
from trainer.plan import mean_bag_size, step_lookups
from trainer.report import format_size_table, save_size_plot
from trainer.tasks.base import RunResult, TrainingTask, total_training_steps, write_json

log = logging.getLogger("fmrl")

EARLY_STOPPING_METRIC = "NDCG@10"


def open_features(
    cfg: DataConfig, dataset: SequenceDataset, options: StorageOptions, needed: bool = True
) -> dict[str, FeatureTableReader]:
    """Readers of the frozen (N + 1, D) text and image tables ("text", "image"; none if the model uses
    neither), checked against the dataset. Nothing but the files' headers is read here: each rank reads
    its own shards when the tables are sharded (sharding/fmrl.py)."""
    if not needed:
        return {}
    text, image, info = open_feature_tables(cfg.features_url, options)
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
    return {name: reader for name, reader in (("text", text), ("image", image)) if reader is not None}


def meta_features(readers: dict[str, FeatureTableReader], name: str) -> torch.Tensor | None:
    """The shape of feature table ``name`` as a meta tensor (no storage), None if there is none."""
    reader = readers.get(name)
    return None if reader is None else torch.empty(reader.shape, device="meta")


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


class FMRLTask(TrainingTask):
    """fMRLRec on a sequence data set (``data.path``) with its frozen feature tables (``data.features_url``)."""

    sample_unit = "sequences"
    model_section = "model"
    early_stopping = f"valid {EARLY_STOPPING_METRIC} at the largest size"

    def __init__(
        self,
        *,
        model: FMRLConfig,
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
        self.train_cfg, self.eval_cfg, self.export, self.device, self.options = (
            train,
            evaluation,
            export,
            device,
            options,
        )
        phases = StartupPhases(world.rank)
        dataset = self.dataset = SequenceDataset.open(data.path, options)
        loss_kind = train.loss_for(dataset.num_items)  # refuses an unplannable full softmax first
        uses_features = model.use_text_features or model.use_image_features
        features = open_features(data, dataset, options, uses_features)
        phases.done("features opened")
        self.stats = scan_users(dataset, world.rank, world.world_size)
        phases.done("users scanned")
        self.loader = TrainLoader(
            dataset,
            self.stats,
            batch_size=train.batch_size,
            max_len=train.max_len,
            seed=train.seed,
            rank=world.rank,
            world_size=world.world_size,
            num_workers=data.num_workers,
            prefetch_factor=data.prefetch_factor,
        )
        attribute_bags = open_attributes(dataset, model.use_attributes)
        phases.done("attributes read")
        # sharded from birth: no table exists whole on any rank; each rank materialises its shards
        fmrl = FMRLRec(
            model,
            dataset.num_items,
            meta_features(features, "text"),
            meta_features(features, "image"),
            attribute_bags,
            table_device="meta",
        )
        self.sizes, self.largest = list(model.nested_sizes), model.nested_sizes[-1]
        trainable = self.trainable_parameters = fmrl.num_parameters()
        self.total_steps = total_training_steps(
            self.loader, train.epochs, optim.grad_accum_steps, train.max_steps
        )
        self.parallel = parallelize_fmrl(
            fmrl,
            parallel,
            optim,
            total_steps=self.total_steps,
            micro_batch_size=train.batch_size,
            device=device,
            frozen_tables=features,
            lookups=step_lookups(train, dataset.num_items, mean_bag_size(attribute_bags)),
        )
        phases.done("tables planned and built")
        for name, reader in features.items():
            log.info(
                "rank %d read %.1f MiB of the %s feature table's %.1f MiB (%d range requests)",
                world.rank,
                reader.bytes_read / 2**20,
                name,
                reader.nbytes / 2**20,
                reader.requests,
            )
        sampler = None
        if loss_kind == "sampled":
            counts = torch.from_numpy(self.stats.train_item_counts[1:].astype(np.float64))
            sampler = NegativeSampler(
                dataset.num_items,
                train.num_negatives,
                train.negative_sampling,
                counts if train.negative_sampling == "popularity" else None,
            )
        self.inputs = StepInputs(
            sizes=self.sizes,
            num_items=dataset.num_items,
            loss_kind=loss_kind,
            chunk_mb=model.loss_chunk_mb,
            sampler=sampler,
            # different negatives on every rank, the same on a rerun
            generator=torch.Generator().manual_seed(train.seed * 1000 + world.rank),
            device=device,
        )
        phases.done("sampler built")
        phases.report()
        self.identity = {"num_items": dataset.num_items}
        self._per_size = torch.zeros(len(self.sizes))
        if world.rank == 0:
            log.info(
                "dataset %s: %d items, %d users; model %s: %.2fM trainable parameters; %s softmax; "
                "dense backend %s on %d rank(s); table plan:\n%s",
                dataset.url,
                dataset.num_items,
                dataset.num_users,
                self.sizes,
                trainable / 1e6,
                loss_kind,
                parallel.backend,
                world.world_size,
                self.parallel.sparse.plan,
            )

    def train_step(self, batch: TrainBatch) -> tuple[float, float, int]:
        loss_sum, positions, self._per_size = forward_backward(self.parallel, batch, self.inputs)
        return loss_sum, positions, len(batch.tokens)

    def train_scalars(self) -> dict[str, float]:
        return {f"train/loss_size_{s}": v for s, v in zip(self.sizes, self._per_size.tolist())}

    def evaluate(self, split: str) -> dict[int, dict[str, float]]:
        ev = self.eval_cfg
        return evaluate(
            self.parallel,
            self.dataset,
            split,
            self.sizes,
            ev.ks,
            exclude_history=ev.exclude_history,
            batch_size=ev.batch_size,
            max_len=self.train_cfg.max_len,
            max_users=ev.max_users,
            device=self.device,
            progress=self.progress_bar,
        )

    def score(self, metrics: dict[int, dict[str, float]]) -> float:
        return metrics[self.largest][EARLY_STOPPING_METRIC]

    def describe(self, metrics: dict[int, dict[str, float]]) -> str:
        return f"{EARLY_STOPPING_METRIC} at size {self.largest} = {self.score(metrics):.4f}"

    def scalars(self, split: str, metrics: dict[int, dict[str, float]]) -> dict[str, float]:
        return {
            f"{split}_size_{size}/{name}": value
            for size, values in metrics.items()
            for name, value in values.items()
        }

    def metrics_from_json(self, metrics: dict[str, Any]) -> dict[int, dict[str, float]]:
        return {int(size): values for size, values in metrics.items()}

    def rank_state(self) -> dict[str, Any]:
        return {"negatives_rng": self.inputs.generator.get_state().tolist()}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        self.inputs.generator.set_state(torch.tensor(state["negatives_rng"], dtype=torch.uint8))

    def test(self) -> tuple[dict[int, dict[str, float]], dict[str, float]]:
        ev = self.eval_cfg
        test = self.evaluate("test")
        popularity = torch.from_numpy(self.stats.train_item_counts[1:].astype(np.float64))  # (N,)
        most_popular = evaluate_popularity(
            popularity,
            self.dataset,
            ev.ks,
            exclude_history=ev.exclude_history,
            batch_size=ev.batch_size,
            max_len=self.train_cfg.max_len,
            max_users=ev.max_users,
        )
        return test, most_popular

    def report(self, result: RunResult) -> None:
        """The per-size test table (printed and saved), metrics.json, the plot; the export if asked."""
        ks, largest = self.eval_cfg.ks, self.largest
        table = format_size_table(result.test_metrics, ks, result.baseline_metrics)
        with open(os.path.join(result.run_dir, "test_metrics.txt"), "w") as f:
            f.write(table + "\n")
        write_json(
            {
                "best_epoch": result.best_epoch,
                "epochs": result.epochs,
                "steps": result.steps,
                "skipped_steps": result.skipped_steps,
                "train_seconds": result.train_seconds,
                "trainable_parameters": self.trainable_parameters,
                "train_losses": result.train_losses,
                "test": {str(k): v for k, v in result.test_metrics.items()},
                "valid": {str(k): v for k, v in result.valid_metrics.items()},
                "most_popular": result.baseline_metrics,
            },
            os.path.join(result.run_dir, "metrics.json"),
        )
        plot = os.path.join(result.run_dir, "metrics_by_size.png")
        save_size_plot(
            result.test_metrics, ks, plot, "fMRL-LRU test metrics by nested size", result.baseline_metrics
        )
        model_ndcg = result.test_metrics[largest][EARLY_STOPPING_METRIC]
        popular_ndcg = result.baseline_metrics[EARLY_STOPPING_METRIC]
        print(f"\nTest metrics of the best model (epoch {result.best_epoch}), full ranking over all items:\n")
        print(table)
        # a ratio over a baseline that placed no target in its top k would be a meaningless huge number
        ratio = f"{model_ndcg / popular_ndcg:.1f}x" if popular_ndcg > 0 else "most-popular ranked no target"
        print(
            f"\ntest {EARLY_STOPPING_METRIC}: fMRL-LRU (size {largest}) {model_ndcg:.4f}"
            f" vs most-popular {popular_ndcg:.4f} ({ratio})"
        )
        print(f"plot: {plot}\nrun directory: {result.run_dir}")
        if self.export:
            out = os.path.join(result.run_dir, "export")
            catalog = ItemCatalog(
                read_item_source_ids(self.dataset),
                torch.from_numpy(self.stats.train_item_counts.astype(np.float32)),
            )
            # streamed: the item table is computed and written block by block, never whole
            manifest = export_items(
                open_run_items(result.run_dir, self.options), out, self.sizes, self.options, catalog
            )
            total = sum(entry["bytes"] for entry in manifest["sizes"].values())
            print(f"export: sizes {self.sizes} ({total / 2**20:.1f} MiB) in {out}")
