"""Sharded full-ranking evaluation against the single-process reference, with two real gloo ranks.

The two ranks are spawned once for the module and run every case in one process group; each writes its
results to a file that the tests compare with `trainer.evaluation.metrics.target_ranks` and `torch.topk` on the full
score matrix, computed here. A worker that raises fails the module fixture, and so every test.

    .venv/bin/python -m pytest -q tests/integration/test_distributed_eval.py
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.evaluation import ranking
from trainer.evaluation.metrics import target_ranks
from trainer.evaluation.sharded import item_shard_range, sharded_target_ranks, sharded_topk

WORLD = 2


def _integer_items(generator: torch.Generator, num_items: int, dim: int) -> torch.Tensor:
    """(N, D) float64 vectors of small integers: every dot product is exact, so scores tie exactly."""
    items = torch.randint(-1, 2, (num_items, dim), generator=generator).double()
    items[5] = items[2]  # item 3 duplicated in its own shard
    items[9] = items[2]  # ... and in the other one
    return items


def _history(generator: torch.Generator, targets: torch.Tensor, length: int, num_items: int) -> torch.Tensor:
    """(B, L) ids with padding, repeats, and the target itself in every other row."""
    history = torch.randint(0, num_items + 1, (len(targets), length), generator=generator)
    history[::2, 0] = targets[::2]
    if length > 1:
        history[:, -1] = 0
    return history


def _cases() -> dict[str, dict]:
    """Every rank's inputs, by case: "targets" cases test ranks, "k" cases top-k."""
    g = torch.Generator().manual_seed(0)
    cases: dict[str, dict] = {}

    items = _integer_items(g, 11, 4)  # N odd: shards of 6 and 5
    queries = torch.randint(-2, 3, (8, 4), generator=g).double()
    queries[0] = 0  # every item ties with the target
    targets = torch.randint(1, 12, (8,), generator=g)
    targets[1] = 3  # a target with duplicated rows in both shards
    split = [5, 3]
    cases["ties"] = dict(items=items, queries=queries.split(split), targets=targets.split(split))
    history = [_history(g, t, length, 11) for t, length in zip(targets.split(split), (6, 4))]
    cases["ties_history"] = dict(items=items, queries=queries.split(split), targets=targets.split(split))
    cases["ties_history"]["history"] = history
    cases["ties_history_chunked"] = dict(cases["ties_history"], chunk_size=2)

    # rank 1 has no queries, and no history either
    split = [4, 0]
    cases["empty_rank"] = dict(
        items=items,
        queries=queries[:4].split(split),
        targets=targets[:4].split(split),
        history=[history[0][:4], None],
        chunk_size=3,
    )

    # one item for two ranks: rank 1 holds an empty shard
    cases["tiny_catalog"] = dict(
        items=torch.ones(1, 4, dtype=torch.float64),
        queries=queries[:3].split([2, 1]),
        targets=torch.ones(3, dtype=torch.long).split([2, 1]),
        history=[torch.tensor([[1, 0], [0, 0]]), torch.tensor([[1, 1]])],
    )

    # float32 random scores, with the target's row duplicated in the other shard
    items32 = torch.randn(37, 16, generator=g)
    queries32 = torch.randn(11, 16, generator=g)
    targets32 = torch.randint(1, 38, (11,), generator=g)
    targets32[0] = 2
    items32[30] = items32[1]
    split = [6, 5]
    cases["float32"] = dict(
        items=items32,
        queries=queries32.split(split),
        targets=targets32.split(split),
        history=[_history(g, t, 5, 37) for t in targets32.split(split)],
    )

    # top-k on distinct float64 scores
    items64 = torch.randn(11, 8, generator=g, dtype=torch.float64)
    queries64 = torch.randn(8, 8, generator=g, dtype=torch.float64)
    cases["topk"] = dict(items=items64, queries=queries64.split([5, 3]), k=4)
    # k above rank 1's shard of 3 items, exclusion with unequal widths, no queries on rank 1
    exclude = [torch.tensor([[1, 0], [7, 3], [0, 0]]), torch.zeros(0, 1, dtype=torch.long)]
    cases["topk_exclude"] = dict(
        items=items64[:7], queries=queries64[:3].split([3, 0]), k=5, exclude=exclude, chunk_size=2
    )
    cases["topk_all_items"] = dict(items=items64, queries=queries64.split([3, 5]), k=11)
    return cases


