"""DLRM (dot or DCN-v2 interaction) for click-through-rate prediction, single device.

The names below load on first use (PEP 562): ``models.dlrm.config`` alone imports neither torch nor
TorchRec, so validating a run's config (``fmrl train`` with a typo, ``fmrl --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_MODULES = {
    "DLRMConfig": "config",
    "roc_auc": "metrics",
    **dict.fromkeys(
        (
            "DLRM",
            "CTRModel",
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
        ),
        "model",
    ),
}

__all__ = [
    "CTRModel",
    "Pooled",
    "cross_ids",
    "DCNInteraction",
    "DLRM",
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


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
