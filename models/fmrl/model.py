"""fMRLRec: a Matryoshka-nested LRU sequential recommender over frozen multimodal item features.

Reference: Lai et al., "Train Once, Deploy Anywhere: Matryoshka Representation Learning for Multimodal
Recommendation", EMNLP Findings 2024 (arXiv 2409.16627), built on LRURec (Yue et al., WSDM 2024).

Shape vocabulary: B batch, L length, D width (largest nested size), K nested sizes, N items. Item ids run
1..N; id 0 is padding. Every size-m prefix of the model is itself a complete model (``nested_submodel``).

Example::

    from models.fmrl import FMRLConfig, FMRLRec
    cfg = FMRLConfig(nested_sizes=[8, 16, 32], num_blocks=2)
    model = FMRLRec(cfg, num_items=100, text_features=torch.randn(101, 24))
    hidden, items = model(torch.randint(1, 101, (4, 10)))      # (4, 10, 32), (101, 32)
    scores = nested_scores(hidden[:, -1], items[1:], [8, 32])  # {8: (4, 100), 32: (4, 100)}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from models.fmrl.config import FMRLConfig
from models.fmrl.layers import LRUBlock, NestedLinear
from models.ops import nested_param_count
from models.ops.table_init import block_seeded_rows


def project_features(projector: nn.Linear, features: list[torch.Tensor]) -> torch.Tensor:
    """projector([f_1 ; f_2 ; ...]) from per-table rows (U, F_t), without a concatenated copy: (U, D)."""
    weight, bias = projector.weight, projector.bias
    out, start = None, 0
    for rows in features:
        width = rows.shape[-1]
        w = weight[:, start : start + width]
        out = torch.addmm(bias, rows, w.T) if out is None else out.addmm(rows, w.T)
        start += width
    if out is None or start != weight.shape[1]:
        raise ValueError(f"features of total width {start} given, the projector takes {weight.shape[1]}")
    return out


TABLE_INIT_STD = 0.02
"""Learnable tables start as N(0, 0.02^2) entries (row 0, padding, zero)."""


def initial_table_rows(seed: int, start: int, stop: int, dim: int) -> torch.Tensor:
    """Rows ``start:stop`` of a learnable table's initial values, (stop - start, dim), N(0, 0.02^2) with
    row 0 zero.

    Counter-based (:func:`models.ops.table_init.block_seeded_rows`): a row's value depends only on the
    table seed and the row, so a rank that owns any row range of any table gets the values the whole
    table would hold, at any world size, without the whole table ever existing."""

    def normal(generator: torch.Generator, rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=generator) * TABLE_INIT_STD  # (rows, cols)

    out = block_seeded_rows(seed, start, stop, dim, normal)
    if start == 0 and stop > 0:
        out[0].zero_()
    return out


@dataclass(frozen=True)
class AttributeBags:
    """Every item's attribute ids as bags in CSR form: item i's are ``values[offsets[i]:offsets[i + 1]]``,
    ids in 1..num_attributes (0 is unused); row 0 (padding) has none. offsets: (N + 2,), values: (nnz,)."""

    offsets: torch.Tensor
    values: torch.Tensor
    num_attributes: int

    def select(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The bags of ``ids`` (U,): their concatenated attribute ids (nnz_U,) and lengths (U,)."""
        starts = self.offsets[ids]
        lengths = self.offsets[ids + 1] - starts  # (U,)
        # position j of the output is element (j - first output position of its bag) of its bag
        bag_starts = torch.cumsum(lengths, 0) - lengths
        index = torch.arange(int(lengths.sum()), device=ids.device) + torch.repeat_interleave(
            starts - bag_starts, lengths
        )
        return self.values[index], lengths


