"""The learnable tables' counter-based initial values: any slice equals the same slice of the whole
table, so a rank's shard is the same at every world size; the distribution is the one the model always
used (N(0, 0.02^2), padding row zero); a tower on meta draws the same and initialises its dense part the
same as a materialised one. The same for every CTR model's tables (models/dlrm SparseArch: TorchRec's
uniform +-sqrt(1 / rows)), column blocks included."""

from __future__ import annotations

import math

import pytest
import torch

from models.ctr import build_ctr_model
from models.dlrm import DLRMConfig
from models.dlrm.config import CTR_MODELS
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


@pytest.mark.parametrize("model", list(CTR_MODELS))
def test_a_ctr_model_on_meta_matches_a_materialised_one(model: str) -> None:
    """Every table (embeddings and first-order, crossed ones included) of a model built whole is what
    ``initial_rows`` gives for it, any row range and column block of it; the dense parts are initialised
    the same whether the tables are on meta or not."""
    crosses = {"wide_crosses": ["cat_0*cat_1"], "wide_cross_buckets": 1500} if model == "wide_deep" else {}
    cfg = DLRMConfig(
        model=model,
        num_dense=3,
        hash_buckets=[2100, 7],
        embedding_dim=8,
        bottom_mlp=[6, 8],
        top_mlp=[5, 1],
        **crosses,
    )
    torch.manual_seed(0)
    built = build_ctr_model(cfg)
    torch.manual_seed(0)
    meta = build_ctr_model(cfg, sparse_device="meta")
    assert all(p.device.type == "meta" for p in meta.sparse_arch.parameters())
    tables = 0
    for key, value in built.state_dict().items():
        if not key.startswith("sparse_arch."):
            torch.testing.assert_close(meta.state_dict()[key], value, rtol=0, atol=0)
            continue
        tables += 1
        name, rows = key.split(".")[-2], value.shape[0]
        torch.testing.assert_close(meta.sparse_arch.initial_rows(name, 0, rows), value, rtol=0, atol=0)
        for start, stop, columns in [(0, 1, None), (1000, 1030, (0, 4)), (rows - 5, rows, (2, 4))]:
            if stop > rows:
                continue
            expected = value[start:stop, columns[0] : columns[1]] if columns else value[start:stop]
            torch.testing.assert_close(
                meta.sparse_arch.initial_rows(name, start, stop, columns), expected, rtol=0, atol=0
            )
        bound = math.sqrt(1 / rows)  # TorchRec's default init, kept
        assert float(value.abs().max()) <= bound and float(value.std()) > bound / 3
    assert tables == (5 if model == "wide_deep" else 4 if model in ("deepfm", "xdeepfm") else 2)
    assert not torch.equal(
        built.sparse_arch.initial_rows("t_cat_0", 0, 7), built.sparse_arch.initial_rows("t_cat_1", 0, 7)
    )  # every table has its own seed
