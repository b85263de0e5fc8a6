"""Configuration of the fMRL-LRU recommender (fMRLRec, EMNLP Findings 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field


def _default_sizes() -> list[int]:
    return [8, 16, 32, 64, 128, 256, 512, 1024]


@dataclass(kw_only=True)
class FMRLConfig:
    """Hyperparameters of the nested ("Matryoshka") LRU recommender.

    Data-dependent sizes (number of items, feature widths) are not part of this section: they come from
    the item feature tables that the model is built with.
    """

    nested_sizes: list[int] = field(default_factory=_default_sizes)
    """Nested widths M = (m_1 < ... < m_K); the last one is the model width D. Every prefix [:m] of every
    hidden state is a complete size-m model."""
    num_blocks: int = 2
    """Number of LRU blocks (the paper reports 2 as best on all four Amazon sets)."""
    dropout: float = 0.1
    """Dropout on the item embeddings and inside the feed-forward network."""
    attn_dropout: float = 0.1
    """Dropout on the output of each LRU layer."""
    r_min: float = 0.0
    """Smallest eigenvalue modulus |lambda| of the ring initialisation."""
    r_max: float = 0.1
    """Largest eigenvalue modulus |lambda| of the ring initialisation (fMRLRec uses r_min + 0.1)."""
    complex_init: str = "real"
    """Initial complex B and C maps of the LRU: "real" (imaginary parts zero, as the official code) or
    "random" (imaginary parts drawn like the real parts)."""
    use_text_features: bool = True
    """Feed the frozen text-feature table into the item tower (if the data has one)."""
    use_image_features: bool = True
    """Feed the frozen image-feature table into the item tower (if the data has one)."""
    use_id_embedding: bool = False
    """Add a learnable item-ID table (the paper's full model has none; its ablation uses one alone)."""
    id_embedding_dim: int = 0
    """Width of the learnable ID table, an input of the projector like the feature tables; 0 means D."""
    use_attributes: bool = False
    """Add a learnable item-attribute table (brand, category ... ids, mean-pooled per item), an input of the
    projector like the other tables; needs a data set with attributes (`fmrl data convert-seqrec
    --attributes`)."""
    attribute_embedding_dim: int = 0
    """Width of the attribute table; 0 means D."""
    loss_chunk_mb: int = 64
    """Memory budget of one chunk of the fused Matryoshka cross-entropy, in MiB of fp32 scores."""

    def __post_init__(self) -> None:
        sizes = self.nested_sizes
        if not sizes:
            raise ValueError("nested_sizes must not be empty")
        if any(not isinstance(s, int) or isinstance(s, bool) or s <= 0 for s in sizes):
            raise ValueError(f"nested_sizes must be positive integers, got {sizes}")
        if any(b <= a for a, b in zip(sizes, sizes[1:])):
            raise ValueError(f"nested_sizes must be strictly increasing, got {sizes}")
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        for name in ("dropout", "attn_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        if not 0.0 <= self.r_min < self.r_max <= 1.0:
            raise ValueError(
                f"r_min and r_max must satisfy 0 <= r_min < r_max <= 1, got {self.r_min}, {self.r_max}"
            )
        if self.complex_init not in ("real", "random"):
            raise ValueError(f"complex_init must be 'real' or 'random', got {self.complex_init!r}")
        if self.id_embedding_dim < 0:
            raise ValueError(f"id_embedding_dim must be >= 0 (0 means D), got {self.id_embedding_dim}")
        if self.attribute_embedding_dim < 0:
            raise ValueError(
                f"attribute_embedding_dim must be >= 0 (0 means D), got {self.attribute_embedding_dim}"
            )
        if self.loss_chunk_mb < 1:
            raise ValueError(f"loss_chunk_mb must be >= 1, got {self.loss_chunk_mb}")

    @property
    def dim(self) -> int:
        """The model width D (the largest nested size)."""
        return self.nested_sizes[-1]
