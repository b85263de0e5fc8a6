"""Serving exported fMRL models: torch, safetensors and fsspec only, never the training stack.

The package reads an export folder written by ``fmrl export`` (:mod:`deploy.artifact`), scores with one
module for eager, ``torch.export`` and ONNX use (:mod:`deploy.scoring`), recommends with the history left
out and an optional Matryoshka funnel (:mod:`deploy.recommender`), measures what each size costs
(:mod:`deploy.costs`), writes portable programs (:mod:`deploy.portable`) and serves HTTP
(:mod:`deploy.serve`, the one module that imports the web framework). It imports neither trainer/,
sharding/, data_pipeline/ nor torchrec, fbgemm or deepspeed (tests/unit/test_layering.py).
"""

from deploy.artifact import ExportError
from deploy.recommender import Funnel, Recommender, load_recommender
from deploy.scoring import ScoringModel, quantise_rows

__all__ = ["ExportError", "Funnel", "Recommender", "ScoringModel", "load_recommender", "quantise_rows"]
