"""The item-attribute index (data_pipeline/item_index.py) against the reference parse of the item shards:
written by the writers that have attributes, read memory-mapped (local) or whole (S3), damage named."""

from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Any

import numpy as np
import pytest

from data_pipeline.converters import convert_seqrec
from data_pipeline.item_index import INDEX_KEY, OFFSETS_FILE, VALUES_FILE
from data_pipeline.loader import (
    DatasetError,
    SequenceDataset,
    parse_item_attributes,
    read_item_attributes,
)
from data_pipeline.storage import atomic_write, join, open_read
from data_pipeline.synthetic_scale import prepare_synthetic_scale

NUM_ATTRIBUTES = 4 + 12


def _scale(url: str, options: Any = None) -> str:
    prepare_synthetic_scale(
        url,
        num_items=300,
        num_users=20,
        num_categories=4,
        num_brands=12,
        text_dim=0,
        max_samples_per_shard=128,
        options=options,
        progress=False,
    )
    return url


@pytest.fixture
def scale(tmp_path: Any) -> str:
    return _scale(str(tmp_path / "scale"))


def _assert_same(index: Any, reference: Any) -> None:
    assert index.num_attributes == reference.num_attributes
    assert index.offsets.dtype == reference.offsets.dtype == np.int64
    assert index.values.dtype == reference.values.dtype == np.int64
    np.testing.assert_array_equal(index.offsets, reference.offsets)
    np.testing.assert_array_equal(index.values, reference.values)


def _info(url: str) -> dict:
    with open(os.path.join(url, "dataset.json")) as f:
        return json.load(f)


def _write_info(url: str, info: dict) -> None:
    with open(os.path.join(url, "dataset.json"), "w") as f:
        json.dump(info, f)


def test_scale_catalog_index_equals_the_parse_and_is_memory_mapped(scale: str) -> None:
    from trainer.export import open_attributes

    assert set(_info(scale)[INDEX_KEY]) == {"version", "offsets", "values"}
    dataset = SequenceDataset.open(scale)
    bags = read_item_attributes(dataset)
    _assert_same(bags, parse_item_attributes(dataset))
    assert isinstance(bags.values, np.memmap) and isinstance(bags.offsets, np.memmap)
    assert bags.values.shape == (2 * 300,) and int(bags.values.max()) <= NUM_ATTRIBUTES
    # the tensors share the mapped pages of the files: no copy, and no warning about a read-only array
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensors = open_attributes(dataset)
    assert tensors is not None and tensors.num_attributes == NUM_ATTRIBUTES
    for tensor, name in ((tensors.offsets, OFFSETS_FILE), (tensors.values, VALUES_FILE)):
        assert _mapped_from(tensor.data_ptr()) == os.path.realpath(os.path.join(scale, name))
    # copy-on-write: a write into the mapped array stays in this process and never reaches the file
    bags.values[0] = 99
    assert np.load(os.path.join(scale, VALUES_FILE))[0] != 99
    assert read_item_attributes(dataset).values[0] != 99


