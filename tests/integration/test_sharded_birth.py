"""Item tables sharded from birth: the model's tables are built on meta, each rank materialises only its
shards (learnable ones generated per row block, frozen ones read from the feature files by byte range,
locally and from S3), and training is exactly what the old path (every table loaded and built whole,
then sharded) gives.

The distributed cases launch tests/integration/sharded_birth_worker.py with torchrun (gloo), which
builds the job both ways in one process under the same seed. CPU TorchRec has no row-wise kernel, so
row-wise shard reading is tested at the reader level (:class:`FeatureTableReader` row ranges).

The CTR models' tables (DLRM, Wide & Deep, ...) are sharded from birth too: tests/integration/
ctr_birth_worker.py builds them on meta on 2 ranks, and they equal the one-device model's exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from data_pipeline.features import (
    FeaturesError,
    FeatureTableReader,
    open_feature_tables,
    write_safetensors_blocks,
)
from data_pipeline.storage import StorageError, filesystem
from data_pipeline.synthetic_scale import prepare_synthetic_scale

WORKER = os.path.join(os.path.dirname(__file__), "sharded_birth_worker.py")
TABLES = ("text", "image", "id", "attribute")
# the 1-rank and 2-rank jobs reduce in another order: float32 differences of ~1e-7 relative
LOSS_RTOL = 1e-5


def run_worker(
    dataset: str, features: str, out: str, ranks: int, sharding: str, env: dict | None = None
) -> dict:
    weights = out.removesuffix(".json") + "-model.safetensors"
    command = [sys.executable, WORKER]
    if ranks > 1:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={ranks}",
            WORKER,
        ]
    done = subprocess.run(
        [
            *command,
            "--dataset",
            dataset,
            "--features",
            features,
            "--sharding",
            sharding,
            "--out",
            out,
            "--weights",
            weights,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> str:
    """300 items with a 64-wide text and a 96-wide image table (synthetic features), 200 users."""
    url = str(tmp_path_factory.mktemp("birth") / "data")
    prepare_synthetic_scale(
        url,
        num_items=300,
        num_users=200,
        num_categories=6,
        num_brands=20,
        min_seq_len=5,
        max_seq_len=12,
        seed=1,
        text_dim=64,
        image_dim=96,
        max_samples_per_shard=100,
        progress=False,
    )
    return url


@pytest.fixture(scope="module")
def s3_features(catalog, s3_server) -> str:
    """The catalog's feature folder copied to a moto S3 bucket."""
    url = s3_server.make_bucket() + "/features"
    fs, path = filesystem(url, s3_server.options)
    local = os.path.join(catalog, "features")
    for name in os.listdir(local):
        fs.put_file(os.path.join(local, name), f"{path}/{name}")
    return url


@pytest.fixture(scope="module")
def one_rank(catalog, tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("one") / "one.json")
    return run_worker(catalog, os.path.join(catalog, "features"), out, 1, "column_wise")


def check_same_training(result: dict, reference: dict) -> None:
    """Every rank's from-birth job equals its old-path job exactly, and follows the 1-rank old path."""
    for rank in result["ranks"]:
        assert rank["birth"]["losses"] == rank["old"]["losses"]  # same values, same order of operations
        assert rank["birth"]["rows_before"] == rank["old"]["rows_before"]  # the same initial tables
        assert rank["birth"]["rows_after"] == rank["old"]["rows_after"]  # the same trained tables
        np.testing.assert_allclose(
            rank["birth"]["losses"], reference["ranks"][0]["old"]["losses"], rtol=LOSS_RTOL
        )
    losses = result["ranks"][0]["birth"]["losses"]
    assert len(losses) == 3 and losses[-1] < losses[0]


def check_nothing_whole_on_meta(rank: dict) -> None:
    assert rank["held"]["tower_on_meta"] and rank["held"]["tower_storage_bytes"] == 0


def check_streamed_weights(result: dict) -> None:
    """model.safetensors written block by block equals the gathered weights; the ranks share the writing
    (block b of a table by rank b % world size: the ID table's 301 rows are 5 blocks of 64) and no rank
    ever held more than one 64-row block of a table (the tables have 301 and 13 rows)."""
    ranks = [rank["birth"]["weights"] for rank in result["ranks"]]
    weights = ranks[0]
    assert weights["max_diff"] == 0.0
    assert {
        "item_tower.id_embedding.weight",
        "item_tower.attributes.weight",
        "trunk.blocks.0.lru.nu_log",
    } <= set(weights["keys"])
    ids = "item_tower.id_embedding.weight"
    assert weights["table_rows"][ids] == 301
    assert [rank["pieces"].get(ids, 0) for rank in ranks] == [
        len(range(r, 5, len(ranks))) for r in range(len(ranks))
    ]
    assert all(rank["largest_block_rows"][ids] == 64 for rank in ranks)
    assert all(rows <= 64 for rank in ranks for rows in rank["largest_block_rows"].values())
    # every byte of the file is the header or written by exactly one rank
    header = weights["file_bytes"] - sum(rank["bytes"] for rank in ranks)
    assert 8 < header < 10_000, header


