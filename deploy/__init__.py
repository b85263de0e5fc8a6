"""Serving exported fMRL models: torch, safetensors and fsspec only, never the training stack.

The package reads an export folder written by ``fmrl export`` (:mod:`deploy.artifact`), scores with one
module for eager, ``torch.export`` and ONNX use (:mod:`deploy.scoring`), recommends with the history left
out and an optional Matryoshka funnel (:mod:`deploy.recommender`), measures what each size costs
(:mod:`deploy.costs`), writes portable programs (:mod:`deploy.portable`) and serves HTTP
(:mod:`deploy.serve`, the one module that imports the web framework). It imports neither trainer/,
sharding/, data_pipeline/ nor torchrec, fbgemm or deepspeed (tests/unit/test_layering.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deploy.artifact import ExportError
    from deploy.recommender import Funnel, Recommender, load_recommender
    from deploy.scoring import ScoringModel, quantise_rows

# the names load on first use (PEP 562): `fmrl --help` reads deploy.options without importing torch
_MODULES = {
    "ExportError": "artifact",
    **dict.fromkeys(("Funnel", "Recommender", "load_recommender"), "recommender"),
    **dict.fromkeys(("ScoringModel", "quantise_rows"), "scoring"),
}

__all__ = ["ExportError", "Funnel", "Recommender", "ScoringModel", "load_recommender", "quantise_rows"]


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    globals()[name] = value
    return value