class ItemTower(nn.Module):
    """Item representations E = projector([text ; image ; id ; attributes]) for all N+1 ids, (N+1, D).

    The text and image tables are frozen feature tables (either may be absent); the optional ID table is
    learnable, and so is the optional attribute table, whose rows are mean-pooled over each item's
    attribute bag (an item without attributes gets zeros). Row 0 of every table is zero (padding), so
    E[0] is the projector bias.

    Sharded from birth: with ``table_device="meta"`` (and meta feature tensors, shapes only) no table
    holds storage; the projector is built and initialised exactly as with real tables (the learnable
    tables take their values from :func:`initial_table_rows` under a seed drawn from torch's global
    generator, never from the generator itself), so a distributed run materialises only its shards
    (:meth:`initial_rows` for the learnable tables, the feature files for the frozen ones) and gets the
    same model as one that builds everything.
    """

    def __init__(
        self,
        num_items: int,
        dim: int,
        text_features: torch.Tensor | None,
        image_features: torch.Tensor | None,
        id_embedding_dim: int,
        attribute_bags: AttributeBags | None = None,
        attribute_embedding_dim: int = 0,
        table_device: torch.device | str | None = None,
    ) -> None:
        """``id_embedding_dim`` 0 means no ID table; ``attribute_embedding_dim`` 0 no attribute table.
        ``table_device``: where the learnable tables live ("meta": nowhere yet; default: torch's default
        device)."""
        super().__init__()
        self.num_items = num_items
        table_device = torch.device(table_device or torch.get_default_device())
        self.text = self._frozen_table("text", text_features, num_items)
        self.image = self._frozen_table("image", image_features, num_items)
        # drawn whether or not the tables are materialised: the projector's and trunk's initial values
        # come from the global generator after it, the same either way
        seeds = torch.randint(0, 2**62, (2,), device="cpu").tolist()
        self.table_seeds = {"id": seeds[0], "attribute": seeds[1]}
        self.id_embedding = None
        if id_embedding_dim:
            self.id_embedding = nn.Embedding(num_items + 1, id_embedding_dim, padding_idx=0, device="meta")
            self._materialise("id", self.id_embedding, table_device)
        self.attributes = None
        self.attribute_bags = None
        if attribute_embedding_dim:
            if attribute_bags is None:
                raise ValueError("an attribute table needs the items' attribute bags")
            if tuple(attribute_bags.offsets.shape) != (num_items + 2,):
                raise ValueError(
                    f"attribute bag offsets must be (num_items + 2,) = ({num_items + 2},), "
                    f"got {tuple(attribute_bags.offsets.shape)}"
                )
            self.attribute_bags = attribute_bags
            self.attributes = nn.EmbeddingBag(
                attribute_bags.num_attributes + 1, attribute_embedding_dim, mode="mean", device="meta"
            )
            self._materialise("attribute", self.attributes, table_device)
        in_dim = sum(t.embedding_dim for t in self.tables())
        if in_dim == 0:
            raise ValueError(
                "the item tower needs at least one of: text features, image features, an ID table, "
                "an attribute table"
            )
        self.projector = nn.Linear(in_dim, dim)

    def _materialise(self, name: str, table: nn.Embedding | nn.EmbeddingBag, device: torch.device) -> None:
        """Give a learnable table built on meta its initial values on ``device`` (stays meta if meta)."""
        if device.type == "meta":
            return
        table.to_empty(device=device)
        with torch.no_grad():
            table.weight.copy_(self.initial_rows(name, 0, table.num_embeddings))

    def initial_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of learnable table ``name``'s ("id" or "attribute") initial values,
        (stop - start, F_name): what the whole table starts with, for any slice of it."""
        table = self.id_embedding if name == "id" else self.attributes if name == "attribute" else None
        if table is None:
            raise ValueError(f"{name!r} is not a learnable table of this tower ({self.table_names()})")
        return initial_table_rows(self.table_seeds[name], start, stop, table.embedding_dim)

    @staticmethod
    def _frozen_table(name: str, features: torch.Tensor | None, num_items: int) -> nn.Embedding | None:
        if features is None:
            return None
        if features.dim() != 2 or features.shape[0] != num_items + 1:
            raise ValueError(
                f"{name} features must be (num_items + 1, width) = ({num_items + 1}, *) with row 0 for padding, "
                f"got {tuple(features.shape)}"
            )
        return nn.Embedding.from_pretrained(features.float(), freeze=True, padding_idx=0)

    def tables(self) -> list[nn.Embedding | nn.EmbeddingBag]:
        return [t for t in (self.text, self.image, self.id_embedding, self.attributes) if t is not None]

    def table_names(self) -> list[str]:
        """Names of the tables in :meth:`tables` order: "text", "image", "id", "attribute"."""
        named = (
            ("text", self.text),
            ("image", self.image),
            ("id", self.id_embedding),
            ("attribute", self.attributes),
        )
        return [name for name, table in named if table is not None]

    def lookup(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Rows of every table for ``ids`` (U,): a list of (U, F_t) in :meth:`tables` order (the attribute
        table's row of an item is the mean over its bag).

        A distributed run replaces this lookup with TorchRec-sharded tables (sharding/fmrl.py) and keeps
        :meth:`project`, so both paths share the projection."""
        rows = []
        for table in self.tables():
            if table is self.attributes:
                assert self.attribute_bags is not None
                values, lengths = self.attribute_bags.select(ids)
                rows.append(table(values, torch.cumsum(lengths, 0) - lengths))
            else:
                rows.append(table(ids))
        return rows

    def project(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Representations (U, D) of items from their per-table rows (U, F_t)."""
        return project_features(self.projector, features)

    def forward(self) -> torch.Tensor:
        # projector([t1 ; t2 ; ...]) as per-table products accumulated in place: no (N+1, F) concatenated
        # copy and no second (N+1, D) temporary
        weight, bias = self.projector.weight, self.projector.bias
        items, start = None, 0
        for table in self.tables():
            if table is self.attributes:
                assert self.attribute_bags is not None
                rows = table(self.attribute_bags.values, self.attribute_bags.offsets[:-1])  # (N+1, F)
            else:
                rows = table.weight
            width = table.embedding_dim
            w = weight[:, start : start + width]
            items = torch.addmm(bias, rows, w.T) if items is None else items.addmm_(rows, w.T)
            start += width
        return items  # (N+1, D)


class LRUTrunk(nn.Module):
    """Stack of nested LRU blocks. x: (B, L, D), mask: (B, L) -> (B, L, D)."""

    def __init__(self, cfg: FMRLConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            LRUBlock(cfg.nested_sizes, cfg.r_min, cfg.r_max, cfg.dropout, cfg.attn_dropout, cfg.complex_init)
            for _ in range(cfg.num_blocks)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask)
        return x


class FMRLRec(nn.Module):
    """Item tower -> nested LRU trunk; input and output item representations are tied.

    ``forward(tokens)`` returns the hidden states (B, L, D) and the item table (N+1, D). The score of item
    j at nested size m is ``hidden[..., :m] @ items[j, :m]``; the loss (``models.fmrl.loss``) and the
    scoring helper (``nested_scores``) live beside the model.
    """

    def __init__(
        self,
        cfg: FMRLConfig,
        num_items: int,
        text_features: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        attribute_bags: AttributeBags | None = None,
        table_device: torch.device | str | None = None,
    ) -> None:
        """``text_features`` / ``image_features``: (N + 1, F) frozen tables, or meta tensors of that
        shape; ``table_device="meta"`` builds the learnable tables without storage (see
        :class:`ItemTower`)."""
        super().__init__()
        self.cfg = cfg
        self.num_items = num_items
        self.item_tower = ItemTower(
            num_items,
            cfg.dim,
            text_features if cfg.use_text_features else None,
            image_features if cfg.use_image_features else None,
            (cfg.id_embedding_dim or cfg.dim) if cfg.use_id_embedding else 0,
            attribute_bags if cfg.use_attributes else None,
            (cfg.attribute_embedding_dim or cfg.dim) if cfg.use_attributes else 0,
            table_device,
        )
        self.embedding_dropout = nn.Dropout(cfg.dropout)
        self.trunk = LRUTrunk(cfg)

    def forward(
        self, tokens: torch.Tensor, items: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens: (B, L) item ids, 0 = padding. ``items`` (N+1, D) may be passed in when it is reused
        across batches (evaluation); training recomputes it so gradients reach the tower."""
        if items is None:
            items = self.item_tower()  # (N+1, D)
        return self.encode(items[tokens], tokens > 0), items

    def encode(self, token_items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, L, D) from the tokens' item representations (B, L, D); mask (B, L) is
        True at real (non-padding) positions."""
        return self.trunk(self.embedding_dropout(token_items), mask)

    def nested_submodel(self, size: int) -> FMRLRec:
        """A standalone model of width ``size`` (one of the nested sizes) built from sliced weights."""
        sizes = self.cfg.nested_sizes
        if size not in sizes:
            raise ValueError(f"size {size} is not one of the nested sizes {sizes}")
        tower = self.item_tower
        # the ID and attribute tables are inputs of the projector, not nested widths: they keep their widths
        id_dim = tower.id_embedding.embedding_dim if tower.id_embedding is not None else 0
        attribute_dim = tower.attributes.embedding_dim if tower.attributes is not None else 0
        sub_cfg = dataclasses.replace(
            self.cfg,
            nested_sizes=sizes[: sizes.index(size) + 1],
            id_embedding_dim=id_dim,
            attribute_embedding_dim=attribute_dim,
        )
        sub = FMRLRec(
            sub_cfg,
            self.num_items,
            tower.text.weight if tower.text is not None else None,
            tower.image.weight if tower.image is not None else None,
            tower.attribute_bags,
        )
        sub.load_state_dict(slice_state_dict(self.state_dict(), size))
        return sub

    def num_parameters(self, trainable_only: bool = True) -> int:
        """Parameter count; masked-out entries of nested weights are not counted (they are always zero)."""
        total = sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
        for module in self.modules():  # the masked GEMM group stores a small triangle of zeros
            if isinstance(module, NestedLinear) and module.groups[0].masked:
                group = module.groups[0]
                free = nested_param_count([m for m in module.sizes if m <= group.in_end], bias=False)
                total -= group.row_end * group.in_end - free
        return total


def slice_state_dict(state: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """Slice a full model's state dict to nested width ``size``.

    The item tables (frozen features, the ID and attribute tables) are projector inputs and keep their widths; the
    projector keeps its inputs and loses output rows; every other dimension of width D (all trunk weights
    are D or D x D) is cut to its first ``size`` entries.
    """
    sliced = {}
    for key, value in state.items():
        if key.startswith(
            ("item_tower.text.", "item_tower.image.", "item_tower.id_embedding.", "item_tower.attributes.")
        ):
            sliced[key] = value
        elif key.startswith("item_tower.projector."):
            sliced[key] = value[:size]
        else:
            sliced[key] = value[tuple(slice(0, size) for _ in range(value.dim()))]
        sliced[key] = sliced[key].clone()
    return sliced


def nested_scores(query: torch.Tensor, items: torch.Tensor, sizes: Sequence[int]) -> dict[int, torch.Tensor]:
    """Scores at each requested nested size, ``query[:, :m] @ items[:, :m].T``, each (B, N).

    Computed as running sums of per-block partial products, so all sizes together cost one (B, N, D)
    product. ``sizes`` must be increasing.
    """
    scores: dict[int, torch.Tensor] = {}
    running = None
    start = 0
    for m in sizes:
        partial = query[:, start:m] @ items[:, start:m].T  # (B, N)
        running = partial if running is None else running + partial
        scores[m] = running
        start = m
    return scores
