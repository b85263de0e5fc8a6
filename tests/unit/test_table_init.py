"""The learnable tables' counter-based initial values: any slice equals the same slice of the whole
table, so a rank's shard is the same at every world size; the distribution is the one the model always
used (N(0, 0.02^2), padding row zero); a tower on meta draws the same and initialises its dense part the
same as a materialised one."""

from __future__ import annotations

import torch

from models.fmrl import FMRLConfig, FMRLRec
from models.fmrl.model import TABLE_INIT_STD, initial_table_rows


def test_any_slice_equals_the_same_slice_of_the_whole_table() -> None:
    whole = initial_table_rows(7, 0, 5000, 24)
    assert whole[0].abs().sum() == 0  # padding
    for start, stop in [(0, 1), (1, 1024), (1000, 1030), (1023, 4097), (4999, 5000), (3000, 3000)]:
        torch.testing.assert_close(initial_table_rows(7, start, stop, 24), whole[start:stop], rtol=0, atol=0)
    # row-wise shards of any world size put back together give the whole table
    for world in (2, 3, 8):
        bounds = [round(i * 5000 / world) for i in range(world + 1)]
        parts = [initial_table_rows(7, a, b, 24) for a, b in zip(bounds, bounds[1:])]
        torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)
    assert not torch.equal(initial_table_rows(8, 0, 5000, 24), whole)  # the seed matters


def test_the_distribution_is_the_models_usual_one() -> None:
    values = initial_table_rows(3, 1, 20001, 32)
    assert abs(float(values.mean())) < 1e-3
    assert abs(float(values.std()) - TABLE_INIT_STD) < 2e-4
    # no two blocks repeat each other
    assert not torch.equal(values[:1000], values[1024:2024])


def test_a_tower_on_meta_matches_a_materialised_one() -> None:
    cfg = FMRLConfig(nested_sizes=[8, 16], num_blocks=1, use_id_embedding=True)
    text = torch.randn(51, 12)
    torch.manual_seed(0)
    built = FMRLRec(cfg, 50, text)
    torch.manual_seed(0)
    meta = FMRLRec(cfg, 50, torch.empty(51, 12, device="meta"), table_device="meta")
    assert meta.item_tower.id_embedding.weight.device.type == "meta"
    assert meta.item_tower.text.weight.device.type == "meta"
    torch.testing.assert_close(
        meta.item_tower.initial_rows("id", 0, 51), built.item_tower.id_embedding.weight, rtol=0, atol=0
    )
    dense = {
        k: v for k, v in built.state_dict().items() if not k.startswith(("item_tower.text", "item_tower.id"))
    }
    for key, value in meta.state_dict().items():
        if key in dense:
            torch.testing.assert_close(value, dense[key], rtol=0, atol=0)