def test_one_rank_from_birth_equals_the_old_path(one_rank) -> None:
    assert one_rank["world_size"] == 1
    (rank,) = one_rank["ranks"]
    check_nothing_whole_on_meta(rank)
    check_same_training(one_rank, one_rank)
    check_streamed_weights(one_rank)
    # one rank owns everything: it reads each file exactly once, whole
    assert rank["held"]["bytes_read"] == rank["held"]["file_bytes"]


def column_wise_checks(two: dict) -> list[float]:
    """Each rank holds half of every table's columns and read at most ~60 % of each file; returns the
    fractions read."""
    fractions = []
    for rank in two["ranks"]:
        held = rank["held"]
        check_nothing_whole_on_meta(rank)
        for name in TABLES:
            shard = held["shards"][name]
            full = shard["full"][0] * shard["full"][1]
            assert 0 < shard["local_numel"] < full, (name, shard)
            assert all(
                local[0] == shard["full"][0] and local[1] < shard["full"][1] for local in shard["local"]
            )
        for name in ("text", "image"):
            fraction = held["bytes_read"][name] / held["file_bytes"][name]
            assert fraction <= 0.6, (name, fraction)
            fractions.append(fraction)
    return fractions


def test_two_ranks_column_wise_read_only_their_columns(catalog, one_rank, tmp_path) -> None:
    two = run_worker(catalog, os.path.join(catalog, "features"), str(tmp_path / "two.json"), 2, "column_wise")
    assert two["world_size"] == 2
    fractions = column_wise_checks(two)
    assert max(fractions) < 0.51  # half the columns of every row, plus the header
    check_same_training(two, one_rank)
    check_streamed_weights(two)


def test_two_ranks_column_wise_from_s3(catalog, s3_features, s3_server, one_rank, tmp_path) -> None:
    env = {
        "FSSPEC_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    two = run_worker(catalog, s3_features, str(tmp_path / "s3.json"), 2, "column_wise", env)
    fractions = column_wise_checks(two)
    assert max(fractions) < 0.51
    check_same_training(two, one_rank)


def test_two_ranks_table_wise_read_the_tables_they_own(catalog, one_rank, tmp_path) -> None:
    two = run_worker(catalog, os.path.join(catalog, "features"), str(tmp_path / "tw.json"), 2, "table_wise")
    for name in ("text", "image"):
        owners = [r for r in two["ranks"] if r["held"]["shards"][name]["local_numel"]]
        assert len(owners) == 1  # one rank holds the whole table, and it alone reads it
        for rank in two["ranks"]:
            read, size = rank["held"]["bytes_read"][name], rank["held"]["file_bytes"][name]
            assert read == size if rank is owners[0] else read < 256  # the others: the header only
    for rank in two["ranks"]:
        check_nothing_whole_on_meta(rank)
        assert sum(r["held"]["shards"][n]["local_numel"] > 0 for r in two["ranks"] for n in TABLES) == len(
            TABLES
        )
    check_same_training(two, one_rank)
    check_streamed_weights(two)


# ------------------------------------------------------------------------------------- the reader itself


@pytest.mark.parametrize("where", ["local", "s3"])
def test_reader_reads_row_ranges_and_column_blocks_and_nothing_else(
    catalog, s3_features, s3_server, where
) -> None:
    local = os.path.join(catalog, "features")
    full = load_file(os.path.join(local, "image_features.safetensors"))["features"]  # (301, 96)
    if where == "local":
        _, image, _ = open_feature_tables(local)
    else:
        _, image, _ = open_feature_tables(s3_features, s3_server.options)
    assert image is not None and image.blocks is not None  # checked reads widen to whole blocks:
    image = FeatureTableReader(image.url, image.options)  # the raw reader's ranges are tested here
    assert image is not None and image.shape == tuple(full.shape)
    header = image.bytes_read
    assert header == image.data_start < 256 and image.requests == 2
    # row-wise shards: contiguous row ranges, one range request each
    for start, rows in [(0, 151), (151, 150), (7, 1), (300, 1)]:
        before = image.bytes_read
        torch.testing.assert_close(image.read(start, rows), full[start : start + rows], rtol=0, atol=0)
        assert image.bytes_read - before == rows * 96 * 4
    # a column block: its columns of each row only
    before, requests = image.bytes_read, image.requests
    torch.testing.assert_close(image.read(10, 20, 48, 48), full[10:30, 48:96], rtol=0, atol=0)
    assert image.bytes_read - before == 20 * 48 * 4 and image.requests - requests == 20
    with pytest.raises(FeaturesError, match="rows 300:302"):
        image.read(300, 2)
    with pytest.raises(FeaturesError, match="columns 90:100"):
        image.read(0, 1, 90, 10)


def test_reader_names_a_truncated_or_foreign_file(catalog, tmp_path) -> None:
    source = os.path.join(catalog, "features", "text_features.safetensors")
    data = open(source, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-100])
    reader = FeatureTableReader(str(cut))  # the header is intact
    with pytest.raises(StorageError, match="cut.safetensors ends before byte"):
        reader.read(290, 11)
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(b"\xff" * 64)
    with pytest.raises(FeaturesError, match="foreign.safetensors is not a safetensors file"):
        FeatureTableReader(str(foreign))


