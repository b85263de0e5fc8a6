"""fMRLRec: Matryoshka-nested LRU recommender over frozen multimodal item features (single device).

The names below load on first use (PEP 562): ``models.fmrl.config`` alone does not import torch, so
validating a run's config (``fmrl train`` with a typo, ``fmrl --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.fmrl.config import FMRLConfig
    from models.fmrl.loss import matryoshka_loss
    from models.fmrl.model import AttributeBags, FMRLRec, ItemTower, LRUTrunk, nested_scores, slice_state_dict
    from models.fmrl.sampled_loss import NegativeSampler, candidate_set, sampled_matryoshka_loss

_MODULES = {
    "FMRLConfig": "config",
    "matryoshka_loss": "loss",
    **dict.fromkeys(
        ("AttributeBags", "FMRLRec", "ItemTower", "LRUTrunk", "nested_scores", "slice_state_dict"), "model"
    ),
    **dict.fromkeys(("NegativeSampler", "candidate_set", "sampled_matryoshka_loss"), "sampled_loss"),
}

__all__ = [
    "AttributeBags",
    "FMRLConfig",
    "FMRLRec",
    "ItemTower",
    "LRUTrunk",
    "NegativeSampler",
    "candidate_set",
    "matryoshka_loss",
    "nested_scores",
    "sampled_matryoshka_loss",
    "slice_state_dict",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
