"""The CTR models the DLRM paper compares DLRM with, built from DLRM's parts, single device.

References: Wide & Deep (Cheng et al. 2016, arXiv 1606.07792), DeepFM (Guo et al. 2017, arXiv
1703.04247), DCN (Wang et al. 2017, arXiv 1708.05123), DCN v2 (Wang et al. 2020, arXiv 2008.13535),
xDeepFM (Lian et al. 2018, arXiv 1803.05170), all as placed beside DLRM in Naumov et al. 2019.

Shape vocabulary: B batch, F categorical features (= tables), C crossed features, D embedding width,
N_d dense features.

Every model is a :class:`~models.dlrm.CTRModel` with the same named parts as DLRM, so sharding,
checkpoints and export treat them alike:

* ``sparse_arch`` (:class:`~models.dlrm.SparseArch`): the embeddings E (B, F, D) and, for the models with
  a linear part, the first-order weights (B, F + C) of its first-order tables;
* ``dense_arch`` (bottom MLP): the dense features' vector x (B, D), an (F+1)-th field for every model
  (as in DLRM), so all six see the dense features the same way;
* ``over_arch`` (top MLP, ends in one logit): the deep part, over the flattened fields ``[x ; E]``
  ((B, (F+1) D)), or over the cross network's output (DCN);
* ``first_order`` (:class:`FirstOrder`): sum of the ids' first-order weights plus a linear map of the raw dense
  features (Wide & Deep's wide part, DeepFM's and xDeepFM's linear term).

Logits (B,), with V = [x ; e_1 ; ... ; e_F] (B, F+1, D)::

    wide_deep:  first_order(ids, crossed ids, dense) + over_arch(flat V)
    deepfm:     first_order(ids, dense) + FM(V) + over_arch(flat V)
    dcn/dcn_v2: over_arch(cross(flat V))                         "stacked"
                over_arch([cross(flat V) ; deep_arch(flat V)])   "parallel"
    xdeepfm:    first_order(ids, dense) + cin_out(CIN(V)) + over_arch(flat V)

Example::

    from models.ctr import build_ctr_model
    from models.dlrm import DLRMConfig, ids_to_kjt
    cfg = DLRMConfig(model="deepfm", hash_buckets=[100] * 26, embedding_dim=8, bottom_mlp=[32, 8], top_mlp=[32, 1])
    model = build_ctr_model(cfg)
    logits = model(torch.rand(4, 13), ids_to_kjt(torch.randint(0, 100, (4, 26)), cfg.sparse_names))  # (4,)
"""

from __future__ import annotations

import torch
from torch import nn

from models.ctr.interactions import CompressedInteractionNetwork, FactorizationMachine
from models.dlrm.config import DLRMConfig
from models.dlrm.model import DLRM, CTRModel, DCNInteraction, Pooled, mlp

__all__ = ["DCN", "DeepFM", "FirstOrder", "WideAndDeep", "XDeepFM", "build_ctr_model"]


