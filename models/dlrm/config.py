"""Configuration of the click-through-rate models: DLRM (Naumov et al. 2019, with its DCN-v2 variant of
MLPerf DLRM-DCNv2) and the models the DLRM paper compares it with (Wide & Deep, DeepFM, DCN v1 / v2,
xDeepFM), chosen by ``model``. All share the tables, the bottom (dense) MLP and the top (over) MLP."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

Interaction = Literal["dot", "dcn"]
INTERACTIONS = ("dot", "dcn")
CTRModelName = Literal["dlrm", "wide_deep", "deepfm", "dcn", "dcn_v2", "xdeepfm"]
CTR_MODELS = ("dlrm", "wide_deep", "deepfm", "dcn", "dcn_v2", "xdeepfm")
DCNStructure = Literal["stacked", "parallel"]
DCN_STRUCTURES = ("stacked", "parallel")
LINEAR_MODELS = ("wide_deep", "deepfm", "xdeepfm")
"""Models with a first-order (linear) part: one first-order table per categorical feature (and cross)."""

MODEL_KEYS = {
    "interaction": ("dlrm",),
    "dcn_num_layers": ("dlrm", "dcn", "dcn_v2"),
    "dcn_low_rank_dim": ("dlrm", "dcn_v2"),
    "dcn_num_experts": ("dcn_v2",),
    "dcn_structure": ("dcn", "dcn_v2"),
    "dcn_deep_mlp": ("dcn", "dcn_v2"),
    "cin_layers": ("xdeepfm",),
    "wide_crosses": ("wide_deep",),
    "wide_cross_buckets": ("wide_deep",),
}
"""Keys that only some models read -> those models: setting one for another model is an error (it would
be silently ignored)."""

NUM_CRITEO_DENSE = 13
NUM_CRITEO_SPARSE = 26


def _default_buckets() -> list[int]:
    # matches the default of data_pipeline.synthetic_ctr.prepare_synthetic_ctr (the demo data set)
    return [1000] * NUM_CRITEO_SPARSE


def _default_bottom() -> list[int]:
    return [64, 16]


def _default_top() -> list[int]:
    return [64, 32, 1]


def _default_dcn_deep() -> list[int]:
    return [64, 32]


def _default_cin() -> list[int]:
    return [16, 16]


@dataclass(kw_only=True)
class DLRMConfig:
    """Hyperparameters of a CTR model (``model``, DLRM by default): one embedding table per categorical
    feature, MLPs, the interaction.

    Layer sizes follow the TorchRec / MLPerf reference convention (``--dense_arch_layer_sizes 512,256,128
    --over_arch_layer_sizes 1024,1024,512,256,1``): ``bottom_mlp`` lists every layer's output width and
    ends with ``embedding_dim``; ``top_mlp`` lists every layer's output width and ends with 1 (the logit).
    """

    model: CTRModelName = "dlrm"
    """The architecture: "dlrm" (dot or DCN-v2 interaction), "wide_deep" (Wide & Deep), "deepfm",
    "dcn" (DCN v1: vector cross layers), "dcn_v2" (low-rank / mixture cross layers), "xdeepfm" (CIN)."""
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
    dcn_num_experts: int = 1
    """dcn_v2: low-rank experts per cross layer; 1 is ``LowRankCrossNet``, more a gated mixture
    (``LowRankMixtureCrossNet``, DCN-Mix)."""
    dcn_structure: DCNStructure = "stacked"
    """dcn / dcn_v2: "stacked" (top MLP over the cross network's output) or "parallel" (top MLP over
    [cross output ; deep MLP output], both reading the same input)."""
    dcn_deep_mlp: list[int] = field(default_factory=_default_dcn_deep)
    """dcn / dcn_v2 "parallel": output widths of the deep tower's layers (ReLU after each)."""
    cin_layers: list[int] = field(default_factory=_default_cin)
    """xdeepfm: feature maps H_k of each Compressed Interaction Network layer."""
    wide_crosses: list[str] = field(default_factory=list)
    """wide_deep: hand-made crossed features of the wide part, each "a*b" (two categorical feature names):
    the pair of ids hashed into ``wide_cross_buckets`` rows of its own first-order table."""
    wide_cross_buckets: int = 10_000
    """wide_deep: rows of each crossed feature's table."""

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
        if self.model not in CTR_MODELS:
            raise ValueError(f"model must be one of {CTR_MODELS}, got {self.model!r}")
        _positive_int("dcn_num_experts", self.dcn_num_experts)
        if self.dcn_structure not in DCN_STRUCTURES:
            raise ValueError(f"dcn_structure must be one of {DCN_STRUCTURES}, got {self.dcn_structure!r}")
        for name in ("dcn_deep_mlp", "cin_layers"):
            sizes = getattr(self, name)
            if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
                raise ValueError(f"{name} must list at least one positive int, got {sizes}")
        _positive_int("wide_cross_buckets", self.wide_cross_buckets)
        for cross in self.wide_crosses:
            pair = cross.split("*") if isinstance(cross, str) else []
            if len(pair) != 2 or pair[0] == pair[1] or not all(pair):
                raise ValueError(f'wide_crosses must be "a*b" pairs of two feature names, got {cross!r}')
            unknown = [name for name in pair if name not in self.sparse_names]
            if unknown:
                raise ValueError(
                    f"wide_crosses: {cross!r} names {unknown}, not categorical features of the data set "
                    f"({self.sparse_names[:5]}...)"
                )
        if len(set(self.wide_crosses)) != len(self.wide_crosses):
            raise ValueError(f"wide_crosses repeats a cross: {self.wide_crosses}")
        for key, models in MODEL_KEYS.items():
            default = _field_default(key)
            if getattr(self, key) != default and self.model not in models:
                raise ValueError(
                    f"{key} applies to model {' / '.join(models)} only, but model is {self.model!r}: "
                    f"remove it"
                )

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
    def cross_pairs(self) -> list[tuple[str, str]]:
        """wide_deep's crossed features as (a, b) feature-name pairs."""
        return [tuple(cross.split("*")) for cross in self.wide_crosses]  # type: ignore[misc]

    @property
    def interaction_width(self) -> int:
        """Input width of the top MLP. DLRM: D + F(F+1)/2 for "dot", (F+1) D for "dcn"; the others read
        the flattened ``[x ; e_1 ; ... ; e_F]``, (F+1) D, and a parallel DCN also its deep tower's output."""
        f, d = self.num_sparse, self.embedding_dim
        if self.model == "dlrm" and self.interaction == "dot":
            return d + (f + 1) * f // 2
        if self.model in ("dcn", "dcn_v2") and self.dcn_structure == "parallel":
            return (f + 1) * d + self.dcn_deep_mlp[-1]
        return (f + 1) * d


def _field_default(name: str) -> object:
    spec = DLRMConfig.__dataclass_fields__[name]
    if spec.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return spec.default_factory()  # type: ignore[misc]
    return spec.default


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
