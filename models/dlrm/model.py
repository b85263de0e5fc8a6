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

import torch
from torch import nn
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from models.dlrm.config import DLRMConfig

__all__ = [
    "DLRM",
    "DCNInteraction",
    "DotInteraction",
    "SparseArch",
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


class SparseArch(nn.Module):
    """Sum-pooled lookups of one table per categorical feature: KJT (F keys) -> (B, F, D).

    Table ``t_<name>`` has ``hash_buckets[f]`` rows of width D and serves feature ``<name>``. With one id
    per sample and feature (Criteo), sum pooling is just the row; multi-hot inputs are summed.
    """

    def __init__(self, cfg: DLRMConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.feature_names = cfg.sparse_names
        self.embedding_dim = cfg.embedding_dim
        tables = [
            EmbeddingBagConfig(
                name=f"t_{name}",
                num_embeddings=rows,
                embedding_dim=cfg.embedding_dim,
                feature_names=[name],
                pooling=PoolingType.SUM,
            )
            for name, rows in zip(self.feature_names, cfg.hash_buckets)
        ]
        device = torch.device(device) if isinstance(device, str) else device
        self.embedding_bag_collection = EmbeddingBagCollection(tables=tables, device=device)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.embedding_bag_collection(features).to_dict()  # {name: (B, D)}
        # by name, not by position: a sharded collection may return its keys in another order
        return torch.stack([pooled[name] for name in self.feature_names], dim=1)  # (B, F, D)


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
    """DCN-v2 low-rank cross layers over ``[x ; e_1 ; ... ; e_F]``: (B, D), (B, F, D) -> (B, (F+1) D).

    x_{l+1} = x_0 * (W_l (V_l x_l) + b_l) + x_l (TorchRec's ``LowRankCrossNet``, reused as it is; the
    same module and input layout as ``torchrec.models.dlrm.InteractionDCNArch``).
    """

    def __init__(self, num_sparse: int, dim: int, num_layers: int, low_rank: int) -> None:
        super().__init__()
        self.crossnet = LowRankCrossNet(
            in_features=(num_sparse + 1) * dim, num_layers=num_layers, low_rank=low_rank
        )

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        combined = torch.cat([dense.unsqueeze(1), sparse], dim=1)  # (B, F+1, D)
        return self.crossnet(combined.flatten(1))  # (B, (F+1) D)


class DLRM(nn.Module):
    """DLRM on one device; ``forward(dense (B, N_d), sparse KJT) -> logits (B,)``.

    ``device`` places the dense parts, ``sparse_device`` the tables (default: ``device``); building the
    tables on ``"meta"`` lets a sharder materialise only each rank's shards.
    """

    def __init__(
        self,
        cfg: DLRMConfig,
        device: torch.device | str | None = None,
        sparse_device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        device = torch.device(device) if isinstance(device, str) else device
        self.sparse_arch = SparseArch(cfg, device=sparse_device if sparse_device is not None else device)
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

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """Args: dense (B, N_d) float features; sparse: a KJT with the F feature keys. Returns (B,) logits."""
        x = self.dense_arch(dense)  # (B, D)
        embedded = self.sparse_arch(sparse)  # (B, F, D)
        interactions = self.inter_arch(x, embedded)  # (B, W)
        return self.over_arch(interactions).squeeze(-1)  # (B,)


def ctr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of click labels (B,) in {0, 1} given logits (B,) (sigmoid inside)."""
    return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
