"""Counter-based initial values of embedding tables: any row range of a table, computed on its own, equals
the same rows of the whole table, so a sharded job can give each rank its shards' initial values without
the whole table ever existing (and a single-device model built whole gets the very same table)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

__all__ = ["TABLE_INIT_BLOCK", "block_seeded_rows"]

TABLE_INIT_BLOCK = 1024
"""Rows per independently seeded block of a table's initial values."""


def block_seeded_rows(
    seed: int,
    start: int,
    stop: int,
    dim: int,
    draw: Callable[[torch.Generator, int, int], torch.Tensor],
    columns: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Rows ``start:stop`` of a table's initial values, (stop - start, dim), or only its ``columns``
    ``(c0, c1)``: (stop - start, c1 - c0).

    Block b (rows ``b*1024 ... b*1024+1023``) is ``draw(generator, 1024, dim)`` (a (1024, dim) tensor) from
    its own generator seeded by (``seed``, b), so a row's value depends only on the table seed and the
    row, never on which rows are asked for together: beyond the values asked for, at most one block is
    ever allocated (a column shard of a table never needs the table's other columns)."""
    c0, c1 = columns if columns is not None else (0, dim)
    if not 0 <= start <= stop:
        raise ValueError(f"rows {start}:{stop} are not a valid range")
    if not 0 <= c0 <= c1 <= dim:
        raise ValueError(f"columns {c0}:{c1} are not a valid range of {dim}")
    out = torch.empty(stop - start, c1 - c0)
    first, last = start // TABLE_INIT_BLOCK, -(-stop // TABLE_INIT_BLOCK)
    for block in range(first, last):
        digest = hashlib.blake2b(f"{seed}/{block}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        values = draw(generator, TABLE_INIT_BLOCK, dim)  # (TABLE_INIT_BLOCK, dim)
        lo, hi = max(start, block * TABLE_INIT_BLOCK), min(stop, (block + 1) * TABLE_INIT_BLOCK)
        out[lo - start : hi - start] = values[
            lo - block * TABLE_INIT_BLOCK : hi - block * TABLE_INIT_BLOCK, c0:c1
        ]
    return out
