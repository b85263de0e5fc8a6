"""Full-ranking evaluation with the item representations sharded across ranks by contiguous row ranges.

Each rank holds the vectors of items ``shard_lo .. shard_lo + S - 1`` (see `item_shard_range`) and its own
queries. No rank ever builds the (B, N) score matrix: the queries of all ranks are all-gathered, every rank
scores them against its shard only, ``chunk_size`` rows at a time, and the per-shard results are summed
(ranks) or merged (top-k) with collectives. Any backend works (gloo for CPU tensors); without an
initialised process group, or with one rank, it is the plain single-process computation.

Shapes: B this rank's queries, B_total all ranks' queries, D width, S this rank's shard, N all items,
L history length, k top-k size, W world size.

Ranks are counted a (chunk, block) tile at a time: ``block`` items of the shard against ``chunk`` queries,
so the tile (8 MB by default) stays in cache while it is compared with the targets' scores. Measured on
the 2-core VM, one thread, 500 queries against 500k items: 3-4 s with the whole (500, 500k) block, 1.0 s
in tiles: the full block is written to memory and read back, the tile is not.

Exactness against one process computing ``queries @ items.T``: the target's score is one dot product,
computed by the rank that holds the target (the other ranks add exact zeros to it), and the target's own
column is never counted. The ranks are therefore identical whenever each dot product comes out the same
in both computations, which is certain only for exactly representable sums (small integers, as in the
tests' tie cases). BLAS may sum a tile in another order than a (B, N) product (a one-row chunk takes the
matrix-vector path, even in float64), so a score may differ in its last bits; a rank may then differ from
the single-process one by at most the number of items whose exact score lies within rounding (about
``2 * D * eps * |q|.|x|``) of the target's, i.e. only at near-exact ties, and top-k scores agree to
rounding, their ids exactly unless two scores are that close.

All ranks must call these functions together (they are collectives), each with its own B (0 allowed).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# a (chunk_size, S) score block is sharded_topk's largest temporary; 1024 x 125k items is 0.5 GB in float32
DEFAULT_CHUNK = 1024
TILE_ELEMENTS = 2**21
"""Scores per (chunk, block) tile of sharded_target_ranks: 8 MB of float32, within a CPU's cache."""


