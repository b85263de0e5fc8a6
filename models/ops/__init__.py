"""Fast kernels of the fMRL model, each beside the simple reference implementation that tests compare with."""

from models.ops.chunked_layer_norm import block_averager, chunked_layer_norm, chunked_layer_norm_reference
from models.ops.gated_silu import gated_silu, gated_silu_reference
from models.ops.lru_scan import lru_scan, lru_scan_by_powers, lru_scan_reference
from models.ops.matryoshka_loss import (
    chunk_rows_for_budget,
    matryoshka_cross_entropy,
    matryoshka_cross_entropy_reference,
)
from models.ops.nested_linear import (
    GemmGroup,
    gemm_groups,
    join_nested_weight,
    nested_linear,
    nested_linear_reference,
    nested_mask,
    nested_param_count,
    split_nested_weight,
)

__all__ = [
    "GemmGroup",
    "gated_silu",
    "gated_silu_reference",
    "gemm_groups",
    "join_nested_weight",
    "block_averager",
    "chunk_rows_for_budget",
    "chunked_layer_norm",
    "chunked_layer_norm_reference",
    "lru_scan",
    "lru_scan_by_powers",
    "lru_scan_reference",
    "matryoshka_cross_entropy",
    "matryoshka_cross_entropy_reference",
    "nested_linear",
    "nested_linear_reference",
    "nested_mask",
    "nested_param_count",
    "split_nested_weight",
]
