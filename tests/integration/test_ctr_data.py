"""CTR data: the Criteo TSV converter on hand-written lines (exact records, missing values, bad rows raised
with file:line or skipped and counted, gzip), the synthetic Criteo-like generator (deterministic, written
through the converter's encoding, learnable by a logistic regression), the Open Bandit Dataset from the
obp wheel, and the batch reader.

    .venv/bin/python -m pytest -q tests/integration/test_ctr_data.py
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import math
import os
import re
from typing import Any

import numpy as np
import pytest
import torch

from data_pipeline.converters import ConversionError
from data_pipeline.criteo import CRITEO_SPARSE_NAMES, convert_criteo
from data_pipeline.ctr import (
    CTRDataset,
    decode_ctr_sample,
    encode_ctr_record,
    hash_categorical,
    iter_ctr_batches,
    iter_ctr_samples,
    split_shards,
)
from data_pipeline.shards import read_manifest
from data_pipeline.storage import join
from data_pipeline.stream import ShardStream, iter_shard
from data_pipeline.synthetic_ctr import prepare_synthetic_ctr, synthetic_criteo_lines, synthetic_ctr_draw
from models.dlrm import ids_to_kjt, roc_auc


def _line(label: str, dense: list[str], sparse: list[str]) -> str:
    assert len(dense) == 13 and len(sparse) == 26
    return "\t".join([label, *dense, *sparse]) + "\n"


HEX = [f"{0x1000 * (i + 1) + 7:08x}" for i in range(26)]  # "00001007", "00002007", ...
# five hand-written impressions: all present / missing fields / negative and zero counts / uppercase hex
ROWS = [
    _line("1", ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13"], HEX),
    _line("0", [""] * 13, [""] * 26),
    _line("0", ["-3", "0", "", "100", "", "", "", "", "", "", "", "", "999999"], ["ABCDEF01"] + [""] * 25),
    _line("1", ["0"] * 13, HEX[::-1]),
    _line("0", ["7"] * 13, ["ffffffff"] * 26),
]


def _write(path: str, lines: list[str], compress: bool = False) -> str:
    data = "".join(lines).encode()
    with open(path, "wb") as f:
        f.write(gzip.compress(data, mtime=0) if compress else data)
    return path


def _f32(values: list[float]) -> list[float]:
    """As float32 values (JSON holds the shortest decimal of each float32, read back as a double)."""
    return np.asarray(values, dtype=np.float32).tolist()


def _records(url: str, split: str) -> dict[str, dict[str, Any]]:
    manifest = read_manifest(url, split)
    out = {}
    for entry in manifest.shards:
        for sample in iter_shard(join(url, entry.name), entry):
            out[sample["__key__"]] = json.loads(sample["json"])
    return out


# ---------------------------------------------------------------------------------------------- Criteo


def test_criteo_exact_records_and_splits(tmp_path: Any) -> None:
    src = _write(str(tmp_path / "day_0.tsv"), ROWS)
    out = str(tmp_path / "out")
    buckets = [11] * 25 + [1000]
    summary = convert_criteo(
        out, [src], hash_buckets=buckets, valid_fraction=0.2, test_fraction=0.2, max_samples_per_shard=2
    )
    assert summary.rows == {"train": 3, "valid": 1, "test": 1} and summary.num_rows == 5
    assert summary.positives == {"train": 1, "valid": 1, "test": 0} and summary.positive_rate == 0.4
    assert summary.skipped == {} and summary.hash_buckets == buckets

    train, valid, test = _records(out, "train"), _records(out, "valid"), _records(out, "test")
    assert sorted(train) == ["000000000000", "000000000001", "000000000002"]
    assert list(valid) == ["000000000003"] and list(test) == ["000000000004"]
    assert len(read_manifest(out, "train").shards) == 2  # 3 rows, 2 per shard

    first = train["000000000000"]
    assert first["label"] == 1
    assert _f32(first["dense"]) == _f32([math.log1p(x) for x in range(1, 14)])
    assert first["sparse"] == [1 + (0x1000 * (i + 1) + 7) % 10 for i in range(25)] + [1 + 0x1A007 % 999]
    # all missing: dense 0.0, every categorical the reserved id 0
    assert train["000000000001"] == {"label": 0, "dense": [0.0] * 13, "sparse": [0] * 26}
    # negative counts clip to 0; uppercase hex is accepted
    third = train["000000000002"]
    assert _f32(third["dense"][:4]) == _f32([0.0, 0.0, 0.0, math.log1p(100)])
    assert _f32(third["dense"][12:]) == _f32([math.log1p(999999)])
    assert third["sparse"] == [1 + 0xABCDEF01 % 10] + [0] * 25
    assert test["000000000004"]["sparse"] == [1 + 0xFFFFFFFF % 10] * 25 + [1 + 0xFFFFFFFF % 999]
    assert valid["000000000003"]["sparse"][0] == hash_categorical(int(HEX[-1], 16), 11)

    with open(os.path.join(out, "dataset.json")) as f:
        doc = json.load(f)
    assert doc["kind"] == "ctr" and doc["num_dense"] == 13 and doc["num_sparse"] == 26
    assert doc["sparse_features"] == CRITEO_SPARSE_NAMES and doc["hash_buckets"] == buckets
    assert doc["splits"]["valid"] == {"prefix": "valid", "rows": 1, "positives": 1, "positive_rate": 1.0}
    assert doc["sources"] == [src] and "log" in doc["dense_transform"]
    assert read_manifest(out, "test").meta == {"dataset": "criteo", "kind": "ctr", "split": "test"}


def test_criteo_gzip_and_multiple_files_equal_plain(tmp_path: Any) -> None:
    plain = _write(str(tmp_path / "all.tsv"), ROWS)
    a = _write(str(tmp_path / "a.tsv.gz"), ROWS[:2], compress=True)
    b = _write(str(tmp_path / "b.tsv"), ["\n"] + ROWS[2:])  # a blank line is no row
    convert_criteo(str(tmp_path / "p"), plain, hash_buckets=50)
    convert_criteo(str(tmp_path / "g"), [a, b], hash_buckets=50)
    for split in ("train", "valid", "test"):
        assert [s.sha256 for s in read_manifest(str(tmp_path / "p"), split).shards] == [
            s.sha256 for s in read_manifest(str(tmp_path / "g"), split).shards
        ]


@pytest.mark.parametrize(
    ("bad", "reason", "message"),
    [
        ("1\t2\t3\n", "field_count", r"3 tab-separated fields, expected 40"),
        (_line("2", ["1"] * 13, HEX), "bad_label", r"label '2' is not 0 or 1"),
        (_line("", ["1"] * 13, HEX), "bad_label", r"label '' is not 0 or 1"),
        (_line("0", ["1"] * 5 + ["1.5"] + ["1"] * 7, HEX), "bad_dense", r"int_5 = '1.5' is not an integer"),
        (_line("0", ["1"] * 12 + [" 7"], HEX), "bad_dense", r"int_12 = ' 7' is not an integer"),
        (_line("0", ["1"] * 13, HEX[:3] + ["xyz"] + HEX[4:]), "bad_categorical", r"cat_3 = 'xyz' is not hex"),
    ],
)
def test_criteo_bad_rows_raise_with_file_and_line_or_are_skipped(
    tmp_path: Any, bad: str, reason: str, message: str
) -> None:
    src = _write(str(tmp_path / "day.tsv"), ROWS[:2] + [bad] + ROWS[2:])
    with pytest.raises(ConversionError, match=rf"day\.tsv:3: {message}.*rerun with --on-error skip"):
        convert_criteo(str(tmp_path / "out"), [src], hash_buckets=10)
    assert not os.path.exists(tmp_path / "out" / "dataset.json")
    assert not os.path.exists(tmp_path / "out" / "train.manifest.json")

    summary = convert_criteo(
        str(tmp_path / "out"), [src], hash_buckets=10, on_error="skip", test_fraction=0.0
    )
    assert summary.skipped == {reason: 1} and summary.num_rows == 5
    # the skipped line keeps its position: the rows after it do not move
    keys = sorted(_records(str(tmp_path / "out"), "train")) + sorted(_records(str(tmp_path / "out"), "valid"))
    assert keys == ["000000000000", "000000000001", "000000000003", "000000000004", "000000000005"]
    with open(tmp_path / "out" / "dataset.json") as f:
        doc = json.load(f)
    assert doc["skipped"] == {reason: 1}
    # the skipped row is named by file and line in the summary, dataset.json and the skip log
    (example,) = summary.skipped_examples[reason]
    assert re.match(rf"{re.escape(src)}:3: {message}", example)
    assert doc["skipped_examples"] == summary.skipped_examples
    assert open(str(summary.skip_log)).read() == f"{reason}\t{example}\n"


def test_criteo_argument_errors(tmp_path: Any) -> None:
    src = _write(str(tmp_path / "d.tsv"), ROWS)
    with pytest.raises(ValueError, match=r"hash_buckets\[0\] must be an int >= 2"):
        convert_criteo(str(tmp_path / "o"), src, hash_buckets=1)
    with pytest.raises(ValueError, match="one int or 26 ints"):
        convert_criteo(str(tmp_path / "o"), src, hash_buckets=[10] * 3)
    with pytest.raises(ValueError, match="valid_fraction \\+ test_fraction must be < 1"):
        convert_criteo(str(tmp_path / "o"), src, hash_buckets=10, valid_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ConversionError, match="nowhere.tsv does not exist"):
        convert_criteo(str(tmp_path / "o"), str(tmp_path / "nowhere.tsv"), hash_buckets=10)


def test_dense_values_round_trip_as_float32() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([np.log1p(np.arange(5000)), rng.normal(0, 3, 5000), [0.0, -0.0, 1e-30, 3.4e38]])
    payload = encode_ctr_record(1, values.tolist(), [0, 5])
    record = decode_ctr_sample({"__key__": "k", "json": payload})
    assert np.array_equal(record.dense, values.astype(np.float32))
    assert record.sparse.tolist() == [0, 5] and record.label == 1
    with pytest.raises(ValueError, match="not finite"):
        encode_ctr_record(0, [float("nan")], [])


# ------------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_goes_through_the_converter(tmp_path: Any) -> None:
    kwargs = dict(rows=1500, hash_buckets=100, max_samples_per_shard=500)
    a = prepare_synthetic_ctr(str(tmp_path / "a"), seed=3, **kwargs)
    prepare_synthetic_ctr(str(tmp_path / "b"), seed=3, **kwargs)
    prepare_synthetic_ctr(str(tmp_path / "c"), seed=4, **kwargs)
    assert a.rows == {"train": 1200, "valid": 150, "test": 150} and not a.reused
    assert 0.15 < a.positive_rate < 0.35  # calibrated to 25%

    def hashes(name: str) -> list[str]:
        return [
            s.sha256
            for split in ("train", "valid", "test")
            for s in read_manifest(str(tmp_path / name), split).shards
        ]

    assert hashes("a") == hashes("b") != hashes("c")
    # the same lines through the file converter give byte-identical shards
    src = _write(str(tmp_path / "syn.tsv"), [line.decode() for line in synthetic_criteo_lines(1500, 3)])
    convert_criteo(str(tmp_path / "d"), src, hash_buckets=100, max_samples_per_shard=500)
    assert hashes("d") == hashes("a")
    # a smaller data set is a prefix of a larger one (rows are generated in fixed blocks)
    assert list(synthetic_criteo_lines(700, 3)) == list(synthetic_criteo_lines(1500, 3))[:700]
    # complete output with the same settings is reused; other settings are refused
    assert prepare_synthetic_ctr(str(tmp_path / "a"), seed=3, **kwargs).reused
    # a split whose manifest is missing is written again, not "reused" (rerunning repairs it)
    os.remove(tmp_path / "a" / "valid.manifest.json")
    repaired = prepare_synthetic_ctr(str(tmp_path / "a"), seed=3, **kwargs)
    assert not repaired.reused and hashes("a") == hashes("b")
    with pytest.raises(ValueError, match=r"seed=3 \(asked 5\)"):
        prepare_synthetic_ctr(str(tmp_path / "a"), seed=5, **kwargs)


def test_synthetic_structure_is_learnable(tmp_path: Any) -> None:
    """A logistic regression on hashed one-hot + dense features, fitted with torch, ranks the held-out
    clicks far better than chance (the main and dense effects; the interactions are DLRM's to find)."""
    out = str(tmp_path / "syn")
    buckets = 200
    prepare_synthetic_ctr(
        out, rows=8000, seed=0, hash_buckets=buckets, test_fraction=0.25, valid_fraction=0.0
    )
    (train,) = iter_ctr_batches(out, "train", batch_size=10_000)
    (test,) = iter_ctr_batches(out, "test", batch_size=10_000)
    assert train.dense.shape == (6000, 13) and test.sparse.shape == (2000, 26)

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small problem: more threads only contend with other jobs
    offsets = torch.arange(26) * buckets
    weights = torch.zeros(26 * buckets, 1, requires_grad=True)  # one weight per (feature, bucket)
    slopes = torch.zeros(13, requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)

    def logits(batch: Any) -> torch.Tensor:
        # embedding_bag sums the 26 one-hot weights of a row; its backward is much cheaper than indexing's
        hot = torch.nn.functional.embedding_bag(batch.sparse + offsets, weights, mode="sum").squeeze(-1)
        return hot + batch.dense @ slopes + bias

    opt = torch.optim.Adam([weights, slopes, bias], lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(train), train.labels)
        (loss + 1e-3 * weights.square().sum()).backward()
        opt.step()
    with torch.no_grad():
        auc = roc_auc(logits(test), test.labels)
    torch.set_num_threads(threads)
    assert auc > 0.65, auc  # 0.697 at the time of writing; a DLRM gets ~0.80 on 50k rows


# ------------------------------------------------------------------------------------------------ reader


def test_reader_batches_kjt_and_stream(tmp_path: Any) -> None:
    out = str(tmp_path / "syn")
    prepare_synthetic_ctr(
        out, rows=300, seed=1, hash_buckets=[5 + i for i in range(26)], max_samples_per_shard=100
    )
    dataset = CTRDataset.open(out)
    assert dataset.rows == {"train": 240, "valid": 30, "test": 30}
    assert dataset.hash_buckets[3] == 8 and dataset.sparse_features[3] == "cat_3"

    batches = list(iter_ctr_batches(out, "train", batch_size=64))
    assert [len(b.labels) for b in batches] == [64, 64, 64, 48]
    assert len(list(iter_ctr_batches(out, "train", batch_size=64, drop_last=True))) == 3
    first = batches[0]
    assert first.dense.dtype == torch.float32 and first.sparse.dtype == torch.int64
    assert first.labels.dtype == torch.float32 and set(first.labels.tolist()) <= {0.0, 1.0}
    assert (first.sparse < torch.tensor(dataset.hash_buckets)).all() and (first.sparse >= 0).all()
    kjt = ids_to_kjt(first.sparse, dataset.sparse_features)
    assert kjt.keys() == dataset.sparse_features and torch.equal(kjt["cat_2"].values(), first.sparse[:, 2])

    records = list(iter_ctr_samples(out, "train"))
    assert np.array_equal(records[0].dense, first.dense[0].numpy())
    # the training path: a ShardStream slot of a split, decoded sample by sample
    stream = ShardStream(out, "train", rank=1, world_size=2, shuffle=False)
    from_stream = [decode_ctr_sample(s) for s in stream.iter_epoch()]
    assert [r.label for r in from_stream] == [r.label for r in records[100:200]]
    with pytest.raises(ValueError, match="split must be one of"):
        list(iter_ctr_samples(out, "dev"))
    # evaluation reads: rank r of R takes shards r, r+R, ...; together the ranks read the split once
    per_rank = [list(iter_ctr_samples(out, "train", rank=r, world_size=2)) for r in range(2)]
    assert [len(p) for p in per_rank] == [140, 100]  # shards of 100, 100, 40: 0 and 2 to rank 0
    as_bytes = [(r.label, r.dense.tobytes(), r.sparse.tobytes()) for r in records]
    read = per_rank[0][:100] + per_rank[1] + per_rank[0][100:]
    assert [(r.label, r.dense.tobytes(), r.sparse.tobytes()) for r in read] == as_bytes
    assert [s.samples for s in split_shards(out, "train", rank=1, world_size=2)] == [100]
    assert split_shards(out, "valid", rank=1, world_size=2) == []  # one shard: rank 1 has none
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        split_shards(out, "train", rank=2, world_size=2)


def test_ctr_dataset_open_errors(tmp_path: Any) -> None:
    with pytest.raises(FileNotFoundError, match="dataset.json is missing"):
        CTRDataset.open(str(tmp_path))
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "ml"}))
    with pytest.raises(ValueError, match="not a CTR one"):
        CTRDataset.open(str(tmp_path))


