"""fMRLRec: Matryoshka-nested LRU recommender over frozen multimodal item features (single device)."""

from models.fmrl.config import FMRLConfig
from models.fmrl.loss import matryoshka_loss
from models.fmrl.model import FMRLRec, ItemTower, LRUTrunk, nested_scores, slice_state_dict

__all__ = [
    "FMRLConfig",
    "FMRLRec",
    "ItemTower",
    "LRUTrunk",
    "matryoshka_loss",
    "nested_scores",
    "slice_state_dict",
]
