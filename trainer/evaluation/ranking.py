"""Full-ranking evaluation of the (distributed) fMRL model at every nested size, and the most-popular
baseline.

Items are sharded by contiguous id ranges over the ranks: each rank builds the representations of its
range only and scores every rank's queries against it (:mod:`trainer.evaluation.sharded`), so no rank
holds the full score matrix. Users are split over ranks as the shard reader splits them; metric sums
are added over ranks at the end. With one rank this is plain full ranking.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from data_pipeline.loader import SequenceDataset, eval_batch_count, eval_batches
from data_pipeline.sequences import EvalBatch
from models.fmrl import FMRLRec, nested_scores
from sharding.fmrl import ParallelFMRL
from trainer.dist import all_reduce_sum
from trainer.evaluation.metrics import METRIC_NAMES, RankingMetrics, target_ranks
from trainer.evaluation.sharded import item_shard_range, sharded_target_ranks
from trainer.logs import progress_bar


def _rank_batches(
    dataset: SequenceDataset, split: str, batch_size: int, max_len: int, max_users: int
) -> tuple[Iterator[EvalBatch], int]:
    """This rank's batches, padded with None up to the largest count of any rank (every rank must join
    every collective)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    counts = [
        eval_batch_count(dataset, batch_size, rank=r, world_size=world, max_users=max_users)
        for r in range(world)
    ]
    mine = eval_batches(dataset, split, batch_size, max_len, rank=rank, world_size=world, max_users=max_users)
    return mine, max(counts)


ITEM_CHUNK = 16_384
"""Items whose representations are built at a time (the temporaries of a 10M-item shard would not fit)."""