# ------------------------------------------------------------------------------------------- Open Bandit


def _require_obp() -> None:
    # scripts/setup_venv.sh installs it; a missing package is a failed test, not a skipped one
    assert importlib.util.find_spec("obp") is not None, "obp is missing: run `bash scripts/setup_venv.sh`"


@pytest.mark.parametrize(("policy", "campaign"), [("random", "all"), ("bts", "women")])
def test_obp_conversion(tmp_path: Any, policy: str, campaign: str) -> None:
    _require_obp()
    from data_pipeline.obp import OBP_DENSE_NAMES, OBP_SPARSE_NAMES, convert_obp

    out = str(tmp_path / "obp")
    summary = convert_obp(out, policy=policy, campaign=campaign)
    assert summary.num_rows == 10_000 and summary.rows == {"train": 8000, "valid": 1000, "test": 1000}
    clicks = sum(summary.positives.values())
    assert 0.002 < summary.positive_rate < 0.02 and clicks == round(summary.positive_rate * 10_000)
    dataset = CTRDataset.open(out)
    assert dataset.dense_features == OBP_DENSE_NAMES and dataset.sparse_features == OBP_SPARSE_NAMES
    records = [r for split in ("train", "valid", "test") for r in iter_ctr_samples(out, split)]
    assert len(records) == 10_000 and sum(r.label for r in records) == clicks
    ids = np.stack([r.sparse for r in records])
    assert (ids >= 1).all() and (ids < np.array(dataset.hash_buckets)).all()  # nothing missing in OBD
    assert set(ids[:, 1].tolist()) == {1, 2, 3}  # position
    assert ids[:, -1].min() >= 1 and ids[:, -1].max() <= 7  # weekday
    dense = np.stack([r.dense for r in records])
    assert np.isfinite(dense).all() and dense[:, 1:].min() >= 0.0
    vocab = dataset.meta["obp"]["vocabularies"]
    assert len(vocab["user_feature_0"]) + 1 == dataset.hash_buckets[2]


