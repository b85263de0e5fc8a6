"""Pure helpers of the distributed set-up: column-wise shard widths on nested sizes, sharding types per
device, and the popularity ranking without a score matrix."""

from __future__ import annotations

import pytest
import torch

from sharding.fmrl import _sharding_type, nested_min_partition
from trainer.evaluate import popularity_ranks
from trainer.metrics import target_ranks

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
    assert _sharding_type("auto", cpu, "table_wise") == "table_wise"
    assert _sharding_type("auto", cpu, "column_wise") == "column_wise"
    assert _sharding_type("auto", cuda, "column_wise") == "row_wise"
    assert _sharding_type("column_wise", cuda, "table_wise") == "column_wise"
    with pytest.raises(ValueError, match="row_wise table sharding needs CUDA"):
        _sharding_type("row_wise", cpu, "table_wise")


@pytest.mark.parametrize("exclude", [False, True])
def test_popularity_ranks_equal_full_ranking(exclude: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    popularity = torch.randint(0, 6, (40,), generator=generator).double()  # many ties
    targets = torch.randint(1, 41, (25,), generator=generator)
    history = torch.randint(0, 41, (25, 7), generator=generator)
    history[:, 0] = targets  # the target in its own history is never excluded
    scores = popularity.expand(25, -1)
    expected = target_ranks(scores, targets, history if exclude else None)
    assert torch.equal(popularity_ranks(popularity, targets, history if exclude else None), expected)