def _mapped_from(address: int) -> str | None:
    """The file whose memory map holds ``address`` in this process (Linux /proc/self/maps), if any."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return fields[5] if len(fields) > 5 else None
    return None


def test_seqrec_attributes_index_equals_the_parse(tmp_path: Any) -> None:
    lines = [
        "1 10 11 12 13 14 15",
        "2 11 12 13 14 10 15",
        "3 12 13 14 10 11 15",
        "4 13 14 10 11 12 15",
        "5 14 10 11 12 13 15",
    ]
    seqs = tmp_path / "toy.txt"
    seqs.write_text("\n".join(lines) + "\n")
    attrs = tmp_path / "toy_attrs.json"
    # item 15 is not listed and 13 has none: empty bags; 12's repeat counts once
    attrs.write_text(json.dumps({"10": [40, 5], "11": [5], "12": [7, 40, 7], "13": [], "14": [7]}))
    out = str(tmp_path / "out")
    convert_seqrec(out, str(seqs), attributes_path=str(attrs), max_samples_per_shard=2)
    assert INDEX_KEY in _info(out)
    dataset = SequenceDataset.open(out)
    bags = read_item_attributes(dataset)
    _assert_same(bags, parse_item_attributes(dataset))
    assert bags.offsets.tolist() == [0, 0, 2, 3, 5, 5, 6, 6]
    assert bags.values.tolist() == [3, 1, 1, 2, 3, 2]
    # without --attributes there is nothing to index
    plain = str(tmp_path / "plain")
    convert_seqrec(plain, str(seqs), max_samples_per_shard=2)
    assert INDEX_KEY not in _info(plain) and not os.path.exists(os.path.join(plain, VALUES_FILE))


def _rewrite(path: str, array: np.ndarray, info_url: str | None = None) -> None:
    np.save(path, array)
    if info_url is not None:  # record the new size, as a consistent-looking damaged index would
        info = _info(info_url)
        key = "offsets" if path.endswith(OFFSETS_FILE) else "values"
        info[INDEX_KEY][key]["bytes"] = os.path.getsize(path)
        _write_info(info_url, info)


@pytest.mark.parametrize(
    "damage, culprit, message",
    [
        ("appended", VALUES_FILE, "bytes, dataset.json records"),
        ("truncated", OFFSETS_FILE, "bytes, dataset.json records"),
        ("truncated-recorded", OFFSETS_FILE, "offsets have shape (200,), expected (302,)"),
        ("id-out-of-range", VALUES_FILE, f"attribute id {NUM_ATTRIBUTES + 1} is outside 1..{NUM_ATTRIBUTES}"),
        ("id-zero", VALUES_FILE, f"attribute id 0 is outside 1..{NUM_ATTRIBUTES}"),
        ("decreasing", OFFSETS_FILE, "offsets decrease at item 5"),
        ("last-offset", OFFSETS_FILE, "the last offset is 598 but there are 600 values"),
        ("not-npy", VALUES_FILE, "not a readable .npy array"),
        ("int32", VALUES_FILE, "expected a 1-D int64 array"),
        ("missing", VALUES_FILE, "does not exist"),
    ],
)
def test_a_damaged_index_is_an_error_naming_the_file(
    scale: str, damage: str, culprit: str, message: str
) -> None:
    offsets_path, values_path = os.path.join(scale, OFFSETS_FILE), os.path.join(scale, VALUES_FILE)
    offsets, values = np.load(offsets_path), np.load(values_path)
    if damage == "appended":
        with open(values_path, "ab") as f:
            f.write(b"\0" * 8)
    elif damage == "truncated":
        os.truncate(offsets_path, os.path.getsize(offsets_path) - 8)
    elif damage == "truncated-recorded":
        _rewrite(offsets_path, offsets[:200], scale)
    elif damage in ("id-out-of-range", "id-zero"):  # same size: only the range check sees it
        values[7] = NUM_ATTRIBUTES + 1 if damage == "id-out-of-range" else 0
        _rewrite(values_path, values)
    elif damage == "decreasing":
        offsets[6] = offsets[5] - 1
        _rewrite(offsets_path, offsets)
    elif damage == "last-offset":
        offsets[-1] -= 2
        _rewrite(offsets_path, offsets)
    elif damage == "not-npy":
        size = os.path.getsize(values_path)
        with open(values_path, "wb") as f:
            f.write(b"x" * size)
    elif damage == "int32":
        _rewrite(values_path, values.astype(np.int32), scale)
    else:
        os.remove(values_path)
    with pytest.raises(DatasetError, match="index-attributes") as error:
        read_item_attributes(SequenceDataset.open(scale))
    assert os.path.join(scale, culprit) in str(error.value)
    assert message in str(error.value)


def test_a_malformed_index_entry_names_dataset_json(scale: str) -> None:
    info = _info(scale)
    info[INDEX_KEY] = {"offsets": {"file": OFFSETS_FILE}}
    _write_info(scale, info)
    with pytest.raises(DatasetError, match=r"dataset.json: .attribute_index. must be version 1 and name"):
        read_item_attributes(SequenceDataset.open(scale))


def test_without_an_index_the_parse_is_used_and_said_once(
    scale: str, caplog: pytest.LogCaptureFixture
) -> None:
    info = _info(scale)
    del info[INDEX_KEY]
    _write_info(scale, info)
    for name in (OFFSETS_FILE, VALUES_FILE):  # not read: a data set without the key has no index
        os.remove(os.path.join(scale, name))
    dataset = SequenceDataset.open(scale)
    with caplog.at_level(logging.WARNING, logger="fmrl"):
        first, second = read_item_attributes(dataset), read_item_attributes(dataset)
    _assert_same(first, parse_item_attributes(dataset))
    _assert_same(second, first)
    said = [r.getMessage() for r in caplog.records if "no item-attribute index" in r.getMessage()]
    assert len(said) == 1 and f"fmrl data index-attributes {scale}" in said[0]
    assert not isinstance(first.values, np.memmap)


def test_cli_indexes_an_old_data_set(scale: str, capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.cli import main

    info = _info(scale)
    old = info.pop(INDEX_KEY)
    _write_info(scale, info)
    for name in (OFFSETS_FILE, VALUES_FILE):
        os.remove(os.path.join(scale, name))
    assert main(["data", "index-attributes", scale]) == 0
    assert "item-attribute index written" in capsys.readouterr().out
    rebuilt = _info(scale)
    assert rebuilt[INDEX_KEY] == old  # the same bytes as the writer's, from the reference parse
    assert {k: v for k, v in rebuilt.items() if k != INDEX_KEY} == info
    dataset = SequenceDataset.open(scale)
    bags = read_item_attributes(dataset)
    assert isinstance(bags.values, np.memmap)
    _assert_same(bags, parse_item_attributes(dataset))


def test_cli_on_a_data_set_without_attributes_is_an_error(tmp_path: Any) -> None:
    from trainer.cli import main

    url = _scale(str(tmp_path / "scale"))
    info = _info(url)
    del info["num_attributes"], info[INDEX_KEY]
    _write_info(url, info)
    assert main(["data", "index-attributes", url]) == 2  # a usage error naming dataset.json
    assert INDEX_KEY not in _info(url)


def test_s3_data_set_reads_its_index_whole_and_checks_the_sha256(s3_server: Any) -> None:
    options = s3_server.options
    url = _scale(join(s3_server.make_bucket(), "scale"), options)
    dataset = SequenceDataset.open(url, options)
    bags = read_item_attributes(dataset)
    assert not isinstance(bags.values, np.memmap) and bags.values.flags.writeable
    _assert_same(bags, parse_item_attributes(dataset))
    # same size, ids still in range: only the checksum sees it
    values_url = join(url, VALUES_FILE)
    with open_read(values_url, options) as f:
        data = bytearray(f.read())
    data[-8] = 1 if data[-8] != 1 else 2
    with atomic_write(values_url, options) as f:
        f.write(bytes(data))
    with pytest.raises(DatasetError, match="sha256") as error:
        read_item_attributes(SequenceDataset.open(url, options))
    assert values_url in str(error.value)
