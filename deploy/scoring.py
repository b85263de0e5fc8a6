"""The size-m scoring program: item ids of histories in, scores of every item out.

One module serves the eager recommender, the ``torch.export`` program and the ONNX model, so all three
score alike. It is the trained LRU trunk (models/fmrl) with its recurrence evaluated in closed form
(``lru_scan_by_powers``: traceable with a dynamic batch size and history length) and the precomputed item
table. The table is kept in fp32, or in int8 with one scale per row (``quantise_rows``).

Shapes: B batch, L history length, m size, N items (ids 1..N, 0 is padding).
"""

from __future__ import annotations

import torch
from torch import nn

from models.fmrl import FMRLConfig, LRUTrunk
from models.fmrl.layers import LRULayer
from models.ops import lru_scan_by_powers


def quantise_rows(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise symmetric int8: (R, m) float -> values (R, m) int8 and scales (R,) with
    ``table ~= values * scales[:, None]``; an all-zero row gets scale 1."""
    peak = table.abs().amax(dim=1)  # (R,)
    scales = torch.where(peak > 0, peak / 127.0, torch.ones_like(peak))
    values = torch.round(table / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return values, scales.float()


class ScoringModel(nn.Module):
    """tokens (B, L) int64, left-padded with 0 -> scores (B, N) of items 1..N.

    ``quantised``: the item table is held as int8 with per-row fp32 scales (about a quarter of the
    bytes); rows are dequantised where they are used.
    """

    def __init__(self, trunk: LRUTrunk, items: torch.Tensor, quantised: bool = False) -> None:
        super().__init__()
        self.trunk = trunk.eval()
        for module in self.trunk.modules():
            if isinstance(module, LRULayer):
                module.scan = lru_scan_by_powers
        self.quantised = quantised
        if quantised:
            values, scales = quantise_rows(items.float())
            self.register_buffer("item_values", values)  # (N + 1, m) int8
            self.register_buffer("item_scales", scales)  # (N + 1,)
        else:
            self.register_buffer("item_values", items.float().contiguous())  # (N + 1, m)
            self.item_scales = None

    @classmethod
    def from_state(
        cls,
        config: FMRLConfig,
        trunk_state: dict[str, torch.Tensor],
        items: torch.Tensor,
        quantised: bool = False,
    ) -> ScoringModel:
        trunk = LRUTrunk(config)
        trunk.load_state_dict(trunk_state)
        return cls(trunk, items, quantised)

    @property
    def size(self) -> int:
        return self.item_values.shape[1]

    @property
    def num_items(self) -> int:
        return self.item_values.shape[0] - 1

    def item_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Float item representations of ``ids`` (any shape) -> (*ids.shape, m)."""
        rows = self.item_values[ids]
        if self.item_scales is None:
            return rows
        return rows.float() * self.item_scales[ids].unsqueeze(-1)

    def items(self) -> torch.Tensor:
        """The float (N + 1, m) item table (dequantised if held in int8)."""
        return self.item_rows(torch.arange(self.num_items + 1, device=self.item_values.device))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, m) query: the trunk's last hidden state."""
        hidden = self.trunk(self.item_rows(tokens), tokens > 0)  # (B, L, m)
        return hidden[:, -1]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        query = self.encode(tokens)  # (B, m)
        if self.item_scales is None:
            return query @ self.item_values[1:].T  # (B, N)
        # scale per item after the product: one int8 -> fp32 cast of the table, no dequantised copy kept
        return (query @ self.item_values[1:].T.float()) * self.item_scales[1:]
