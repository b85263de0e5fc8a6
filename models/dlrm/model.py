"""DLRM: a click-through-rate model over dense features and one embedding table per categorical feature.

Reference: Naumov et al., "Deep Learning Recommendation Model for Personalization and Recommendation
Systems" (arXiv 1906.00091); the "dcn" interaction is DCN-v2's low-rank cross network (Wang et al.,
arXiv 2008.13535) as in the MLPerf DLRM-DCNv2 reference (``torchrec.models.dlrm.DLRM_DCN``).

Shape vocabulary: B batch, F categorical features (= tables), D embedding width, N_d dense features.

Four named parts, as in TorchRec's ``DLRM`` (same attribute names, so plans and FQNs read alike)::

    dense (B, N_d) --dense_arch (bottom MLP)--> x (B, D) ------------------.
    sparse KJT (F keys) --sparse_arch (EmbeddingBagCollection)--> E (B, F, D) --inter_arch--> (B, W) --over_arch--> (B,)

``sparse_arch`` is its own submodule holding the only ``EmbeddingBagCollection``, so ``sharding/`` can
shard it with DistributedModelParallel and leave the rest to DDP / FSDP. The loss (:func:`ctr_loss`,
BCE-with-logits) lives beside the model; ``forward`` returns logits, ``torch.sigmoid`` gives the click
probability.

Dot interaction, feature order: the B x (F+1) x (F+1) Gram matrix of ``[x, e_1, ..., e_F]`` is read in
its strict upper triangle, row-major: (x,e_1), (x,e_2), ..., (x,e_F), (e_1,e_2), ..., (e_{F-1},e_F);
the top MLP reads ``[x ; those F(F+1)/2 dots]``. This is TorchRec's ``InteractionArch`` order, so its
weights copy over as they are. facebookresearch/dlrm (``interact_features``) reads the strict *lower*
triangle row-major instead: (e_1,x), (e_2,x), (e_2,e_1), (e_3,x), ... - the same dots in another order,
i.e. a column permutation of the top MLP's first weight (:func:`lower_triangle_order` gives it).

Example::

    from models.dlrm import DLRM, DLRMConfig, ids_to_kjt
    cfg = DLRMConfig(hash_buckets=[100] * 26, embedding_dim=8, bottom_mlp=[32, 8], top_mlp=[32, 1])
    model = DLRM(cfg)
    logits = model(torch.rand(4, 13), ids_to_kjt(torch.randint(0, 100, (4, 26)), cfg.sparse_names))  # (4,)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torchrec.modules.crossnet import LowRankCrossNet, LowRankMixtureCrossNet, VectorCrossNet
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from models.dlrm.config import LINEAR_MODELS, DLRMConfig
from models.ops.table_init import block_seeded_rows

__all__ = [
    "CTRModel",
    "DLRM",
    "DCNInteraction",
    "DotInteraction",
    "Pooled",
    "SparseArch",
    "cross_ids",
    "ctr_loss",
    "dot_interaction_reference",
    "ids_to_kjt",
    "lower_triangle_order",
    "mlp",
]


def ids_to_kjt(ids: torch.Tensor, keys: list[str]) -> KeyedJaggedTensor:
    """A KeyedJaggedTensor with exactly one id per (sample, feature) from a (B, F) id matrix.

    Column f of ``ids`` is feature ``keys[f]``. KJT values are feature-major (all of feature 0's ids for
    the batch, then feature 1's, ...), hence the transpose.
    """
    if ids.dim() != 2 or ids.shape[1] != len(keys):
        raise ValueError(f"ids must be (B, {len(keys)}) for keys {keys}, got {tuple(ids.shape)}")
    return KeyedJaggedTensor(
        keys=list(keys),
        values=ids.t().reshape(-1).long(),  # (F * B,)
        lengths=torch.ones(ids.numel(), dtype=torch.int32, device=ids.device),
        stride=ids.shape[0],
    )


def mlp(
    in_features: int, widths: list[int], *, relu_last: bool, device: torch.device | None = None
) -> nn.Sequential:
    """Linear layers of output widths ``widths`` with ReLU between them (and after the last if asked)."""
    layers: list[nn.Module] = []
    for i, width in enumerate(widths):
        layers.append(nn.Linear(in_features, width, device=device))
        if relu_last or i < len(widths) - 1:
            layers.append(nn.ReLU())
        in_features = width
    return nn.Sequential(*layers)


class Pooled(NamedTuple):
    """What :class:`SparseArch` returns: the embeddings, and the first-order weights if the model has any."""

    vectors: torch.Tensor
    """(B, F, D) pooled embeddings e_1..e_F."""
    weights: torch.Tensor | None
    """(B, F + C) first-order weights: one per categorical feature, then one per crossed feature (C of
    them); None for models without a linear part."""


INIT_ROWS = 65536
"""Rows a table built whole is initialised at a time (one such block beside the table, never a copy)."""

LINEAR_WIDTH = 4
"""Width of the first-order tables: a row's LINEAR_WIDTH entries sum to the id's weight. TorchRec's
batched embedding kernels need widths that are multiples of 4 (on CPU too), so a scalar weight is kept
as a sum of 4 (the same functions, 4 parameters per id)."""


def cross_ids(first: torch.Tensor, second: torch.Tensor, second_rows: int, buckets: int) -> torch.Tensor:
    """Hashed ids (B,) of the crossed feature of two features' ids (B,), (B,) in ``[0, buckets)``.

    The pair's exact index ``first * second_rows + second`` is spread by Knuth's multiplicative hash
    (int64 products wrap, which keeps it deterministic) before the modulo, so that pairs that differ only
    in ``first`` do not all land in a few rows."""
    pair = first.long() * second_rows + second.long()
    return ((pair * 2654435761) & 0x7FFFFFFF) % buckets


class SparseArch(nn.Module):
    """Sum-pooled lookups of one table per categorical feature: KJT (F keys) -> :class:`Pooled`.

    Table ``t_<name>`` has ``hash_buckets[f]`` rows of width D and serves feature ``<name>``. With one id
    per sample and feature (Criteo), sum pooling is just the row; multi-hot inputs are summed. Models with
    a linear part (``LINEAR_MODELS``) also get ``linear_bag_collection``: a first-order table ``w_<name>``
    (rows of :data:`LINEAR_WIDTH` entries summed to one weight) per feature and, for Wide & Deep,
    ``w_<a>*<b>`` per crossed feature (whose ids :func:`cross_ids` forms from the two features' ids:
    crossed features need exactly one id per sample). Both collections live in this one module, so one
    TorchRec plan shards them all.

    Sharded from birth: every table takes its values from :meth:`initial_rows` under a seed drawn from
    torch's global generator (drawn whatever the device, so the dense parts built after it get the same
    values either way). Built on ``device="meta"`` no table holds storage, and a sharder generates only
    its shards' rows (sharding/dlrm.py); built on a real device the tables are filled whole with the
    same values, so a sharded model starts exactly where the single-device one does, on any layout.
    """

    def __init__(self, cfg: DLRMConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.feature_names = cfg.sparse_names
        self.embedding_dim = cfg.embedding_dim
        self.cross_pairs = cfg.cross_pairs
        self.cross_buckets = cfg.wide_cross_buckets
        self.rows = dict(zip(self.feature_names, cfg.hash_buckets))
        device = torch.device(device or torch.get_default_device())
        # built on meta, then given their values row block by row block (initial_rows), never by
        # TorchRec's reset_parameters: the same values whatever the device and the sharding
        meta = torch.device("meta")
        self.embedding_bag_collection = EmbeddingBagCollection(
            tables=_tables("t_", self.feature_names, cfg.hash_buckets, cfg.embedding_dim), device=meta
        )
        self.linear_bag_collection: EmbeddingBagCollection | None = None
        if cfg.model in LINEAR_MODELS:
            crosses = [f"{a}*{b}" for a, b in self.cross_pairs]
            rows = list(cfg.hash_buckets) + [self.cross_buckets] * len(crosses)
            self.linear_bag_collection = EmbeddingBagCollection(
                tables=_tables("w_", self.feature_names + crosses, rows, LINEAR_WIDTH), device=meta
            )
        # drawn whether or not the tables are materialised: the dense parts' initial values come from
        # the global generator after them, the same either way
        configs = self.table_configs()
        seeds = torch.randint(0, 2**62, (len(configs),), device="cpu").tolist()
        self.table_seeds = {config.name: seed for config, seed in zip(configs, seeds)}
        self._table_shapes = {
            config.name: (config.num_embeddings, config.embedding_dim) for config in configs
        }
        if device.type != "meta":
            self.to_empty(device=device)
            with torch.no_grad():
                for collection in self.collections():
                    for name, bag in collection.embedding_bags.items():
                        for start in range(0, bag.weight.shape[0], INIT_ROWS):
                            stop = min(start + INIT_ROWS, bag.weight.shape[0])
                            bag.weight[start:stop].copy_(self.initial_rows(name, start, stop))

    def collections(self) -> list[EmbeddingBagCollection]:
        """The embedding collection, then the first-order one if the model has it."""
        return [c for c in (self.embedding_bag_collection, self.linear_bag_collection) if c is not None]

    def table_configs(self) -> list[EmbeddingBagConfig]:
        """Every table's config, in :meth:`collections` order."""
        return [config for c in self.collections() for config in c.embedding_bag_configs()]

    def initial_rows(
        self, name: str, start: int, stop: int, columns: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Rows ``start:stop`` of table ``name``'s ("t_<feature>", "w_<feature>", "w_<a>*<b>") initial
        values, (stop - start, width), or only ``columns`` (c0, c1): (stop - start, c1 - c0). Uniform in
        +-sqrt(1 / rows) (TorchRec's default), counter-based
        (:func:`models.ops.table_init.block_seeded_rows`), so any block equals the whole table's."""
        if name not in self._table_shapes:
            raise ValueError(f"{name!r} is not a table of this model ({sorted(self._table_shapes)})")
        num_rows, width = self._table_shapes[name]
        bound = math.sqrt(1 / num_rows)

        def uniform(generator: torch.Generator, rows: int, cols: int) -> torch.Tensor:
            return (torch.rand(rows, cols, generator=generator) * 2 - 1) * bound  # (rows, cols)

        return block_seeded_rows(self.table_seeds[name], start, stop, width, uniform, columns)

    def forward(self, features: KeyedJaggedTensor) -> Pooled:
        pooled = self.embedding_bag_collection(features).to_dict()  # {name: (B, D)}
        # by name, not by position: a sharded collection may return its keys in another order
        vectors = torch.stack([pooled[name] for name in self.feature_names], dim=1)  # (B, F, D)
        if self.linear_bag_collection is None:
            return Pooled(vectors, None)
        linear_features = self._with_crosses(features)
        rows = self.linear_bag_collection(linear_features).to_dict()  # {name: (B, LINEAR_WIDTH)}
        weights = torch.stack([rows[name] for name in linear_features.keys()], dim=1)  # (B, F + C, 4)
        return Pooled(vectors, weights.sum(dim=2))  # (B, F + C)

    def _with_crosses(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The features in table order, then the crossed features' hashed ids."""
        by_name = features.to_dict()
        keys = list(self.feature_names)
        values = [by_name[name].values() for name in keys]
        lengths = [by_name[name].lengths() for name in keys]
        for a, b in self.cross_pairs:
            first, second = by_name[a], by_name[b]
            if first.values().numel() != len(first.lengths()) or second.values().numel() != len(
                first.lengths()
            ):
                raise ValueError(
                    f"the crossed feature {a}*{b} needs exactly one id per sample in {a} and {b}"
                )
            keys.append(f"{a}*{b}")
            values.append(cross_ids(first.values(), second.values(), self.rows[b], self.cross_buckets))
            lengths.append(torch.ones_like(first.lengths()))
        return KeyedJaggedTensor(
            keys=keys, values=torch.cat(values), lengths=torch.cat(lengths), stride=features.stride()
        )


def _tables(prefix: str, names: list[str], rows: list[int], dim: int) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(
            name=f"{prefix}{name}",
            num_embeddings=n,
            embedding_dim=dim,
            feature_names=[name],
            pooling=PoolingType.SUM,
        )
        for name, n in zip(names, rows)
    ]


def dot_interaction_reference(dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """The dot interaction written as a loop over pairs (the definition; tests compare against it).

    Args:
        dense: (B, D) bottom MLP output x.
        sparse: (B, F, D) pooled embeddings e_1..e_F.

    Returns:
        (B, D + F(F+1)/2): ``[x ; <v_i, v_j> for i < j]`` over ``v = [x, e_1, ..., e_F]``, row-major.
    """
    vectors = [dense] + [sparse[:, f] for f in range(sparse.shape[1])]
    dots = [
        (vectors[i] * vectors[j]).sum(dim=-1, keepdim=True)  # (B, 1)
        for i in range(len(vectors))
        for j in range(i + 1, len(vectors))
    ]
    return torch.cat([dense, *dots], dim=1)


class DotInteraction(nn.Module):
    """All pairwise dot products of ``[x, e_1..e_F]`` (strict upper triangle) next to x, batched.

    (B, D), (B, F, D) -> (B, D + F(F+1)/2); same result as :func:`dot_interaction_reference`.
    """

    def __init__(self, num_sparse: int) -> None:
        super().__init__()
        self.num_sparse = num_sparse
        self.register_buffer(
            "triu", torch.triu_indices(num_sparse + 1, num_sparse + 1, offset=1), persistent=False
        )

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        combined = torch.cat([dense.unsqueeze(1), sparse], dim=1)  # (B, F+1, D)
        gram = torch.bmm(combined, combined.transpose(1, 2))  # (B, F+1, F+1)
        return torch.cat([dense, gram[:, self.triu[0], self.triu[1]]], dim=1)  # (B, D + F(F+1)/2)


def lower_triangle_order(num_sparse: int) -> list[int]:
    """Positions, in our dot-product order, of facebookresearch/dlrm's dots (strict lower triangle, row-major).

    ``ours[:, D:][:, lower_triangle_order(F)]`` equals the reference DLRM's interaction columns.
    """
    n = num_sparse + 1
    upper = {(i, j): k for k, (i, j) in enumerate((i, j) for i in range(n) for j in range(i + 1, n))}
    return [upper[j, i] for i in range(n) for j in range(i)]


class DCNInteraction(nn.Module):
    """Cross layers over ``[x ; e_1 ; ... ; e_F]``: (B, D), (B, F, D) -> (B, (F+1) D).

    ``kind`` picks TorchRec's cross network, reused as it is: "low_rank" (DCN-v2,
    x_{l+1} = x_0 * (W_l (V_l x_l) + b_l) + x_l, ``LowRankCrossNet``; DLRM's "dcn" interaction, the same
    module and input layout as ``torchrec.models.dlrm.InteractionDCNArch``), "mixture" (a gated mixture of
    ``num_experts`` low-rank experts, ``LowRankMixtureCrossNet``) or "vector" (DCN v1,
    x_{l+1} = x_0 (x_l . w_l) + b_l + x_l, ``VectorCrossNet``).
    """

    def __init__(
        self,
        num_sparse: int,
        dim: int,
        num_layers: int,
        low_rank: int,
        kind: str = "low_rank",
        num_experts: int = 1,
    ) -> None:
        super().__init__()
        width = (num_sparse + 1) * dim
        if kind == "low_rank":
            self.crossnet: nn.Module = LowRankCrossNet(
                in_features=width, num_layers=num_layers, low_rank=low_rank
            )
        elif kind == "mixture":
            self.crossnet = LowRankMixtureCrossNet(
                in_features=width, num_layers=num_layers, num_experts=num_experts, low_rank=low_rank
            )
        elif kind == "vector":
            self.crossnet = VectorCrossNet(in_features=width, num_layers=num_layers)
        else:
            raise ValueError(f"kind must be low_rank, mixture or vector, got {kind!r}")

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        combined = torch.cat([dense.unsqueeze(1), sparse], dim=1)  # (B, F+1, D)
        return self.crossnet(combined.flatten(1))  # (B, (F+1) D)


class CTRModel(nn.Module):
    """A click-through-rate model: ``sparse_arch`` (the tables, :class:`SparseArch`) and a dense part.

    ``forward(dense (B, N_d), sparse KJT) -> logits (B,)`` is ``dense_forward(dense, sparse_arch(sparse))``.
    ``dense_forward`` reads only the submodules other than ``sparse_arch``, so ``sharding/`` can run it on
    a holder of those submodules (same names) while TorchRec shards the tables. ``device`` places the
    dense parts, ``sparse_device`` the tables (default: ``device``); building the tables on ``"meta"``
    lets a sharder materialise only each rank's shards.
    """

    def __init__(
        self,
        cfg: DLRMConfig,
        device: torch.device | str | None = None,
        sparse_device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.sparse_arch = SparseArch(cfg, device=sparse_device if sparse_device is not None else device)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """Args: dense (B, N_d) float features; sparse: a KJT with the F feature keys. Returns (B,) logits."""
        return self.dense_forward(dense, self.sparse_arch(sparse))

    def dense_forward(self, dense: torch.Tensor, pooled: Pooled) -> torch.Tensor:
        """Logits (B,) of dense features (B, N_d) and the tables' output."""
        raise NotImplementedError


class DLRM(CTRModel):
    """DLRM on one device; ``forward(dense (B, N_d), sparse KJT) -> logits (B,)``."""

    def __init__(
        self,
        cfg: DLRMConfig,
        device: torch.device | str | None = None,
        sparse_device: torch.device | str | None = None,
    ) -> None:
        super().__init__(cfg, device, sparse_device)
        device = torch.device(device) if isinstance(device, str) else device
        self.dense_arch = mlp(cfg.num_dense, cfg.bottom_mlp, relu_last=True, device=device)
        if cfg.interaction == "dot":
            self.inter_arch: nn.Module = DotInteraction(cfg.num_sparse)
        else:
            self.inter_arch = DCNInteraction(
                cfg.num_sparse, cfg.embedding_dim, cfg.dcn_num_layers, cfg.dcn_low_rank_dim
            )
        if device is not None:
            self.inter_arch.to(device)
        self.over_arch = mlp(cfg.interaction_width, cfg.top_mlp, relu_last=False, device=device)

    def dense_forward(self, dense: torch.Tensor, pooled: Pooled) -> torch.Tensor:
        x = self.dense_arch(dense)  # (B, D)
        interactions = self.inter_arch(x, pooled.vectors)  # (B, W)
        return self.over_arch(interactions).squeeze(-1)  # (B,)


def ctr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of click labels (B,) in {0, 1} given logits (B,) (sigmoid inside)."""
    return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