def test_streamed_safetensors_of_several_tensors_load_as_written(tmp_path) -> None:
    table, bias, steps = torch.randn(10, 3), torch.randn(4), torch.tensor([7, 8], dtype=torch.int64)
    layout = {
        "b.table": (torch.float32, (10, 3)),
        "a.bias": (torch.float32, (4,)),
        "c.steps": (torch.int64, (2,)),
    }
    url = str(tmp_path / "w.safetensors")
    blocks = [("a.bias", bias), ("b.table", table[:4]), ("b.table", table[4:]), ("c.steps", steps)]
    write_safetensors_blocks(url, layout, blocks)
    written = load_file(url)
    assert written.keys() == {"a.bias", "b.table", "c.steps"}
    for key, value in (("a.bias", bias), ("b.table", table), ("c.steps", steps)):
        torch.testing.assert_close(written[key], value, rtol=0, atol=0)
    # a table short of rows, or blocks out of order: an error naming it, and nothing written
    bad = str(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="the blocks of b.table hold 4 rows, the table has 10"):
        write_safetensors_blocks(bad, layout, [("a.bias", bias), ("b.table", table[:4]), ("c.steps", steps)])
    with pytest.raises(ValueError, match="the blocks of a.bias hold 0 rows"):
        write_safetensors_blocks(bad, layout, [("b.table", table), ("a.bias", bias)])
    assert not os.path.exists(bad)


# ------------------------------------------------------------------------------------------ CTR tables

CTR_WORKER = os.path.join(os.path.dirname(__file__), "ctr_birth_worker.py")


@pytest.mark.parametrize(("model", "sharding"), [("wide_deep", "column_wise"), ("dlrm", "table_wise")])
def test_ctr_tables_sharded_from_birth_on_two_ranks_equal_the_one_device_model(
    tmp_path, model, sharding
) -> None:
    """A CTR model built with its tables on meta and sharded over 2 ranks starts exactly as the same model
    built whole on one device (every table, the first-order and crossed ones included, and the dense
    part); no rank ever generated more of a table than its own shard, and the model's tables hold no
    storage."""
    out, weights = str(tmp_path / "ctr.json"), str(tmp_path / "ctr.safetensors")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            CTR_WORKER,
            f"--model={model}",
            f"--sharding={sharding}",
            f"--out={out}",
            f"--weights={weights}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    with open(out) as f:
        result = json.load(f)
    assert result["world_size"] == 2
    sys.path.insert(0, os.path.dirname(__file__))
    from ctr_birth_worker import config, parser

    from models.ctr import build_ctr_model

    torch.manual_seed(0)
    one_device = build_ctr_model(config(parser().parse_args([f"--model={model}", "--out=-"]))).state_dict()
    gathered = load_file(weights)
    assert gathered.keys() == one_device.keys()
    for key, value in one_device.items():
        torch.testing.assert_close(gathered[key], value, rtol=0, atol=0, msg=key)
    tables = {
        key.split(".")[-2]: tuple(v.shape) for key, v in one_device.items() if key.startswith("sparse_arch.")
    }
    assert len(tables) == (8 if model == "wide_deep" else 3)
    owned = {name: 0 for name in tables}
    for rank in result["ranks"]:
        assert rank["tables_on_meta"]
        for name, shard in rank["shards"].items():
            owned[name] += shard["local_numel"]
            largest = rank["generated"].get(name, [0, 0])
            # what a rank generates of a table is at most its own shard: never the whole table (unless the
            # whole table is its shard: table-wise, or a 4-wide first-order table, the narrowest shard)
            assert largest[0] * largest[1] <= shard["local_numel"], (name, largest, shard)
            if sharding == "column_wise" and name.startswith("t_"):
                assert 0 < shard["local_numel"] < tables[name][0] * tables[name][1], (name, shard)
    assert owned == {name: rows * cols for name, (rows, cols) in tables.items()}  # every entry once