def test_obp_all_six_logs_in_one_data_set(tmp_path: Any) -> None:
    """Both policies x the three campaigns: every log split on its own, items namespaced by campaign."""
    _require_obp()
    from data_pipeline.obp import OBP_CAMPAIGNS, OBP_POLICIES, OBP_SPARSE_NAMES, convert_obp

    out = str(tmp_path / "obp")
    summary = convert_obp(out, policy=OBP_POLICIES, campaign=OBP_CAMPAIGNS)
    assert summary.num_rows == 60_000 and summary.rows == {"train": 48_000, "valid": 6000, "test": 6000}
    dataset = CTRDataset.open(out)
    assert dataset.sparse_features == [*OBP_SPARSE_NAMES, "policy", "campaign"]
    meta = dataset.meta["obp"]
    assert meta["logs"] == [f"{p}/{c}" for p in OBP_POLICIES for c in OBP_CAMPAIGNS]
    assert len(dataset.meta["sources"]) == 12
    policy_col, campaign_col = len(OBP_SPARSE_NAMES), len(OBP_SPARSE_NAMES) + 1
    items_of: dict[int, set[int]] = {}
    for split, rows_per_log in (("train", 8000), ("valid", 1000), ("test", 1000)):
        ids = np.stack([r.sparse for r in iter_ctr_samples(out, split)])
        assert (ids >= 1).all() and (ids < np.array(dataset.hash_buckets)).all()
        logs, counts = np.unique(ids[:, [policy_col, campaign_col]], axis=0, return_counts=True)
        assert len(logs) == 6 and (counts == rows_per_log).all(), (
            split,
            logs,
            counts,
        )  # every log, its share
        for campaign in (1, 2, 3):
            items_of.setdefault(campaign, set()).update(ids[ids[:, campaign_col] == campaign, 0].tolist())
    # no item id shared between campaigns; the sizes of the campaigns' item_context.csv (80, 34, 46)
    assert not (items_of[1] & items_of[2] or items_of[1] & items_of[3] or items_of[2] & items_of[3])
    assert meta["item_id_offsets"] == {"all": 0, "men": 80, "women": 114}
    assert dataset.hash_buckets[0] == 80 + 34 + 46 + 1
    assert max(items_of[1]) <= 80 < min(items_of[2]) and max(items_of[2]) <= 114 < min(items_of[3])
    # the single-log conversion of random/men gives the same item, shifted by the campaign's offset
    one = str(tmp_path / "men")
    convert_obp(one, policy="random", campaign="men")
    men_items = {r.sparse[0] for r in iter_ctr_samples(one, "train")}
    assert {i + 80 for i in men_items} <= items_of[2]


