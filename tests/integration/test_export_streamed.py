"""Streamed fMRL exports: a finished run exported with its item tables on meta, read block by block (the
ID table from model.safetensors, the frozen features from their files, locally or from S3), writes the
same files as an export of the model loaded whole, never reads a whole table at once, and refuses
portable programs it cannot write without holding the item table.

    .venv/bin/python -m pytest -q tests/integration/test_export_streamed.py
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from data_pipeline.features import FeaturesError
from data_pipeline.storage import filesystem
from trainer.cli import main
from trainer.config import load_saved_config
from trainer.export import (
    ExportError,
    export_items,
    export_sizes,
    load_recommender,
    load_trained_model,
    model_fingerprint,
    open_run_items,
)

SIZES = [8, 16, 32]
NUM_ITEMS = 150
BLOCK = 7  # items per block: the catalog takes 22 blocks, the last one of 4 items


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    """A trained run whose item tower has every kind of table: text and image features, an ID table and
    an attribute table (categories and brands of the synthetic scale catalog)."""
    tmp = tmp_path_factory.mktemp("streamed")
    data = str(tmp / "data")
    argv = ["data", "prepare-synthetic-scale", data, "--num-items", str(NUM_ITEMS), "--num-users", "120"]
    argv += ["--num-categories", "4", "--num-brands", "12", "--text-dim", "24", "--image-dim", "16"]
    argv += ["--max-seq-len", "10", "--shard-size", "60"]
    assert main(argv) == 0
    overrides = [
        f"data.path={data}",
        f"run.out_dir={tmp}",
        "run.name=run",
        "run.progress_bar=false",
        "run.loggers=[]",
        "data.num_workers=0",
        "model.nested_sizes=[8,16,32]",
        "model.num_blocks=1",
        "model.use_id_embedding=true",
        "model.use_attributes=true",
        "train.epochs=1",
        "train.max_steps=3",
        "train.batch_size=32",
        "train.num_threads=1",
        "optim.warmup_steps=1",
        "eval.batch_size=64",
        "eval.max_users=30",
    ]
    assert main(["train", *overrides]) == 0
    return str(tmp / "run")


def folder_files(root: str) -> dict[str, bytes]:
    """Every file under ``root`` by its relative path, with its bytes."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def test_the_streamed_export_writes_what_the_model_held_whole_does(run_dir, tmp_path) -> None:
    source = open_run_items(run_dir, block_rows=BLOCK)
    tower = source.model.item_tower
    assert tower.table_names() == ["text", "image", "id", "attribute"]
    streamed = export_items(source, str(tmp_path / "streamed"), SIZES)
    model = load_trained_model(run_dir)
    # a model held in memory knows no train.max_len: the run's (which the streamed export records) is given
    whole = export_sizes(model, str(tmp_path / "whole"), SIZES, block_rows=BLOCK, max_len=source.max_len)
    assert streamed == whole and streamed["max_len"] == 50
    files = folder_files(str(tmp_path / "streamed"))
    assert files == folder_files(str(tmp_path / "whole"))
    assert {"export.json", "size-8/items.safetensors", "size-32/model.safetensors"} <= set(files)

    # the item table is the model's, and its file is what safetensors itself writes for it
    with torch.no_grad():
        items = model.item_tower()  # (N + 1, D) in one product
    for m in SIZES:
        exported = load_file(str(tmp_path / "streamed" / f"size-{m}" / "items.safetensors"))["items"]
        torch.testing.assert_close(exported, items[:, :m], rtol=1e-5, atol=1e-6)
        assert files[f"size-{m}/items.safetensors"] == st_save({"items": exported})
        assert load_recommender(str(tmp_path / "streamed"), m).items.shape == (NUM_ITEMS + 1, m)

    # the fingerprint is exact whatever the block size and however the model was loaded; the
    # training run's own export (streamed, default blocks) records it too
    fingerprint = model_fingerprint(model)
    assert streamed["fingerprint"] == fingerprint == open_run_items(run_dir, block_rows=64).fingerprint()
    with open(os.path.join(run_dir, "export", "export.json")) as f:
        assert json.load(f)["fingerprint"] == fingerprint
    other = load_trained_model(run_dir)
    with torch.no_grad():
        other.item_tower.id_embedding.weight[5, 0] += 1e-3
    assert model_fingerprint(other) != fingerprint

    # the same model from the other path adds sizes to the export: same model, nothing rewritten
    assert export_sizes(model, str(tmp_path / "streamed"), [16]) == streamed

    # an export written before the fingerprint hashed the weights is not taken for this model's
    index = tmp_path / "whole" / "export.json"
    index.write_text(json.dumps({**whole, "version": 2}))
    with pytest.raises(
        ExportError, match=r"another model \(sizes \[8, 16, 32\], written by export version 2\)"
    ):
        export_items(open_run_items(run_dir, block_rows=BLOCK), str(tmp_path / "whole"), [8])


