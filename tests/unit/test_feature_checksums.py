"""Block checksums of feature tables: a rank reading any slice (rows, columns, unaligned) gets exactly
the table's values, and a flipped byte fails naming the file and the block; a folder without block
checksums is still read, checked by its whole-file sha256 where a reader reads the whole file."""

from __future__ import annotations

import json

import pytest
import torch

from data_pipeline import features
from data_pipeline.features import FeaturesError, open_feature_tables, write_feature_table


@pytest.fixture
def small_blocks(monkeypatch):
    # blocks of 8 rows x 4 columns, so a 37 x 10 table has 5 x 3 of them, the last ones partial
    monkeypatch.setattr(features, "BLOCK_ROWS", 8)
    monkeypatch.setattr(features, "BLOCK_COLS", 4)


def write_folder(folder, table: torch.Tensor, *, blocks: bool = True) -> None:
    written = write_feature_table(
        str(folder / "text_features.safetensors"), *table.shape, [table.numpy()], "m"
    )
    info = {
        "num_items": table.shape[0] - 1,
        "text_dim": table.shape[1],
        "text_file": "text_features.safetensors",
        "text_sha256": written["sha256"],
    }
    if blocks:
        info["text_blocks"] = written["blocks"]
    (folder / "features.json").write_text(json.dumps(info))


def flip(path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "rows, cols",
    [((0, 37), (0, 10)), ((3, 17), (0, 10)), ((9, 1), (5, 2)), ((0, 37), (4, 4)), ((30, 7), (7, 3))],
)
def test_any_slice_reads_the_table(small_blocks, tmp_path, rows, cols) -> None:
    table = torch.randn(37, 10)
    write_folder(tmp_path, table)
    text, _, _ = open_feature_tables(str(tmp_path))
    assert text is not None and text.blocks is not None
    (r, n), (c, m) = rows, cols
    assert torch.equal(text.read(r, n, c, m), table[r : r + n, c : c + m])


def test_a_flipped_byte_names_the_file_and_the_block(small_blocks, tmp_path) -> None:
    table = torch.randn(37, 10)
    write_folder(tmp_path, table)
    flip(tmp_path / "text_features.safetensors", 4 * 10 * 2 + 1)  # row 34, column 9: block 4 x 3 + 2 = 14
    text, _, _ = open_feature_tables(str(tmp_path))
    assert torch.equal(text.read(0, 32), table[:32])  # the blocks before it are intact
    assert torch.equal(text.read(32, 5, 0, 8), table[32:, :8])  # and so are its neighbours in its rows
    with pytest.raises(FeaturesError, match=r"text_features.safetensors is corrupt: block 14 \(rows 32:37, "):
        text.read(34, 2, 9, 1)


def test_damaged_block_checksums_are_refused(small_blocks, tmp_path) -> None:
    write_folder(tmp_path, torch.randn(37, 10))
    flip(tmp_path / "text_features.blocks", 1)
    with pytest.raises(FeaturesError, match=r"text_features.blocks is corrupt"):
        open_feature_tables(str(tmp_path))


def test_a_folder_without_block_checksums_is_checked_by_its_sha256(small_blocks, tmp_path) -> None:
    table = torch.randn(37, 10)
    write_folder(tmp_path, table, blocks=False)
    text, _, _ = open_feature_tables(str(tmp_path))
    assert torch.equal(torch.cat([text.read(0, 20), text.read(20, 17)]), table)  # intact: whole file read
    flip(tmp_path / "text_features.safetensors", 3)
    text, _, _ = open_feature_tables(str(tmp_path))
    assert text.read(0, 20, 2, 3).shape == (20, 3)  # a slice cannot be checked (and is not refused)
    text, _, _ = open_feature_tables(str(tmp_path))
    text.read(0, 20)
    with pytest.raises(FeaturesError, match=r"text_features.safetensors is corrupt: its sha256 differs"):
        text.read(20, 17)  # the last rows of an in-order pass over the whole file