def test_obp_argument_errors(tmp_path: Any) -> None:
    from data_pipeline.obp import convert_obp

    with pytest.raises(ValueError, match="policy must be one of"):
        convert_obp(str(tmp_path), policy="greedy")
    with pytest.raises(ValueError, match="campaign must be one of"):
        convert_obp(str(tmp_path), campaign="kids")
    with pytest.raises(ValueError, match="campaign must be one of .* got 'kids'"):
        convert_obp(str(tmp_path), campaign=["all", "kids"])
    with pytest.raises(ValueError, match=r"policy: give each of .* at most once .* \['random', 'random'\]"):
        convert_obp(str(tmp_path), policy=["random", "random"])
    with pytest.raises(ValueError, match="campaign: give each of .* at least one"):
        convert_obp(str(tmp_path), campaign=[])
    assert not list(tmp_path.iterdir())  # nothing written


# ------------------------------------------------------------------------ synthetic: higher-order terms


def _logistic_regression_gain(draw: dict, signal: str) -> float:
    """Held-out AUC gained by adding ``draw[signal]`` to a logistic regression on one-hot values and
    standardised dense counts (full batch, Adam; first 15,000 rows to fit, the rest to test). The gradient
    of the one-hot part is a weighted bincount, written out: autograd through embedding_bag took 30x longer."""
    index = torch.from_numpy(draw["values"] + 1) + torch.arange(draw["values"].shape[1]) * 102  # 0: missing
    dense = torch.from_numpy(np.log1p(np.maximum(draw["counts"], 0))).float()
    dense = (dense - dense.mean(0)) / dense.std(0)
    extra = torch.from_numpy(draw[signal]).float().unsqueeze(1)
    labels = torch.from_numpy(draw["labels"]).float()
    fit, held = slice(0, 15_000), slice(15_000, None)
    aucs = []
    for columns in (dense, torch.cat([dense, extra], dim=1)):
        weights = torch.zeros(index.shape[1] * 102)
        slopes = torch.zeros(columns.shape[1])
        bias = torch.zeros(1)

        def logits(rows: slice, weights=weights, columns=columns, slopes=slopes, bias=bias) -> torch.Tensor:  # noqa: ANN001
            return weights[index[rows]].sum(1) + columns[rows] @ slopes + bias

        opt = torch.optim.Adam([weights, slopes, bias], lr=0.05)
        n = fit.stop
        for _ in range(150):
            residual = (torch.sigmoid(logits(fit)) - labels[fit]) / n  # d(mean BCE)/d(logit)
            weights.grad = (
                torch.bincount(
                    index[fit].reshape(-1), residual.repeat_interleave(index.shape[1]), weights.numel()
                ).float()
                + 2e-4 * weights
            )
            slopes.grad = columns[fit].T @ residual
            bias.grad = residual.sum().reshape(1)
            opt.step()
        aucs.append(roc_auc(logits(held), labels[held]))
    return aucs[1] - aucs[0]