def item_shard_range(num_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """Half-open range [lo, hi) of the item ids (1..num_items; 0 is padding) owned by ``rank``.

    Contiguous and balanced: the first ``num_items % world_size`` ranks own one item more. With fewer
    items than ranks the last ranks get empty shards (lo == hi), which the functions below accept.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if num_items < 0:
        raise ValueError(f"num_items must be >= 0, got {num_items}")
    base, extra = divmod(num_items, world_size)
    lo = 1 + rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


@torch.no_grad()
def sharded_target_ranks(
    queries: torch.Tensor,
    targets: torch.Tensor,
    item_shard: torch.Tensor,
    shard_lo: int,
    history: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """0-based rank of each of this rank's targets among all N items, as `trainer.evaluation.metrics.target_ranks`.

    Args:
        queries: (B, D) this rank's query vectors.
        targets: (B,) target item ids in 1..N.
        item_shard: (S, D) vectors of items shard_lo .. shard_lo + S - 1.
        shard_lo: id of the shard's first item.
        history: optional (B, L) item ids to exclude (0 = padding); the target is never excluded.
        group: process group, default the world.
        chunk_size: gathered queries scored at a time (against the shard in tiles of TILE_ELEMENTS).

    Returns:
        (B,) int64 ranks: the items scored strictly higher than the target, history excluded; an item
        scored NaN counts as higher, and every item does when the target's score is NaN.
    """
    comm = _Collectives(group)
    meta = comm.meta(queries, item_shard, shard_lo, history, local_ok=targets.shape == queries.shape[:1])
    all_queries = comm.gather_rows(queries, meta[:, 0])  # (B_total, D)
    all_targets = comm.gather_rows(targets.long(), meta[:, 0])  # (B_total,)
    all_history = comm.gather_ids(history, meta, queries)  # (B_total, L_max) or None
    num_rows, num_shard = all_queries.shape[0], item_shard.shape[0]

    counts = torch.zeros(num_rows, dtype=torch.long, device=queries.device)  # (B_total,)
    for start in range(0, num_rows, chunk_size):
        rows = slice(start, min(start + chunk_size, num_rows))
        chunk = all_queries[rows]  # (C, D)
        column = all_targets[rows] - shard_lo  # (C,), the target's column if it is in this shard
        owned = ((column >= 0) & (column < num_shard)).nonzero().squeeze(1)
        # the owner computes the target's score; the other ranks contribute exact zeros
        target_score = chunk.new_zeros(chunk.shape[0])  # (C,)
        target_score[owned] = (chunk[owned] * item_shard[column[owned]]).sum(-1)
        comm.all_reduce(target_score)
        threshold = target_score.unsqueeze(1)  # (C, 1)
        history = None if all_history is None else all_history[rows]
        block = max(1, TILE_ELEMENTS // chunk.shape[0])
        tile = chunk.new_empty(chunk.shape[0] * min(block, num_shard))  # reused by every block
        for lo in range(0, num_shard, block):
            n = min(block, num_shard - lo)
            scores = torch.mm(chunk, item_shard[lo : lo + n].T, out=tile[: chunk.shape[0] * n].view(-1, n))
            # "not below" rather than "above": a NaN score, or a NaN target, counts against the model
            higher = (scores <= threshold).logical_not_()
            mine = owned[(column[owned] >= lo) & (column[owned] < lo + n)]
            higher[mine, column[mine] - lo] = False  # the target is not above itself, whatever the rounding
            if history is not None:
                # excluding the target would change nothing: it is not counted anyway
                higher &= ~_in_shard(history, shard_lo + lo, n)
            counts[rows] += higher.sum(dim=1)
    comm.all_reduce(counts)
    return counts[comm.own_rows(meta)]  # (B,)


@torch.no_grad()
def sharded_topk(
    queries: torch.Tensor,
    item_shard: torch.Tensor,
    shard_lo: int,
    k: int,
    exclude: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k items over all N for each of this rank's queries, as ``torch.topk(queries @ items.T, k)``.

    Args:
        queries: (B, D) this rank's query vectors.
        item_shard: (S, D) vectors of items shard_lo .. shard_lo + S - 1.
        shard_lo: id of the shard's first item.
        k: results per query, at most N.
        exclude: optional (B, L) item ids never to return (0 = padding). A row with fewer than k items
            left is filled up with -inf scores whose ids are unspecified.
        group: process group, default the world.
        chunk_size: gathered queries scored at a time, bounding the (chunk, S) score block.

    Returns:
        (B, k) scores, descending, and (B, k) int64 item ids in 1..N. Equal scores come in no set order;
        the scores equal the single-process ones up to float rounding (see the module docstring).
    """
    comm = _Collectives(group)
    meta = comm.meta(queries, item_shard, shard_lo, exclude, local_ok=True)
    num_items = int(meta[:, 2].sum())
    if not 0 <= k <= num_items:
        raise ValueError(f"k={k} must be in 0..{num_items}, the number of items")
    all_queries = comm.gather_rows(queries, meta[:, 0])  # (B_total, D)
    all_exclude = comm.gather_ids(exclude, meta, queries)  # (B_total, L_max) or None
    num_rows, num_shard = all_queries.shape[0], item_shard.shape[0]

    # this shard's best min(k, S) per gathered query, padded up to k with -inf so every rank sends k
    local_k = min(k, num_shard)
    best = torch.full((num_rows, k), float("-inf"), dtype=queries.dtype, device=queries.device)
    best_ids = torch.zeros(num_rows, k, dtype=torch.long, device=queries.device)  # (B_total, k)
    for start in range(0, num_rows, chunk_size):
        rows = slice(start, min(start + chunk_size, num_rows))
        scores = all_queries[rows] @ item_shard.T  # (C, S)
        if all_exclude is not None:
            scores.masked_fill_(_in_shard(all_exclude[rows], shard_lo, num_shard), float("-inf"))
        top, top_columns = scores.topk(local_k, dim=1)  # (C, local_k)
        best[rows, :local_k] = top
        best_ids[rows, :local_k] = top_columns + shard_lo

    # every rank's candidates for this rank's queries, merged: (B, W * k) -> (B, k)
    own = comm.own_rows(meta)
    candidates = torch.cat(comm.all_gather(best), dim=1)[own]
    candidate_ids = torch.cat(comm.all_gather(best_ids), dim=1)[own]
    top, picked = candidates.topk(k, dim=1)  # (B, k)
    return top, candidate_ids.gather(1, picked)


def _in_shard(ids: torch.Tensor, shard_lo: int, num_shard: int) -> torch.Tensor:
    """(C, S) mask of this shard's items among ``ids`` (C, L); ids 0 and other shards' ids are ignored."""
    local = ids - shard_lo + 1  # 1..S inside the shard
    local = torch.where((ids > 0) & (local >= 1) & (local <= num_shard), local, 0)
    # column 0 collects everything outside the shard; every write is True, so repeats are harmless
    seen = torch.zeros(ids.shape[0], num_shard + 1, dtype=torch.bool, device=ids.device)
    seen.scatter_(1, local, True)
    return seen[:, 1:]


class _Collectives:
    """The collectives used here, reduced to no-ops when there is a single process."""

    # columns of the per-rank metadata gathered first
    ROWS, ID_COLS, SHARD_ROWS, SHARD_LO, QUERY_DIM, ITEM_DIM, LOCAL_OK = range(7)

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if distributed else 0
        self.size = dist.get_world_size(group) if distributed else 1

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        if self.size == 1:
            return [tensor]
        if tensor.numel() == 0:  # the shapes agree on all ranks, so all of them skip alike
            return [tensor] * self.size
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return parts

    def all_reduce(self, tensor: torch.Tensor) -> None:
        if self.size > 1 and tensor.numel() > 0:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)

    def meta(
        self,
        queries: torch.Tensor,
        item_shard: torch.Tensor,
        shard_lo: int,
        ids: torch.Tensor | None,
        local_ok: bool,
    ) -> torch.Tensor:
        """(W, 7) sizes of every rank, checked on all ranks alike so that a bad input raises everywhere
        instead of leaving the other ranks waiting in a collective."""
        local_ok = local_ok and queries.dim() == 2 and item_shard.dim() == 2
        local_ok = local_ok and (ids is None or (ids.dim() == 2 and ids.shape[0] == queries.shape[0]))
        row = [
            queries.shape[0],
            0 if ids is None else ids.shape[1],
            item_shard.shape[0],
            shard_lo,
            queries.shape[-1],
            item_shard.shape[-1],
            int(local_ok),
        ]
        meta = torch.stack(self.all_gather(torch.tensor(row, device=queries.device))).cpu()  # (W, 7)
        bad = (meta[:, self.LOCAL_OK] == 0).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"ranks {bad}: queries (B, D), targets (B,), ids (B, L), item_shard (S, D) expected"
            )
        dims = torch.cat([meta[:, self.QUERY_DIM], meta[:, self.ITEM_DIM]]).unique().tolist()
        if len(dims) != 1:
            raise ValueError(f"queries and item shards must share one width D, got {dims}")
        shards = sorted((lo, size) for _, _, size, lo, *_ in meta.tolist() if size > 0)
        expected_lo = 1
        for lo, size in shards:
            if lo != expected_lo:
                raise ValueError(f"item shards must tile 1..N contiguously, got (lo, size) {shards}")
            expected_lo += size
        return meta

    def gather_rows(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Every rank's (B_r, ...) rows concatenated in rank order, padded to the largest B_r to gather."""
        counts = counts.tolist()
        if self.size == 1 or max(counts) == 0:
            return rows
        padded = rows.new_zeros((max(counts), *rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        return torch.cat([part[:n] for part, n in zip(self.all_gather(padded), counts)])

    def gather_ids(
        self, ids: torch.Tensor | None, meta: torch.Tensor, queries: torch.Tensor
    ) -> torch.Tensor | None:
        """(B_total, L_max) id lists of all ranks, 0-padded; None when no rank has one."""
        width = int(meta[:, self.ID_COLS].max())
        if width == 0:
            return None
        padded = torch.zeros(queries.shape[0], width, dtype=torch.long, device=queries.device)
        if ids is not None:
            padded[:, : ids.shape[1]] = ids
        return self.gather_rows(padded, meta[:, self.ROWS])

    def own_rows(self, meta: torch.Tensor) -> slice:
        """This rank's rows among the gathered B_total."""
        start = int(meta[: self.rank, self.ROWS].sum())
        return slice(start, start + int(meta[self.rank, self.ROWS]))
