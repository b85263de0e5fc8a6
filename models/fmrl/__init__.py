"""fMRLRec: Matryoshka-nested LRU recommender over frozen multimodal item features (single device)."""

from models.fmrl.config import FMRLConfig
from models.fmrl.loss import matryoshka_loss
from models.fmrl.model import AttributeBags, FMRLRec, ItemTower, LRUTrunk, nested_scores, slice_state_dict
from models.fmrl.sampled_loss import NegativeSampler, candidate_set, sampled_matryoshka_loss

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
