"""DLRM (dot or DCN-v2 interaction) for click-through-rate prediction, single device."""

from models.dlrm.config import DLRMConfig
from models.dlrm.metrics import roc_auc
from models.dlrm.model import (
    DLRM,
    CTRModel,
    DCNInteraction,
    DotInteraction,
    Pooled,
    SparseArch,
    cross_ids,
    ctr_loss,
    dot_interaction_reference,
    ids_to_kjt,
    lower_triangle_order,
    mlp,
)

__all__ = [
    "CTRModel",
    "DLRM",
    "Pooled",
    "cross_ids",
    "DCNInteraction",
    "DLRMConfig",
    "DotInteraction",
    "SparseArch",
    "ctr_loss",
    "dot_interaction_reference",
    "ids_to_kjt",
    "lower_triangle_order",
    "mlp",
    "roc_auc",
]