def test_higher_order_terms_are_off_by_default_and_move_the_clicks_when_on(tmp_path: Any) -> None:
    """Off, the lines are those of earlier versions (checksum recorded before the terms existed); on,
    the click depends on the third-order indicator and on the element-level cross term: a logistic
    regression gains held-out AUC from each signal when its term is on, and nothing when it is off."""
    lines = b"".join(synthetic_criteo_lines(5000, 3))
    assert hashlib.sha256(lines).hexdigest() == (
        "cb1ee7e4f0a0d5e2ff818da52d87ddedd270c8b08bb07e98eccde83e3497aa27"
    )
    assert b"".join(synthetic_criteo_lines(5000, 3, third_order=1.0)) != lines
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        off = synthetic_ctr_draw(20_000, 0)
        third = synthetic_ctr_draw(20_000, 0, third_order=1.5)
        element = synthetic_ctr_draw(20_000, 0, element_cross=2.5)
        assert np.array_equal(off["values"], third["values"])  # the same impressions, other clicks
        gains = {
            "third off": _logistic_regression_gain(off, "triple_indicator"),
            "third on": _logistic_regression_gain(third, "triple_indicator"),
            "element off": _logistic_regression_gain(off, "element_term"),
            "element on": _logistic_regression_gain(element, "element_term"),
        }
    finally:
        torch.set_num_threads(threads)
    print({k: round(v, 4) for k, v in gains.items()})
    assert gains["third on"] > 0.05 and abs(gains["third off"]) < 0.01
    assert gains["element on"] > 0.03 and abs(gains["element off"]) < 0.01


def test_the_cli_writes_the_higher_order_data_and_records_the_strengths(tmp_path: Any) -> None:
    from trainer.cli import main

    out = str(tmp_path / "higher")
    args = [
        "data",
        "prepare-synthetic-ctr",
        out,
        "--rows",
        "1000",
        "--third-order",
        "1.5",
        "--element-cross",
        "1",
    ]
    assert main(args) == 0
    generator = CTRDataset.open(out).meta["generator"]
    assert generator["third_order"] == 1.5 and generator["element_cross"] == 1.0
    prepare_synthetic_ctr(str(tmp_path / "plain"), rows=1000)
    assert "third_order" not in CTRDataset.open(str(tmp_path / "plain")).meta["generator"]
    with pytest.raises(ValueError, match="third_order must be a finite number >= 0"):
        next(synthetic_criteo_lines(10, 0, third_order=-1.0))