class FirstOrder(nn.Module):
    """The linear (first-order) term: (B, N_d) raw dense features, (B, F + C) id weights -> (B,)."""

    def __init__(self, num_dense: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(num_dense, 1, device=device)

    def forward(self, dense: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.dense(dense).squeeze(-1) + weights.sum(dim=1)  # (B,)


def _fields(x: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.unsqueeze(1), vectors], dim=1)  # (B, F+1, D)


class _DeepModel(CTRModel):
    """The parts every model here has: bottom MLP, top MLP over the (F+1) D-wide input."""

    def __init__(
        self,
        cfg: DLRMConfig,
        device: torch.device | str | None = None,
        sparse_device: torch.device | str | None = None,
    ) -> None:
        super().__init__(cfg, device, sparse_device)
        device = torch.device(device) if isinstance(device, str) else device
        self.dense_arch = mlp(cfg.num_dense, cfg.bottom_mlp, relu_last=True, device=device)
        self.over_arch = mlp(cfg.interaction_width, cfg.top_mlp, relu_last=False, device=device)


class WideAndDeep(_DeepModel):
    """Wide & Deep: a linear model over the ids and hand-made crossed ids (``wide_crosses``) plus the top
    MLP over ``[x ; E]``. Without crosses its only interactions are the MLP's implicit ones."""

    def __init__(self, cfg: DLRMConfig, device=None, sparse_device=None) -> None:  # noqa: ANN001
        super().__init__(cfg, device, sparse_device)
        self.first_order = FirstOrder(cfg.num_dense, device=self.over_arch[0].weight.device)

    def dense_forward(self, dense: torch.Tensor, pooled: Pooled) -> torch.Tensor:
        assert pooled.weights is not None
        fields = _fields(self.dense_arch(dense), pooled.vectors)  # (B, F+1, D)
        return self.first_order(dense, pooled.weights) + self.over_arch(fields.flatten(1)).squeeze(-1)  # (B,)


class DeepFM(_DeepModel):
    """DeepFM: first order + the FM's pairwise dot products of the shared fields + the top MLP."""

    def __init__(self, cfg: DLRMConfig, device=None, sparse_device=None) -> None:  # noqa: ANN001
        super().__init__(cfg, device, sparse_device)
        self.first_order = FirstOrder(cfg.num_dense, device=self.over_arch[0].weight.device)
        self.fm = FactorizationMachine()

    def dense_forward(self, dense: torch.Tensor, pooled: Pooled) -> torch.Tensor:
        assert pooled.weights is not None
        fields = _fields(self.dense_arch(dense), pooled.vectors)  # (B, F+1, D)
        deep = self.over_arch(fields.flatten(1)).squeeze(-1)  # (B,)
        return self.first_order(dense, pooled.weights) + self.fm(fields) + deep  # (B,)


class DCN(_DeepModel):
    """Deep & Cross: TorchRec's cross network over the flattened fields, "vector" (v1, model dcn) or
    low-rank / mixture (v2, model dcn_v2), stacked under the top MLP or parallel to a deep tower."""

    def __init__(self, cfg: DLRMConfig, device=None, sparse_device=None) -> None:  # noqa: ANN001
        super().__init__(cfg, device, sparse_device)
        here = self.over_arch[0].weight.device
        if cfg.model == "dcn":
            kind = "vector"
        else:
            kind = "mixture" if cfg.dcn_num_experts > 1 else "low_rank"
        self.inter_arch = DCNInteraction(
            cfg.num_sparse,
            cfg.embedding_dim,
            cfg.dcn_num_layers,
            cfg.dcn_low_rank_dim,
            kind,
            cfg.dcn_num_experts,
        ).to(here)
        deep_arch = None
        if cfg.dcn_structure == "parallel":
            width = (cfg.num_sparse + 1) * cfg.embedding_dim
            deep_arch = mlp(width, cfg.dcn_deep_mlp, relu_last=True, device=here)
        self.add_module("deep_arch", deep_arch)  # a registered submodule even when None (stacked)

    def dense_forward(self, dense: torch.Tensor, pooled: Pooled) -> torch.Tensor:
        x = self.dense_arch(dense)  # (B, D)
        crossed = self.inter_arch(x, pooled.vectors)  # (B, (F+1) D)
        if self.deep_arch is not None:
            deep = self.deep_arch(_fields(x, pooled.vectors).flatten(1))  # (B, H)
            crossed = torch.cat([crossed, deep], dim=1)  # (B, (F+1) D + H)
        return self.over_arch(crossed).squeeze(-1)  # (B,)


class XDeepFM(_DeepModel):
    """xDeepFM: first order + a linear map of the CIN's pooled feature maps + the top MLP."""

    def __init__(self, cfg: DLRMConfig, device=None, sparse_device=None) -> None:  # noqa: ANN001
        super().__init__(cfg, device, sparse_device)
        here = self.over_arch[0].weight.device
        self.first_order = FirstOrder(cfg.num_dense, device=here)
        self.cin = CompressedInteractionNetwork(cfg.num_sparse + 1, cfg.cin_layers).to(here)
        self.cin_out = nn.Linear(self.cin.output_width, 1, device=here)

    def dense_forward(self, dense: torch.Tensor, pooled: Pooled) -> torch.Tensor:
        assert pooled.weights is not None
        fields = _fields(self.dense_arch(dense), pooled.vectors)  # (B, F+1, D)
        cin = self.cin_out(self.cin(fields)).squeeze(-1)  # (B,)
        deep = self.over_arch(fields.flatten(1)).squeeze(-1)  # (B,)
        return self.first_order(dense, pooled.weights) + cin + deep  # (B,)


MODEL_CLASSES: dict[str, type[CTRModel]] = {
    "dlrm": DLRM,
    "wide_deep": WideAndDeep,
    "deepfm": DeepFM,
    "dcn": DCN,
    "dcn_v2": DCN,
    "xdeepfm": XDeepFM,
}


def build_ctr_model(
    cfg: DLRMConfig, device: torch.device | str | None = None, sparse_device: torch.device | str | None = None
) -> CTRModel:
    """The model ``cfg.model`` names, single device."""
    return MODEL_CLASSES[cfg.model](cfg, device, sparse_device)