def test_no_item_table_is_ever_whole(run_dir, tmp_path) -> None:
    source = open_run_items(run_dir, block_rows=BLOCK)
    tower = source.model.item_tower
    for table in (tower.text, tower.image, tower.id_embedding):
        assert table is not None and table.weight.is_meta  # shapes only
    assert tower.attributes is not None and not tower.attributes.weight.is_meta  # small: in memory
    assert set(source.readers) == {"text", "image", "id"}
    assert set(source.checksums) == {"text", "image"}  # features.json's: checked on the first pass
    # each read asks for one block of rows at most
    calls: dict[str, list[int]] = {name: [] for name in source.readers}
    for name, reader in source.readers.items():
        plain = reader.read

        def counted(start: int, rows: int, *rest: int, _name: str = name, _plain=plain) -> torch.Tensor:
            calls[_name].append(rows)
            return _plain(start, rows, *rest)

        reader.read = counted  # type: ignore[method-assign]
    before = {name: (r.bytes_read, r.requests) for name, r in source.readers.items()}
    export_items(source, str(tmp_path / "out"), SIZES)
    passes = 1 + len(SIZES)  # the fingerprint, then each size's items
    blocks = math.ceil((NUM_ITEMS + 1) / BLOCK)
    for name, reader in source.readers.items():
        assert max(calls[name]) == BLOCK and len(calls[name]) == passes * blocks, name
        bytes_read, requests = before[name]
        if reader.blocks is not None:  # read in whole checksum blocks (here one band), each checked once
            assert reader.bytes_read - bytes_read == reader.nbytes and reader.requests - requests == 1
            continue
        assert reader.bytes_read - bytes_read == passes * reader.nbytes  # every byte once per pass
        assert reader.requests - requests == passes * blocks  # one range per block
    assert source.readers["id"].url == os.path.join(run_dir, "model.safetensors")


def test_portable_programs_need_the_catalog_in_one_block(run_dir, tmp_path) -> None:
    out = str(tmp_path / "out")
    with pytest.raises(ExportError, match=r"portable programs \(pt2\) embed the whole \(151, m\) item table"):
        export_items(open_run_items(run_dir, block_rows=BLOCK), out, [8], formats=["pt2"])
    assert not os.path.exists(out)  # refused before anything was written
    with pytest.raises(ExportError, match=r"sizes \[12\] are not nested sizes"):
        export_items(open_run_items(run_dir, block_rows=BLOCK), out, [12])
    with pytest.raises(ExportError, match="block_rows must be at least 1"):
        open_run_items(run_dir, block_rows=0)


def test_features_read_from_s3_and_the_export_written_there(run_dir, s3_server, tmp_path) -> None:
    data = load_saved_config(os.path.join(run_dir, "config.yaml")).data.features_url
    bucket = s3_server.make_bucket()
    fs, _ = filesystem(bucket, s3_server.options)
    with open(os.path.join(data, "features.json")) as f:
        info = json.load(f)
    blocks = [info[f"{m}_blocks"]["file"] for m in ("text", "image")]  # the tables' block checksums
    for name in ("features.json", info["text_file"], info["image_file"], *blocks):
        fs.put(os.path.join(data, name), f"{bucket.removeprefix('s3://')}/features/{name}")
    source = open_run_items(run_dir, s3_server.options, features=f"{bucket}/features", block_rows=BLOCK)
    assert source.readers["text"].url.startswith("s3://")
    remote = f"{bucket}/export"
    manifest = export_items(source, remote, SIZES, s3_server.options)
    local = export_items(open_run_items(run_dir, block_rows=BLOCK), str(tmp_path / "local"), SIZES)
    assert manifest == local
    for m in SIZES:
        from_s3 = load_recommender(remote, m, s3_server.options)
        assert torch.equal(from_s3.items, load_recommender(str(tmp_path / "local"), m).items)


def test_a_damaged_feature_file_is_refused_before_anything_is_written(run_dir, tmp_path) -> None:
    data = load_saved_config(os.path.join(run_dir, "config.yaml")).data.features_url
    copy = tmp_path / "features"
    shutil.copytree(data, copy)
    with open(copy / "features.json") as f:
        text_file = copy / json.load(f)["text_file"]
    damaged = bytearray(text_file.read_bytes())
    damaged[-3] ^= 0x40  # one bit of the last row: the header and shape still read fine
    text_file.write_bytes(bytes(damaged))
    source = open_run_items(run_dir, features=str(copy), block_rows=BLOCK)
    out = tmp_path / "out"
    # the damaged block is named by the feature reader's block checksums (FeaturesError), or, in a folder
    # without them, by the whole file's sha256 (ExportError); both exit 2
    with pytest.raises((ExportError, FeaturesError), match=f"{text_file} is corrupt"):
        export_items(source, str(out), SIZES)
    assert not out.exists()
