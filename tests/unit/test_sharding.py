"""Pure helpers of the distributed set-up: column-wise shard widths on nested sizes, sharding types per
device, and the popularity ranking without a score matrix."""

from __future__ import annotations

import pytest
import torch

from sharding.core import table_sharding_type
from sharding.fmrl import nested_min_partition
from trainer.evaluation.metrics import target_ranks
from trainer.evaluation.ranking import popularity_ranks

SIZES = [8, 16, 32, 64, 128]


@pytest.mark.parametrize(
    ("dim", "world", "width"),
    [(128, 1, 128), (128, 2, 64), (128, 4, 32), (128, 8, 16), (128, 3, 64), (128, 16, 8), (96, 2, 96)],
)
def test_column_shards_are_nested_sizes(dim: int, world: int, width: int) -> None:
    got = nested_min_partition(dim, SIZES, world)
    assert got == width
    assert dim % got == 0 and (dim // got <= world or got == dim)
    # every nested prefix is whole shards or lies inside the first one: it never straddles a boundary
    assert all(m % got == 0 or m < got for m in SIZES if m <= dim)


def test_auto_sharding_types_and_row_wise_needs_cuda() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert table_sharding_type("auto", cpu, "table_wise") == "table_wise"
    assert table_sharding_type("auto", cpu, "column_wise") == "column_wise"
    assert table_sharding_type("auto", cuda, "column_wise") == "row_wise"
    assert table_sharding_type("column_wise", cuda, "table_wise") == "column_wise"
    with pytest.raises(ValueError, match="row_wise table sharding needs CUDA"):
        table_sharding_type("row_wise", cpu, "table_wise")


def _dense_popularity_ranks(
    popularity: torch.Tensor, targets: torch.Tensor, history: torch.Tensor | None
) -> torch.Tensor:
    """The former (B, N + 1) formulation of the most-popular ranks, kept as a second reference."""
    target_pop = popularity[targets - 1]  # (B,)
    ranks = (popularity.unsqueeze(0) > target_pop.unsqueeze(1)).sum(1)  # (B,)
    if history is not None:
        seen = torch.zeros(len(targets), len(popularity) + 1, dtype=torch.bool)
        seen.scatter_(1, history, True)
        seen[:, 0] = False
        seen[torch.arange(len(targets)), targets] = False
        padded = torch.cat([torch.zeros(1, dtype=popularity.dtype), popularity])  # (N + 1,)
        ranks = ranks - (seen & (padded.unsqueeze(0) > target_pop.unsqueeze(1))).sum(1)
    return ranks


@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize(
    ("num_items", "batch", "length", "seed"),
    [(40, 25, 7, 0), (9, 30, 12, 1), (300, 17, 50, 2), (5, 0, 3, 3), (6, 4, 0, 4)],
)
def test_popularity_ranks_equal_full_ranking(
    exclude: bool, num_items: int, batch: int, length: int, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    popularity = torch.randint(0, 6, (num_items,), generator=generator).double()  # many ties, zeros
    targets = torch.randint(1, num_items + 1, (batch,), generator=generator)
    history = torch.randint(0, num_items + 1, (batch, length), generator=generator)  # repeats, padding
    if length > 2:
        history[::2, 0] = targets[::2]  # the target in its own history is never excluded
        history[1::2, 1] = targets[1::2]
        history[:, -1] = 0
        history[1::3, 2] = history[1::3, 0]  # a seen id twice in one row
    exclusion = history if exclude else None
    ordered = torch.sort(popularity).values
    got = popularity_ranks(ordered, popularity, targets, exclusion)
    assert got.dtype == torch.int64 and got.shape == (batch,)
    assert torch.equal(got, target_ranks(popularity.expand(batch, -1), targets, exclusion))
    assert torch.equal(got, _dense_popularity_ranks(popularity, targets, exclusion))
    if exclude and length > 2 and batch > 0:  # the exclusion does move ranks in these cases
        assert not torch.equal(got, popularity_ranks(ordered, popularity, targets, None))


# the Criteo Terabyte tables as MLPerf's DLRM-DCNv2 caps them (40M rows), D = 128
MLPERF_ROWS = [40_000_000, 39_060, 17_295, 7_424, 20_265, 3, 7_122, 1_543, 63, 40_000_000, 3_067_956]
MLPERF_ROWS += [405_282, 10, 2_209, 11_938, 155, 4, 976, 14, 40_000_000, 40_000_000, 40_000_000, 590_152]
MLPERF_ROWS += [12_973, 108, 36]


def _table_plans(cfg, topology, sharding_type: str) -> dict:
    from models.dlrm import SparseArch
    from sharding.dlrm import plan_tables

    plan = plan_tables(SparseArch(cfg, device="meta"), topology, sharding_type)
    return plan.get_plan_for_module("embedding_bag_collection")


def test_dlrm_tables_plan_row_wise_on_a_simulated_64_gpu_cluster() -> None:
    from torchrec.distributed.planner import Topology

    from models.dlrm import DLRMConfig

    cfg = DLRMConfig(hash_buckets=MLPERF_ROWS, embedding_dim=128, bottom_mlp=[512, 256, 128])
    topology = Topology(world_size=64, local_world_size=8, compute_device="cuda", hbm_cap=80 * 2**30)
    plans = _table_plans(cfg, topology, table_sharding_type("auto", torch.device("cuda", 0), "table_wise"))
    assert len(plans) == 26
    for i, rows in enumerate(MLPERF_ROWS):
        plan = plans[f"t_cat_{i}"]
        shards = plan.sharding_spec.shards
        assert plan.sharding_type == "row_wise" and len(shards) == 64
        assert sum(s.shard_sizes[0] for s in shards) == rows and all(s.shard_sizes[1] == 128 for s in shards)
        assert sorted(s.placement.rank() for s in shards) == list(range(64))  # one row block per GPU


@pytest.mark.parametrize("sharding_type", ["table_wise", "column_wise"])
def test_dlrm_tables_plan_on_two_cpu_ranks(sharding_type: str) -> None:
    from torchrec.distributed.planner import Topology

    from models.dlrm import DLRMConfig

    cfg = DLRMConfig(hash_buckets=[1000] * 6, embedding_dim=16, bottom_mlp=[16])
    plans = _table_plans(cfg, Topology(world_size=2, compute_device="cpu"), sharding_type)
    ranks = set()
    for plan in plans.values():
        shards = plan.sharding_spec.shards
        assert plan.sharding_type == sharding_type
        assert all(s.shard_sizes[0] == 1000 for s in shards)  # whole rows: table- or column-split
        assert [s.shard_sizes[1] for s in shards] == ([16] if sharding_type == "table_wise" else [8, 8])
        ranks.update(s.placement.rank() for s in shards)
    assert ranks == {0, 1}  # both ranks hold tables
