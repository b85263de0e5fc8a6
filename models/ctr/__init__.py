"""The CTR model family of the DLRM paper beside DLRM: Wide & Deep, DeepFM, DCN v1 / v2, xDeepFM.

Chosen by ``DLRMConfig.model``; :func:`build_ctr_model` builds any of the six (DLRM included)."""

from models.ctr.interactions import (
    CompressedInteractionNetwork,
    FactorizationMachine,
    cin_reference,
    cross_v1_reference,
    cross_v2_reference,
    fm_reference,
)
from models.ctr.models import DCN, MODEL_CLASSES, DeepFM, FirstOrder, WideAndDeep, XDeepFM, build_ctr_model

__all__ = [
    "DCN",
    "MODEL_CLASSES",
    "CompressedInteractionNetwork",
    "DeepFM",
    "FactorizationMachine",
    "FirstOrder",
    "WideAndDeep",
    "XDeepFM",
    "build_ctr_model",
    "cin_reference",
    "cross_v1_reference",
    "cross_v2_reference",
    "fm_reference",
]