def _worker(rank: int, port: int, inputs: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        results: dict[str, object] = {}
        for name, case in torch.load(inputs, weights_only=True).items():
            items = case["items"]
            lo, hi = item_shard_range(items.shape[0], rank, WORLD)
            shard = items[lo - 1 : hi - 1]
            chunk = dict(chunk_size=case["chunk_size"]) if "chunk_size" in case else {}
            if "targets" in case:
                history = case.get("history", [None] * WORLD)[rank]
                results[name] = sharded_target_ranks(
                    case["queries"][rank], case["targets"][rank], shard, lo, history, **chunk
                )
            else:
                exclude = case.get("exclude", [None] * WORLD)[rank]
                results[name] = sharded_topk(case["queries"][rank], shard, lo, case["k"], exclude, **chunk)
        # inconsistent shards raise on every rank alike, instead of leaving one waiting
        case = torch.load(inputs, weights_only=True)["ties"]
        lo, hi = item_shard_range(11, rank, WORLD)
        try:
            sharded_target_ranks(
                case["queries"][rank], case["targets"][rank], case["items"][lo - 1 : hi - 1], 1
            )
        except ValueError as error:
            results["bad_shards"] = str(error)
        # the evaluation's item shard, built a chunk at a time: 7 items in chunks of 2 (rank 0 owns 4, rank
        # 1 owns 3: rank 1 joins the last collective with a dummy id), and 1 item (rank 1 owns none)
        ranking.ITEM_CHUNK = 2
        results["item_shard_7"] = ranking._item_shard(_CountingModel(), 7, torch.device("cpu"))
        results["item_shard_1"] = ranking._item_shard(_CountingModel(), 1, torch.device("cpu"))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


class _CountingModel:
    """Stands in for ParallelFMRL: an item's vector is (id, calls so far on every rank); the call is a
    collective (an all-reduce), so ranks that made different numbers of calls would hang or mismatch."""

    def __init__(self) -> None:
        self.calls = 0

    def item_representations(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        together = torch.tensor([self.calls])
        dist.all_reduce(together)
        return torch.stack([ids.double(), together.double().expand(len(ids))], dim=1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    """Both ranks' results, by case."""
    out_dir = tmp_path_factory.mktemp("distributed_eval")
    inputs = str(out_dir / "cases.pt")
    torch.save(_cases(), inputs)
    mp.spawn(_worker, args=(_free_port(), inputs, str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


def _expected_ranks(case: dict) -> list[torch.Tensor]:
    """Every rank's reference ranks, from the full (B_total, N) score matrix of one process."""
    scores = torch.cat(case["queries"]) @ case["items"].T  # (B_total, N)
    ranks, start = [], 0
    for rank in range(WORLD):
        rows = slice(start, start + len(case["targets"][rank]))
        history = case.get("history", [None] * WORLD)[rank]
        ranks.append(target_ranks(scores[rows], case["targets"][rank], history))
        start = rows.stop
    return ranks


@pytest.mark.parametrize(
    "name", ["ties", "ties_history", "ties_history_chunked", "empty_rank", "tiny_catalog"]
)
def test_sharded_ranks_equal_single_process(results, name):
    case = _cases()[name]
    for rank, expected in enumerate(_expected_ranks(case)):
        got = results[rank][name]
        assert got.dtype == torch.int64
        assert torch.equal(got, expected), (rank, got, expected)
    if name == "ties":  # the cases do exercise ties
        assert _expected_ranks(case)[0][0] == 0


def test_sharded_ranks_float32_differ_only_at_near_ties(results):
    """float32 matmuls of different shapes may round a score differently: a rank may move by at most
    the number of items whose exact score is within the rounding bound of the target's."""
    case = _cases()["float32"]
    queries, items = torch.cat(case["queries"]), case["items"]
    exact = queries.double() @ items.double().T  # (B_total, N)
    # |fl(q.x) - q.x| <= D * eps * |q|.|x|, for the item's score and the target's
    bound = (
        items.shape[1] * torch.finfo(torch.float32).eps * (queries.double().abs() @ items.double().abs().T)
    )
    column = torch.cat(case["targets"]).unsqueeze(1) - 1
    gap = (exact - exact.gather(1, column)).abs()
    near_ties = (gap <= 2 * (bound + bound.gather(1, column))).sum(dim=1) - 1  # the target itself
    assert near_ties[0] >= 1  # the target's duplicated row
    got = torch.cat([results[rank]["float32"] for rank in range(WORLD)])
    expected = torch.cat(_expected_ranks(case))
    assert ((got - expected).abs() <= near_ties).all(), (got, expected, near_ties)


@pytest.mark.parametrize("name", ["topk", "topk_exclude", "topk_all_items"])
def test_sharded_topk_equals_torch_topk(results, name):
    case = _cases()[name]
    scores = torch.cat(case["queries"]) @ case["items"].T  # (B_total, N), distinct
    if "exclude" in case:
        exclude = torch.cat([torch.nn.functional.pad(ids, (0, 2 - ids.shape[1])) for ids in case["exclude"]])
        seen = torch.zeros(scores.shape[0], scores.shape[1] + 1, dtype=torch.bool).scatter_(1, exclude, True)
        scores = scores.masked_fill(seen[:, 1:], float("-inf"))
    top, ids = scores.topk(case["k"], dim=1)
    start = 0
    for rank in range(WORLD):
        rows = slice(start, start + len(case["queries"][rank]))
        got_top, got_ids = results[rank][name]
        assert torch.equal(got_ids, ids[rows] + 1), rank
        # a one-row chunk (topk_exclude) is a matrix-vector product: same scores up to the last bits
        torch.testing.assert_close(got_top, top[rows], rtol=0, atol=1e-12)
        start = rows.stop


def test_inconsistent_shards_raise_on_every_rank(results):
    for rank in range(WORLD):
        assert "tile 1..N" in results[rank]["bad_shards"]


def test_the_evaluation_item_shard_is_built_in_chunks_every_rank_joining_every_call(results):
    first, second = (r["item_shard_7"] for r in results)
    assert first[:, 0].tolist() == [1, 2, 3, 4] and second[:, 0].tolist() == [5, 6, 7]
    assert first[:, 1].tolist() == [2, 2, 4, 4] and second[:, 1].tolist() == [2, 2, 4]  # 2 calls each
    assert results[0]["item_shard_1"][:, 0].tolist() == [1] and results[1]["item_shard_1"].shape == (0, 2)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("num_items", [0, 1, 2, 3, 7, 10])
def test_item_shard_range_tiles_the_catalog(num_items, world_size):
    ranges = [item_shard_range(num_items, rank, world_size) for rank in range(world_size)]
    assert ranges[0][0] == 1 and ranges[-1][1] == num_items + 1
    assert all(hi == next_lo for (_, hi), (next_lo, _) in zip(ranges, ranges[1:]))  # contiguous
    sizes = [hi - lo for lo, hi in ranges]
    assert min(sizes) >= 0 and max(sizes) - min(sizes) <= 1  # balanced; empty shards when N < W


@pytest.mark.parametrize("args", [(5, 2, 2), (5, -1, 2), (5, 0, 0), (-1, 0, 1)])
def test_item_shard_range_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        item_shard_range(*args)


def test_single_process_without_process_group():
    assert not dist.is_initialized()
    case = _cases()["ties_history"]
    queries, targets, history = case["queries"][0], case["targets"][0], case["history"][0]
    items = case["items"]
    got = sharded_target_ranks(queries, targets, items, 1, history, chunk_size=2)
    assert torch.equal(got, target_ranks(queries @ items.T, targets, history))
    topk_case = _cases()["topk"]
    top, ids = sharded_topk(topk_case["queries"][0], topk_case["items"], 1, 4)
    expected_top, expected_ids = (topk_case["queries"][0] @ topk_case["items"].T).topk(4, dim=1)
    assert torch.equal(top, expected_top) and torch.equal(ids, expected_ids + 1)