def _item_shard(parallel: ParallelFMRL, num_items: int, device: torch.device) -> torch.Tensor:
    """(S, D) representations of this rank's items (``item_shard_range``), ITEM_CHUNK at a time, written
    into the shard in place (joining the chunks afterwards would hold the shard twice). Every rank makes
    the same number of (collective) calls; one whose range is used up joins with item 1."""
    rank, world = dist.get_rank(), dist.get_world_size()
    lo, hi = item_shard_range(num_items, rank, world)
    largest = -(-num_items // world)  # the first ranks' shards
    shard: torch.Tensor | None = None
    for start in range(lo, lo + max(largest, 1), ITEM_CHUNK):
        ids = torch.arange(start, min(start + ITEM_CHUNK, hi), device=device)
        vectors = parallel.item_representations(
            ids if len(ids) else torch.ones(1, dtype=torch.int64, device=device)
        )
        if shard is None:
            shard = vectors.new_empty(hi - lo, vectors.shape[1])
        shard[start - lo : start - lo + len(ids)] = vectors[: len(ids)]
    assert shard is not None
    return shard


def reduce_metrics(metrics: RankingMetrics, keys: Sequence[int]) -> dict[int, dict[str, float]]:
    """Add the per-rank metric sums and counts over all ranks, then average."""
    names = [f"{m}@{k}" for m in METRIC_NAMES for k in metrics.ks]
    sums = metrics.sums()
    packed = torch.tensor(
        [[sums.get(key, {}).get(name, 0.0) for name in names] + [metrics.count(key)] for key in keys],
        dtype=torch.float64,
    )
    total = all_reduce_sum(packed)
    return {
        key: {name: float(total[i, j] / max(total[i, -1], 1.0)) for j, name in enumerate(names)}
        for i, key in enumerate(keys)
    }


@torch.no_grad()
def evaluate(
    parallel: ParallelFMRL,
    dataset: SequenceDataset,
    split: str,
    sizes: Sequence[int],
    ks: Sequence[int],
    *,
    exclude_history: bool,
    batch_size: int,
    max_len: int,
    max_users: int = 0,
    device: torch.device | None = None,
    progress: bool = False,
) -> dict[int, dict[str, float]]:
    """Full-ranking metrics of ``split`` ("valid" or "test") per nested size: {size: {"NDCG@10": ...}};
    ``progress`` shows a progress bar (rank 0's batches)."""
    device = device or torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    parallel.set_training(False)
    item_shard = _item_shard(parallel, dataset.num_items, device)  # (S, D)
    lo, _ = item_shard_range(dataset.num_items, rank, world)
    batches, count = _rank_batches(dataset, split, batch_size, max_len, max_users)
    metrics = RankingMetrics(ks)
    for _ in progress_bar(range(count), total=count, desc=split, enabled=progress):
        batch = next(batches, None)
        if batch is None:  # this rank is done; join the collectives with no queries
            tokens = torch.zeros(0, 1, dtype=torch.int64, device=device)
            targets = torch.zeros(0, dtype=torch.int64, device=device)
        else:
            tokens, targets = batch.tokens.to(device), batch.targets.to(device)
        query = parallel.last_hidden(tokens)  # (b, D)
        history = tokens if exclude_history else None
        for size in sizes:
            ranks = sharded_target_ranks(query[:, :size], targets, item_shard[:, :size], lo, history)
            if len(ranks):
                metrics.update(size, ranks.cpu())
    parallel.set_training(True)
    return reduce_metrics(metrics, list(sizes))


def popularity_ranks(
    ordered: torch.Tensor, popularity: torch.Tensor, targets: torch.Tensor, history: torch.Tensor | None
) -> torch.Tensor:
    """0-based ranks of ``targets`` (B,) when items are ranked by ``popularity`` (N,) of items 1..N, the
    same as ``target_ranks`` on the (B, N) popularity scores (an item of equal popularity is not above
    the target) in O(B (log N + L log L)), without forming them.

    Args:
        ordered: (N,) ``popularity`` sorted ascending, once per evaluation (``torch.sort(p).values``).
        popularity: (N,) popularity of items 1..N.
        targets: (B,) target ids in 1..N.
        history: optional (B, L) ids excluded from the ranking (0 = padding, repeats and the target
            itself ignored).
    """
    target_pop = popularity[targets - 1]  # (B,)
    ranks = len(ordered) - torch.searchsorted(ordered, target_pop, right=True)  # (B,) items strictly above
    if history is None:
        return ranks
    # every distinct seen id (not padding) strictly above the target was counted once; the target
    # itself never is (its popularity is not above its own), so it needs no mask
    ids = torch.sort(history, dim=1).values  # (B, L)
    distinct = torch.ones_like(ids, dtype=torch.bool)
    distinct[:, 1:] = ids[:, 1:] != ids[:, :-1]  # first of each run of equal ids
    above = popularity[(ids - 1).clamp(min=0)] > target_pop.unsqueeze(1)  # (B, L); id 0 masked next
    return ranks - (distinct & above & (ids != 0)).sum(dim=1)


def evaluate_popularity(
    popularity: torch.Tensor,
    dataset: SequenceDataset,
    ks: Sequence[int],
    *,
    exclude_history: bool,
    batch_size: int,
    max_len: int,
    max_users: int = 0,
) -> dict[str, float]:
    """Test metrics of ranking every item by its training popularity (N,), over all ranks' users."""
    batches, _ = _rank_batches(dataset, "test", batch_size, max_len, max_users)
    metrics = RankingMetrics(ks)
    ordered = torch.sort(popularity).values  # (N,) once for all batches
    for batch in batches:
        history = batch.tokens if exclude_history else None
        metrics.update(0, popularity_ranks(ordered, popularity, batch.targets, history))
    return reduce_metrics(metrics, [0])[0]


@torch.no_grad()
def evaluate_model(
    model: FMRLRec,
    batches: Iterable[EvalBatch],
    sizes: Sequence[int],
    ks: Sequence[int],
    exclude_history: bool,
) -> dict[int, dict[str, float]]:
    """The single-device reference: full (B, N) scores of a plain model, per nested size. Used on
    exported or reloaded weights, and by tests to check :func:`evaluate`."""
    was_training = model.training
    model.eval()
    items = model.item_tower()  # (N+1, D), once for all batches
    metrics = RankingMetrics(ks)
    for batch in batches:
        hidden, _ = model(batch.tokens, items)  # (B, L, D)
        for size, scores in nested_scores(hidden[:, -1], items[1:], sizes).items():
            metrics.update(
                size, target_ranks(scores, batch.targets, batch.tokens if exclude_history else None)
            )
    model.train(was_training)
    return metrics.compute()
