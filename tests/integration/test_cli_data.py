"""`fmrl data ...`: the command line reaches the writers, and bad input is a clear exit-2 error."""

from __future__ import annotations

import json

import pytest

from data_pipeline.shards import read_manifest
from trainer.cli import main


def test_convert_movielens_from_the_command_line(tmp_path, capsys):
    out = str(tmp_path / "ml")
    assert main(["data", "convert-movielens", out, "--shard-size", "400"]) == 0
    dataset = json.loads((tmp_path / "ml" / "dataset.json").read_text())
    assert dataset["num_users"] == 943 and dataset["num_items"] > 1000
    manifest = read_manifest(out, "items")
    assert manifest.total_samples == dataset["num_items"]
    assert all(entry.samples <= 400 for entry in manifest.shards) and len(manifest.shards) >= 3
    out = capsys.readouterr().out
    assert out.startswith("data set ml-100k written\n") and "ConversionSummary" not in out
    assert f"  users         {dataset['num_users']:,}\n" in out


def test_missing_input_is_a_clear_error(tmp_path, capsys):
    missing = str(tmp_path / "reviews_Beauty_5.json.gz")
    code = main(["data", "convert-amazon", str(tmp_path / "out"), "--reviews", missing, "--meta", missing])
    assert code == 2
    assert "reviews_Beauty_5.json.gz" in capsys.readouterr().err
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_ctr_data_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "ctr"
    assert main(["data", "prepare-synthetic-ctr", str(out), "--rows", "2000", "--shard-size", "500"]) == 0
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["kind"] == "ctr" and len(dataset["hash_buckets"]) == 26
    # the same rows as TSV go through convert-criteo; OBP's click logs come from the obp wheel
    tsv = tmp_path / "day.tsv"
    tsv.write_text("1\t5\t\t3" + "\t" * 10 + "\t68fd1e64" * 26 + "\n0" + "\t" * 13 + "\t" * 26 + "\n")
    assert main(["data", "convert-criteo", str(tmp_path / "c"), str(tsv), "--hash-buckets", "7"]) == 0
    assert main(["data", "convert-criteo", str(tmp_path / "bad"), str(tsv), "--hash-buckets", "7,7"]) == 2
    assert "26" in capsys.readouterr().err
    assert main(["data", "convert-obp", str(tmp_path / "obp"), "--campaign", "men"]) == 0
    assert json.loads((tmp_path / "obp" / "dataset.json").read_text())["kind"] == "ctr"
    # several logs in one data set; a log named twice is an error
    assert (
        main(["data", "convert-obp", str(tmp_path / "two"), "--policy", "random", "bts", "--campaign", "men"])
        == 0
    )
    assert json.loads((tmp_path / "two" / "dataset.json").read_text())["obp"]["logs"] == [
        "random/men",
        "bts/men",
    ]
    capsys.readouterr()
    assert main(["data", "convert-obp", str(tmp_path / "bad-obp"), "--policy", "bts", "bts"]) == 2
    assert "policy: give each of" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["prepare-synthetic", "--num-items", "1"], "--num-items must be >= 2, got 1"),
        (["prepare-synthetic", "--shard-size", "0"], "--shard-size must be >= 1, got 0"),
        (["prepare-synthetic-ctr", "--max-cardinality", "0"], "--max-cardinality must be >= 3, got 0"),
    ],
)
def test_a_bad_option_is_named_as_typed(tmp_path, capsys, command, message):
    """The writers name their Python arguments (num_items, max_samples_per_shard); the user typed flags."""
    code = main(["data", command[0], str(tmp_path / "out"), *command[1:]])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"fmrl data {command[0]}: error: {message}"
