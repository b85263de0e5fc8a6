"""Configuration of DLRM (Naumov et al. 2019) and its DCN-v2 variant (MLPerf DLRM-DCNv2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Interaction = Literal["dot", "dcn"]
INTERACTIONS = ("dot", "dcn")

NUM_CRITEO_DENSE = 13
NUM_CRITEO_SPARSE = 26


def _default_buckets() -> list[int]:
    # matches the default of data_pipeline.synthetic_ctr.prepare_synthetic_ctr (the demo data set)
    return [1000] * NUM_CRITEO_SPARSE


def _default_bottom() -> list[int]:
    return [64, 16]


def _default_top() -> list[int]:
    return [64, 32, 1]


@dataclass(kw_only=True)
class DLRMConfig:
    """Hyperparameters of DLRM: one embedding table per categorical feature, MLPs, the interaction.

    Layer sizes follow the TorchRec / MLPerf reference convention (``--dense_arch_layer_sizes 512,256,128
    --over_arch_layer_sizes 1024,1024,512,256,1``): ``bottom_mlp`` lists every layer's output width and
    ends with ``embedding_dim``; ``top_mlp`` lists every layer's output width and ends with 1 (the logit).
    """

    num_dense: int = NUM_CRITEO_DENSE
    """Number of dense (continuous) input features."""
    hash_buckets: list[int] = field(default_factory=_default_buckets)
    """Rows of each categorical feature's table, in feature order (id 0 is the "missing" row, see
    data_pipeline/ctr.py). Their number is the number of categorical features F."""
    feature_names: list[str] | None = None
    """Names of the categorical features (the KeyedJaggedTensor keys); None means ``cat_0 .. cat_{F-1}``
    (TorchRec's Criteo names). Table ``t_<name>`` serves feature ``<name>``."""
    embedding_dim: int = 16
    """Width D of every embedding row (and of the bottom MLP's output)."""
    bottom_mlp: list[int] = field(default_factory=_default_bottom)
    """Output widths of the bottom (dense) MLP's layers, ReLU after each; the last must be embedding_dim."""
    top_mlp: list[int] = field(default_factory=_default_top)
    """Output widths of the top (over) MLP's layers, ReLU after all but the last; the last must be 1."""
    interaction: Interaction = "dot"
    """"dot": pairwise dot products (DLRM); "dcn": low-rank cross layers (DCN-v2, MLPerf DLRMv2)."""
    dcn_num_layers: int = 3
    """Cross layers of the DCN interaction (MLPerf: 3)."""
    dcn_low_rank_dim: int = 64
    """Rank r of each cross layer's W (N x r) V (r x N) factorisation (MLPerf: 512 with D=128)."""

    def __post_init__(self) -> None:
        _positive_int("num_dense", self.num_dense)
        _positive_int("embedding_dim", self.embedding_dim)
        if not self.hash_buckets:
            raise ValueError("hash_buckets must list at least one categorical feature's table size")
        for i, n in enumerate(self.hash_buckets):
            if isinstance(n, bool) or not isinstance(n, int) or n < 2:
                raise ValueError(
                    f"hash_buckets[{i}] must be an int >= 2 (row 0 is the missing-value row), got {n!r}"
                )
        if self.feature_names is not None:
            names = list(self.feature_names)
            if len(names) != len(self.hash_buckets):
                raise ValueError(
                    f"feature_names has {len(names)} names but hash_buckets has {len(self.hash_buckets)} tables"
                )
            if len(set(names)) != len(names) or any(not isinstance(n, str) or not n for n in names):
                raise ValueError(f"feature_names must be unique non-empty strings, got {names}")
        for name in ("bottom_mlp", "top_mlp"):
            sizes = getattr(self, name)
            if not sizes:
                raise ValueError(f"{name} must list at least one layer width")
            for s in sizes:
                if isinstance(s, bool) or not isinstance(s, int) or s < 1:
                    raise ValueError(f"{name} must be positive ints, got {sizes}")
        if self.bottom_mlp[-1] != self.embedding_dim:
            raise ValueError(
                f"the bottom MLP's last width ({self.bottom_mlp[-1]}) must equal embedding_dim "
                f"({self.embedding_dim}): its output is the dense feature's vector in the interaction"
            )
        if self.top_mlp[-1] != 1:
            raise ValueError(f"the top MLP must end in one logit (last width 1), got {self.top_mlp}")
        if self.interaction not in INTERACTIONS:
            raise ValueError(f"interaction must be one of {INTERACTIONS}, got {self.interaction!r}")
        _positive_int("dcn_num_layers", self.dcn_num_layers)
        _positive_int("dcn_low_rank_dim", self.dcn_low_rank_dim)

    @property
    def num_sparse(self) -> int:
        """Number F of categorical features (= tables)."""
        return len(self.hash_buckets)

    @property
    def sparse_names(self) -> list[str]:
        """The categorical features' names, the KeyedJaggedTensor keys, in table order."""
        if self.feature_names is not None:
            return list(self.feature_names)
        return [f"cat_{i}" for i in range(self.num_sparse)]

    @property
    def interaction_width(self) -> int:
        """Input width of the top MLP: D + F(F+1)/2 for "dot", (F+1) D for "dcn"."""
        f, d = self.num_sparse, self.embedding_dim
        if self.interaction == "dot":
            return d + (f + 1) * f // 2
        return (f + 1) * d


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
