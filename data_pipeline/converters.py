"""Convert real recommendation data sets into the trainer's shard layout (local or S3).

Four sources, one output format::

    from data_pipeline.converters import convert_amazon, convert_movielens, convert_p5, convert_seqrec
    convert_movielens("data/ml-100k")  # needs: pip install --no-deps recbole==1.2.1
    convert_amazon("s3://bucket/beauty", "reviews_Beauty_5.json.gz", "meta_Beauty.json.gz", images_dir="photos")
    convert_p5("data/beauty-p5", "VIP5/data/beauty", images_dir="VIP5/photos/beauty")
    convert_seqrec("data/beauty", "Beauty.txt", attributes_path="Beauty_item2attributes.json")

Sources:

* **MovieLens-100k** as shipped inside the ``recbole==1.2.1`` wheel (RecBole "atomic" TSVs whose header
  cells are ``name:type``). Only the data files are used: recbole itself is never imported, as its own
  dependencies are heavy and pinned. Items are text-only: ``"Title: ...\\nYear: ...\\nGenres: ..."``.
* **Amazon 2014** (McAuley et al.): ``reviews_<Category>_5.json.gz`` (one JSON object per line) and
  ``meta_<Category>.json.gz``, whose lines are *Python literals* (single quotes), not JSON. The paper's
  code parses them with ``eval``; we use :func:`ast.literal_eval`, which accepts only literals, so a
  line such as ``__import__('os').system(...)`` is a malformed record, never executed. Item text is the
  paper's: ``"Title: {title}\\nPrice: {price}\\nBrand: {brand}\\nCategories: {cats}"`` with only the first
  category path, missing fields omitted, ``"Untitled Item"`` if all are missing. Items without metadata
  are dropped, as in the paper; the image is ``images_dir/<basename of imUrl>``.
* **P5 / VIP5 preprocessed** folders (what the fMRLRec code reads): ``datamaps.json``,
  ``sequential_data.txt`` (``user i1 i2 ...``, 1-indexed, already chronological), ``meta.json.gz``
  (Python literals) and the item-to-photo map. VIP5 ships that map as ``item2img_dict.pkl``; unpickling
  runs arbitrary code, so only a JSON copy (``item2img.json``: asin -> ``"<folder>/<file>"``) is read.

* **The plain sequential-recommendation format** of the SASRec / S3-Rec / FMLP-Rec / LRURec releases:
  ``user item item ...`` per line (whitespace-separated integer ids, items chronological), optionally with
  S3-Rec's attribute file ``{"item": [attribute, ...]}`` (brand and category ids). Items carry no text;
  their attribute ids (made dense, 1..A) are stored in the item records for the model's attribute table.

Every source gets chronological sequences and k-core filtering (users and items with at least
``min_interactions`` interactions, 5 in the paper) iterated to a fixed point, since dropping an item can
push a user below k and vice versa. Item ids are then assigned densely as 1..N (0 stays the padding id).

Output under ``out_url``:

* ``items-*.tar`` + ``items.manifest.json``: one sample per item, key ``f"{item_id:09d}"``, members
  ``json`` (``{"item_id", "source_id", "text", "title", ...raw fields}``) and ``jpg``/``png`` when the
  item has an image;
* ``users-*.tar`` + ``users.manifest.json``: one sample per user, key ``f"{user_index:09d}"``, member
  ``json`` = ``{"user_id": str, "items": [dense item ids, chronological]}``. The leave-one-out split
  (last item test, second-to-last validation) is applied by the reader, so it is recorded, not done;
* ``item_attributes.{offsets,values}.npy`` (convert-seqrec with attributes): the items' attribute bags
  as arrays, named in ``dataset.json`` (data_pipeline/item_index.py);
* ``dataset.json``, written last: its existence means both shard sets are complete.

Bad input (malformed JSON line or metadata literal, a missing required field, an unknown item id or an
empty sequence in ``sequential_data.txt``, an undecodable image) raises :class:`ConversionError` naming the
file and line or record. With ``on_error="skip"`` such records are skipped instead and counted by reason
in the summary, the manifests' meta and ``dataset.json``. Items without metadata or without an image are
not errors: they are always counted (``no_metadata``, ``no_image``).
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import io
import json
import os
import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image

from data_pipeline.item_index import INDEX_KEY, write_attribute_index
from data_pipeline.shards import ShardWriter
from data_pipeline.storage import StorageNotFoundError, StorageOptions, atomic_write, join, open_read

__all__ = [
    "AMAZON_TEXT_TEMPLATE",
    "MOVIELENS_TEXT_TEMPLATE",
    "ConversionError",
    "ConversionSummary",
    "OnError",
    "convert_amazon",
    "convert_movielens",
    "convert_p5",
    "convert_seqrec",
]

AMAZON_TEXT_TEMPLATE = "Title: {title}\nPrice: {price}\nBrand: {brand}\nCategories: {categories}"
MOVIELENS_TEXT_TEMPLATE = "Title: {title}\nYear: {year}\nGenres: {genres}"
UNTITLED = "Untitled Item"
SPLIT = "leave-one-out"

OnError = Literal["raise", "skip"]

_RECBOLE_HINT = "pip install --no-deps recbole==1.2.1"


class ConversionError(ValueError):
    """The input cannot be converted; the message names the file and the line or record."""


@dataclass(frozen=True)
class ConversionSummary:
    """What a converter wrote (the same numbers as ``dataset.json``)."""

    name: str
    out_url: str
    num_items: int
    num_users: int
    num_interactions: int
    num_images: int
    skipped: dict[str, int] = field(default_factory=dict)
    """Records skipped or filtered, by reason (e.g. ``malformed_json``, ``no_metadata``, ``kcore_users``)."""
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    """The first few skipped records per reason, each as ``file:line: what is wrong``."""
    skip_log: str | None = None
    """Where every skipped record is listed (``<out_url>/skipped.log``), if any was skipped."""


@dataclass
class _Item:
    source_id: str
    text: str
    title: str
    raw: dict[str, Any]
    image_url: str | None = None  # where to read the image from, if any
    wants_image: bool = False  # images were asked for: a missing one is counted


class RowProblems:
    """Raise on bad records, or (``on_error="skip"``) count them by reason and keep where they are: the
    first :attr:`EXAMPLES` per reason for the summary, every one for the skip log."""

    EXAMPLES = 3
    LOG_LIMIT = 1_000_000
    """Skipped records kept for the log; beyond it the log says how many more there were."""

    def __init__(self, on_error: OnError) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.messages: list[str] = []

    def bad(self, reason: str, message: str) -> None:
        """A bad record; ``message`` names it (``file:line: what is wrong``)."""
        if self.on_error == "raise":
            raise ConversionError(f"{message} (rerun with --on-error skip to skip and count such records)")
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.EXAMPLES:
            examples.append(message)
        if len(self.messages) < self.LOG_LIMIT:
            self.messages.append(f"{reason}\t{message}")

    def write_log(self, out_url: str, options: StorageOptions | None) -> str | None:
        """Write every skipped record to ``<out_url>/skipped.log`` (reason, tab, place and problem per
        line); returns its URL, or None when nothing was skipped."""
        total = sum(self.counts[reason] for reason in self.examples)
        if not total:
            return None
        lines = list(self.messages)
        if total > len(lines):
            lines.append(f"... and {total - len(lines)} more skipped records (not listed)")
        url = join(out_url, "skipped.log")
        with atomic_write(url, options) as f:
            f.write(("\n".join(lines) + "\n").encode())
        return url

    def note(self, reason: str, n: int = 1) -> None:
        """Count something that is never an error (items without metadata, k-core removals)."""
        if n:
            self.counts[reason] += n


# ---------------------------------------------------------------------------------------------- MovieLens


def convert_movielens(
    out_url: str,
    source_dir: str | None = None,
    max_samples_per_shard: int = 1000,
    min_interactions: int = 5,
    options: StorageOptions | None = None,
) -> ConversionSummary:
    """Convert MovieLens-100k (``ml-100k.inter`` / ``ml-100k.item``) to shards under ``out_url``.

    ``source_dir`` defaults to the copy inside the installed ``recbole`` package, located without
    importing it. All interactions count as implicit feedback (ratings are not thresholded).
    """
    if source_dir is None:
        source_dir = _recbole_ml100k_dir()
    inter_url, item_url = join(source_dir, "ml-100k.inter"), join(source_dir, "ml-100k.item")
    problems = RowProblems("raise")  # a packaged file has no bad records to skip; anything odd is a bug

    rows = _read_atomic(inter_url, ("user_id", "item_id", "timestamp"), options)
    events: dict[str, list[tuple[float, int, str]]] = {}
    for order, (lineno, row) in enumerate(rows):
        try:
            ts = float(row["timestamp"])
        except ValueError as e:
            raise ConversionError(f"{inter_url}:{lineno}: bad timestamp {row['timestamp']!r}") from e
        events.setdefault(row["user_id"], []).append((ts, order, row["item_id"]))

    catalog: dict[str, dict[str, str]] = {}
    for _, row in _read_atomic(item_url, ("item_id",), options):
        catalog[row["item_id"]] = row

    sequences = {user: [item for _, _, item in sorted(evs)] for user, evs in events.items()}
    sequences = _k_core(sequences, min_interactions, problems)

    items: dict[str, _Item] = {}
    for source_id in _sorted_ids({i for seq in sequences.values() for i in seq}):
        row = catalog.get(source_id, {})
        title, year = row.get("movie_title", "").strip(), row.get("release_year", "").strip()
        # RecBole token_seq: space-separated tokens ("Animation Children's Comedy")
        genres = ", ".join(row.get("class", "").split())
        text = _render({"Title": title, "Year": year, "Genres": genres})
        raw = {"movie_title": title, "release_year": year, "genres": genres}
        items[source_id] = _Item(source_id=source_id, text=text, title=title, raw=raw)
    return _write_dataset(
        out_url,
        "ml-100k",
        items,
        sequences,
        problems,
        MOVIELENS_TEXT_TEMPLATE,
        max_samples_per_shard,
        options,
    )


def _recbole_ml100k_dir() -> str:
    # find_spec on the top-level name reads no code from the package: its __init__ is never executed
    spec = importlib.util.find_spec("recbole")
    if spec is None or spec.origin is None:
        raise ConversionError(
            f"MovieLens-100k is read from the recbole wheel, which is not installed: {_RECBOLE_HINT}"
        )
    folder = os.path.join(os.path.dirname(spec.origin), "dataset_example", "ml-100k")
    if not os.path.isfile(os.path.join(folder, "ml-100k.inter")):
        raise ConversionError(f"no MovieLens-100k files in {folder}: reinstall with {_RECBOLE_HINT}")
    return folder


def _read_atomic(
    url: str, required: tuple[str, ...], options: StorageOptions | None
) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a RecBole atomic file (TSV, header cells ``name:type``) as ``(line number, {name: value})``."""
    lines = iter_text_lines(url, options, hint=_RECBOLE_HINT)
    try:
        _, header = next(lines)
    except StopIteration:
        raise ConversionError(f"{url}: empty file, expected a RecBole header line") from None
    names = [cell.split(":", 1)[0] for cell in header.decode("utf-8").rstrip("\r\n").split("\t")]
    missing = [name for name in required if name not in names]
    if missing:
        raise ConversionError(f"{url}:1: header {names} lacks column(s) {missing}")
    for lineno, line in lines:
        text = line.decode("utf-8").rstrip("\r\n")
        if not text:
            continue
        cells = text.split("\t")
        if len(cells) != len(names):
            raise ConversionError(f"{url}:{lineno}: {len(cells)} columns, the header has {len(names)}")
        yield lineno, dict(zip(names, cells))


# ------------------------------------------------------------------------------------------- Amazon 2014


def convert_amazon(
    out_url: str,
    reviews_path: str,
    meta_path: str,
    images_dir: str | None = None,
    max_samples_per_shard: int = 1000,
    min_interactions: int = 5,
    on_error: OnError = "raise",
    name: str | None = None,
    options: StorageOptions | None = None,
) -> ConversionSummary:
    """Convert Amazon 2014 review + metadata files to shards under ``out_url``.

    Interactions are ``(reviewerID, asin, unixReviewTime)``; each user's are sorted by time with ties kept
    in file order. Items without a metadata record are dropped before k-core filtering.
    """
    problems = RowProblems(on_error)
    events: dict[str, list[tuple[int, int, str]]] = {}
    order = 0
    for lineno, line in iter_text_lines(reviews_path, options):
        where = f"{reviews_path}:{lineno}"
        try:
            review = json.loads(line)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            problems.bad("malformed_json", f"{where}: malformed JSON line: {e}")
            continue
        fields = _required(review, ("reviewerID", "asin", "unixReviewTime"), where, problems)
        if fields is None:
            continue
        user, asin, ts = fields
        try:
            ts = int(ts)
        except (TypeError, ValueError):
            problems.bad("missing_field", f"{where}: unixReviewTime {ts!r} is not an integer")
            continue
        events.setdefault(str(user), []).append((ts, order, str(asin)))
        order += 1

    wanted = {asin for evs in events.values() for _, _, asin in evs}
    meta = _read_metadata(meta_path, wanted, problems, options)
    problems.note("no_metadata", len(wanted - meta.keys()))

    sequences = {user: [asin for _, _, asin in sorted(evs) if asin in meta] for user, evs in events.items()}
    sequences = _k_core(sequences, min_interactions, problems)
    items = {
        asin: _amazon_item(asin, meta[asin], images_dir, _basename(meta[asin].get("imUrl")))
        for asin in sorted({a for seq in sequences.values() for a in seq})
    }
    name = name or _amazon_name(reviews_path)
    return _write_dataset(
        out_url, name, items, sequences, problems, AMAZON_TEXT_TEMPLATE, max_samples_per_shard, options
    )


def _amazon_name(reviews_path: str) -> str:
    base = posixpath.basename(reviews_path.rstrip("/"))
    for prefix, suffix in (("reviews_", ".json.gz"), ("reviews_", ".json")):
        if base.startswith(prefix) and base.endswith(suffix):
            base = base[len(prefix) : -len(suffix)]
            return base.removesuffix("_5")
    return base


def _required(
    record: Any, keys: tuple[str, ...], where: str, problems: RowProblems
) -> tuple[Any, ...] | None:
    if not isinstance(record, dict):
        problems.bad("malformed_json", f"{where}: expected an object, got {type(record).__name__}")
        return None
    missing = [k for k in keys if record.get(k) in (None, "")]
    if missing:
        problems.bad("missing_field", f"{where}: missing required field(s) {missing}")
        return None
    return tuple(record[k] for k in keys)


def _read_metadata(
    url: str, wanted: set[str] | None, problems: RowProblems, options: StorageOptions | None
) -> dict[str, dict[str, Any]]:
    """asin -> metadata record for the asins in ``wanted`` (all if None), from a Python-literal file."""
    meta: dict[str, dict[str, Any]] = {}
    for lineno, line in iter_text_lines(url, options):
        where = f"{url}:{lineno}"
        try:
            # literal_eval, never eval: the paper's code evals these lines, which runs any code in them
            record = ast.literal_eval(line.decode("utf-8").strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
            problems.bad("malformed_metadata", f"{where}: malformed metadata literal: {_literal_problem(e)}")
            continue
        if not isinstance(record, dict):
            problems.bad(
                "malformed_metadata", f"{where}: expected a dict literal, got {type(record).__name__}"
            )
            continue
        fields = _required(record, ("asin",), where, problems)
        if fields is None:
            continue
        asin = str(fields[0])
        if wanted is None or asin in wanted:
            meta[asin] = record
    return meta


def _literal_problem(error: Exception) -> str:
    """What ``ast.literal_eval`` found wrong with a line, in plain words: its ValueError shows the repr
    of a syntax tree node (``<ast.Call object at 0x...>``)."""
    if isinstance(error, SyntaxError):
        return f"not a Python literal ({error.msg})"
    if isinstance(error, ValueError):
        return "it holds something other than plain values (strings, numbers, lists, dicts), e.g. a name or a call"
    return f"too large or too deeply nested ({type(error).__name__})"


def _amazon_item(asin: str, record: dict[str, Any], images_dir: str | None, image_name: str | None) -> _Item:
    # the paper's process_attr: a list becomes ', '.join(attr[0]) (the first category path), numbers str()
    parts = {
        label: _attr(record[key])
        for label, key in (
            ("Title", "title"),
            ("Price", "price"),
            ("Brand", "brand"),
            ("Categories", "categories"),
        )
        if record.get(key) is not None
    }
    image_url = join(images_dir, image_name) if images_dir is not None and image_name else None
    title = str(record.get("title") or "")
    return _Item(
        source_id=asin,
        text=_render(parts),
        title=title,
        raw=record,
        image_url=image_url,
        wants_image=images_dir is not None,
    )


def _attr(value: Any) -> str:
    if isinstance(value, list | tuple):
        first = value[0] if value else []
        return (
            ", ".join(str(v) for v in first)
            if isinstance(first, list | tuple)
            else ", ".join(map(str, value))
        )
    return str(value)


def _basename(url: Any) -> str | None:
    if not isinstance(url, str) or not url:
        return None
    return posixpath.basename(url.split("?", 1)[0]) or None


# ------------------------------------------------------------------------------------------------ P5 / VIP5


def convert_p5(
    out_url: str,
    data_dir: str,
    images_dir: str | None = None,
    max_samples_per_shard: int = 1000,
    min_interactions: int = 5,
    on_error: OnError = "raise",
    name: str | None = None,
    options: StorageOptions | None = None,
) -> ConversionSummary:
    """Convert a P5/VIP5 preprocessed folder to shards under ``out_url``.

    Sequences are taken as they are (P5 already sorted them by time). Items without metadata are dropped
    and k-core filtering is re-applied, since the drop can break P5's 5-core. With ``images_dir`` the
    photo of each item is ``images_dir/<file>`` for ``item2img.json``'s ``"<folder>/<file>"``.
    """
    problems = RowProblems(on_error)
    datamaps_url = join(data_dir, "datamaps.json")
    with _open(datamaps_url, options) as f:
        try:
            datamaps = json.loads(f.read())
            id2item = {str(k): str(v) for k, v in datamaps["id2item"].items()}
            id2user = {str(v): str(k) for k, v in datamaps.get("user2id", {}).items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConversionError(f"{datamaps_url}: malformed datamaps ({type(e).__name__}: {e})") from e

    image_map = _p5_image_map(data_dir, options) if images_dir is not None else {}

    seq_url = join(data_dir, "sequential_data.txt")
    sequences: dict[str, list[str]] = {}
    for lineno, line in iter_text_lines(seq_url, options):
        tokens = line.decode("utf-8", errors="replace").split()
        if not tokens:
            continue  # a blank line is no record
        where = f"{seq_url}:{lineno}"
        if len(tokens) == 1:
            problems.bad("empty_sequence", f"{where}: user {tokens[0]} has an empty sequence")
            continue
        seq = []
        for token in tokens[1:]:
            if token not in id2item:
                problems.bad("unknown_item", f"{where}: unknown item id {token!r} (not in datamaps id2item)")
                continue
            seq.append(id2item[token])
        sequences[id2user.get(tokens[0], tokens[0])] = seq

    wanted = {asin for seq in sequences.values() for asin in seq}
    meta = _read_metadata(join(data_dir, "meta.json.gz"), wanted, problems, options)
    problems.note("no_metadata", len(wanted - meta.keys()))
    sequences = {user: [a for a in seq if a in meta] for user, seq in sequences.items()}
    sequences = _k_core(sequences, min_interactions, problems)

    item_to_p5 = {asin: int(i) if i.isdigit() else 0 for i, asin in id2item.items()}
    items = {
        asin: _amazon_item(asin, meta[asin], images_dir, _basename(image_map.get(asin)))
        # dense ids keep P5's item order
        for asin in sorted({a for seq in sequences.values() for a in seq}, key=lambda a: (item_to_p5[a], a))
    }
    name = name or posixpath.basename(data_dir.rstrip("/")) or "p5"
    return _write_dataset(
        out_url, name, items, sequences, problems, AMAZON_TEXT_TEMPLATE, max_samples_per_shard, options
    )


def _p5_image_map(data_dir: str, options: StorageOptions | None) -> dict[str, str]:
    json_url = join(data_dir, "item2img.json")
    try:
        with open_read(json_url, options) as f:
            raw = f.read()
    except StorageNotFoundError:
        pkl_url = join(data_dir, "item2img_dict.pkl")
        if _is_file(pkl_url, options):
            raise ConversionError(
                f"{pkl_url}: pickles are not loaded, for security (unpickling can run arbitrary code). "
                f"Convert it once, in an environment you trust, to JSON at {json_url}: "
                "json.dump(pickle.load(open('item2img_dict.pkl', 'rb')), open('item2img.json', 'w'))"
            ) from None
        raise ConversionError(
            f"images_dir was given but there is no item-to-image map at {json_url}"
        ) from None
    try:
        mapping = json.loads(raw)
        if not isinstance(mapping, dict):
            raise TypeError(f"expected an object, got {type(mapping).__name__}")
        return {str(k): str(v) for k, v in mapping.items()}
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{json_url}: malformed item-to-image map ({type(e).__name__}: {e})") from e


# ------------------------------------------------------------------- plain sequential-recommendation


def convert_seqrec(
    out_url: str,
    sequences_path: str,
    attributes_path: str | None = None,
    max_samples_per_shard: int = 1000,
    min_interactions: int = 5,
    on_error: OnError = "raise",
    name: str | None = None,
    options: StorageOptions | None = None,
) -> ConversionSummary:
    """Convert a ``user item item ...`` file (and optionally its item-to-attributes JSON) to shards.

    Ids are integers as written; items keep their order (chronological in these releases). The k-core
    filter is applied like for every source (the S3-Rec releases are 5-core already, so it removes
    nothing there). Item ids become dense 1..N in numeric order of the source ids, so a file whose ids
    are already 1..N keeps them; attribute ids become dense 1..A the same way (0 is the padding id of
    the attribute table). An item that the attribute file does not list gets no attributes (counted as
    ``no_attributes``); attribute entries of items that are not in the data are ignored.
    """
    problems = RowProblems(on_error)
    sequences: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    for lineno, line in iter_text_lines(sequences_path, options):
        where = f"{sequences_path}:{lineno}"
        try:
            tokens = line.decode("utf-8").split()
        except UnicodeDecodeError:
            problems.bad("malformed_line", f"{where}: not UTF-8 text")
            continue
        bad = next((t for t in tokens if not t.isdigit()), None)
        if bad is not None:
            problems.bad(
                "malformed_line",
                f"{where}: {bad!r} is not a non-negative integer id (expected 'user item item ...')",
            )
            continue
        user, items = tokens[0], tokens[1:]
        if not items:
            problems.bad("empty_sequence", f"{where}: user {user} has no items")
            continue
        if user in sequences:
            problems.bad(
                "duplicate_user", f"{where}: user {user} already has a sequence (line {first_line[user]})"
            )
            continue
        sequences[user], first_line[user] = items, lineno
    if not sequences:
        raise ConversionError(f"{sequences_path}: no user sequences in the file")
    sequences = _k_core(sequences, min_interactions, problems)

    item_ids = _sorted_ids({i for seq in sequences.values() for i in seq})
    attributes: dict[str, list[int]] = {}
    num_attributes = 0
    if attributes_path is not None:
        raw_attributes = _read_item_attributes(attributes_path, problems, options)
        present = {a for item in item_ids for a in raw_attributes.get(item, [])}
        dense_attribute = {a: n for n, a in enumerate(_sorted_ids(present), start=1)}
        num_attributes = len(dense_attribute)
        attributes = {
            item: [dense_attribute[a] for a in raw_attributes[item]]
            for item in item_ids
            if item in raw_attributes
        }
        problems.note("no_attributes", sum(item not in raw_attributes for item in item_ids))
    items = {}
    for source_id in item_ids:
        raw: dict[str, Any] = {"attributes": attributes.get(source_id, [])} if attributes_path else {}
        items[source_id] = _Item(source_id=source_id, text=UNTITLED, title="", raw=raw)
    base = posixpath.basename(sequences_path.rstrip("/")).removesuffix(".gz")
    name = name or posixpath.splitext(base)[0] or "seqrec"
    extra = {"num_attributes": num_attributes} if attributes_path is not None else {}
    index = None
    if num_attributes:  # the bags in CSR form, items in dense-id order (that of `items`)
        bags = [attributes.get(source_id, []) for source_id in items]
        offsets = np.zeros(len(bags) + 2, dtype=np.int64)  # (N + 2,); row 0 (padding) has none
        np.cumsum([len(bag) for bag in bags], out=offsets[2:])
        values = np.fromiter((a for bag in bags for a in bag), dtype=np.int64, count=int(offsets[-1]))
        index = write_attribute_index(out_url, offsets, values, num_attributes, options)
    return _write_dataset(
        out_url, name, items, sequences, problems, "", max_samples_per_shard, options, extra, index
    )


def _read_item_attributes(
    url: str, problems: RowProblems, options: StorageOptions | None
) -> dict[str, list[str]]:
    """``{item id: [attribute id, ...]}`` from S3-Rec's JSON (gzipped or not), every id a non-negative
    integer (as text)."""
    with _open(url, options) as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise ConversionError(f"{url}: unreadable or truncated gzip file ({e})") from e
    try:
        mapping = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{url}: not valid JSON ({e})") from e
    if not isinstance(mapping, dict):
        raise ConversionError(
            f"{url}: expected an object {{item id: [attribute ids]}}, got {type(mapping).__name__}"
        )
    out: dict[str, list[str]] = {}
    for item, values in mapping.items():
        item = str(item).strip()
        if not item.isdigit():
            problems.bad("malformed_attributes", f"{url}: key {item!r} is not an integer item id")
            continue
        ok = isinstance(values, list) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
        )
        if not ok:
            problems.bad(
                "malformed_attributes",
                f"{url}: item {item}: expected a list of non-negative integer attribute ids, got {values!r}",
            )
            continue
        # order kept, repeats dropped: a repeated attribute would weigh twice in the pooled mean
        out[item] = [str(v) for v in dict.fromkeys(values)]
    return out


# ----------------------------------------------------------------------------------------- shared steps


def _k_core(sequences: dict[str, list[str]], k: int, problems: RowProblems) -> dict[str, list[str]]:
    """Keep users and items with at least ``k`` interactions each, repeated until nothing changes."""
    users0 = len(sequences)
    items0 = len({i for seq in sequences.values() for i in seq})
    inter0 = sum(len(seq) for seq in sequences.values())
    current = sequences
    while True:
        counts = Counter(i for seq in current.values() for i in seq)
        kept: dict[str, list[str]] = {}
        for user, seq in current.items():
            seq = [i for i in seq if counts[i] >= k]
            if len(seq) >= k:
                kept[user] = seq
        done = sum(map(len, kept.values())) == sum(map(len, current.values()))
        current = kept
        if done:  # a pass removed nothing: every remaining user and item has at least k
            break
    problems.note("kcore_users", users0 - len(current))
    problems.note("kcore_items", items0 - len({i for seq in current.values() for i in seq}))
    problems.note("kcore_interactions", inter0 - sum(len(seq) for seq in current.values()))
    return current


def _write_dataset(
    out_url: str,
    name: str,
    items: dict[str, _Item],
    sequences: dict[str, list[str]],
    problems: RowProblems,
    template: str,
    max_samples_per_shard: int,
    options: StorageOptions | None,
    extra: dict[str, Any] | None = None,
    attribute_index: dict[str, Any] | None = None,
) -> ConversionSummary:
    """Write item shards, user shards and finally ``dataset.json`` (plus the ``extra`` facts, and the
    entry of an attribute index already written, data_pipeline/item_index.py); items get dense ids 1..N
    in dict order."""
    dense = {source_id: n for n, source_id in enumerate(items, start=1)}
    meta = {
        "dataset": name,
        "num_items": len(items),
        "num_users": len(sequences),
        "split": SPLIT,
        **(extra or {}),
    }
    # images are read (and checked) while writing, so their counts are known only afterwards: the
    # manifests get them through the meta dicts, which ShardWriter serialises at exit
    item_meta: dict[str, Any] = dict(meta)
    user_meta: dict[str, Any] = dict(meta)
    num_images = 0
    with ShardWriter(out_url, "items", max_samples_per_shard, options, item_meta) as writer:
        for source_id, item in items.items():
            doc = {
                "item_id": dense[source_id],
                "source_id": source_id,
                "text": item.text,
                "title": item.title,
            }
            doc.update({k: v for k, v in item.raw.items() if k not in doc})
            fields = {"json": json.dumps(doc, default=str).encode()}
            image = _read_image(item, problems, options)
            if image is not None:
                fields[image[0]] = image[1]
                num_images += 1
            writer.write(f"{dense[source_id]:09d}", fields)
        skipped = dict(sorted(problems.counts.items()))
        item_meta.update(num_images=num_images, skipped=skipped)
        user_meta.update(num_images=num_images, skipped=skipped)
        writer.meta = item_meta
    with ShardWriter(out_url, "users", max_samples_per_shard, options, user_meta) as writer:
        for index, user in enumerate(_sorted_ids(sequences)):
            doc = {"user_id": user, "items": [dense[i] for i in sequences[user]]}
            writer.write(f"{index:09d}", {"json": json.dumps(doc).encode()})
    summary = ConversionSummary(
        name=name,
        out_url=out_url,
        num_items=len(items),
        num_users=len(sequences),
        num_interactions=sum(len(seq) for seq in sequences.values()),
        num_images=num_images,
        skipped=skipped,
        skipped_examples=dict(problems.examples),
        skip_log=problems.write_log(out_url, options),
    )
    top = {
        "name": name,
        "num_items": summary.num_items,
        "num_users": summary.num_users,
        "num_interactions": summary.num_interactions,
        "num_images": num_images,
        "items_prefix": "items",
        "users_prefix": "users",
        "split": SPLIT,
        "skipped": skipped,
        "skipped_examples": summary.skipped_examples,
        "item_text_template": template,
        **(extra or {}),
        **({INDEX_KEY: attribute_index} if attribute_index is not None else {}),
    }
    # last: dataset.json present means both shard sets (and their manifests) are complete
    with atomic_write(join(out_url, "dataset.json"), options) as f:
        f.write(json.dumps(top, indent=1).encode())
    return summary


def _read_image(
    item: _Item, problems: RowProblems, options: StorageOptions | None
) -> tuple[str, bytes] | None:
    """``(extension, bytes)`` of the item's image, or None (counted when images were asked for)."""
    if item.image_url is None:
        if item.wants_image:
            problems.note("no_image")
        return None
    try:
        with open_read(item.image_url, options) as f:
            data = f.read()
    except StorageNotFoundError:
        problems.note("no_image")
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = (img.format or "").lower()
            img.verify()  # checks the structure (and PNG CRCs) without decoding all pixels
    except Exception as e:  # PIL raises many types for bad files (OSError, SyntaxError, ValueError...)
        problems.bad("bad_image", f"{item.image_url}: undecodable image of item {item.source_id}: {e}")
        return None
    return {"jpeg": "jpg", "mpo": "jpg"}.get(fmt, fmt or "bin"), data


def _render(parts: dict[str, str]) -> str:
    """``"Label: value"`` lines for the non-empty values, or ``"Untitled Item"`` if there are none."""
    lines = [f"{label}: {value}" for label, value in parts.items() if value != ""]
    return "\n".join(lines) or UNTITLED


def _sorted_ids(ids: Any) -> list[str]:
    """Numeric ids in numeric order ("2" before "10"), then the others as strings: stable, readable output."""
    return sorted(ids, key=lambda s: (0, int(s), s) if s.isdigit() else (1, 0, s))


def _open(url: str, options: StorageOptions | None, hint: str = "") -> io.RawIOBase | io.BufferedReader:
    try:
        return open_read(url, options)
    except StorageNotFoundError as e:
        raise ConversionError(f"input file {url} does not exist{f' ({hint})' if hint else ''}") from e


def _is_file(url: str, options: StorageOptions | None) -> bool:
    try:
        with open_read(url, options):
            return True
    except StorageNotFoundError:
        return False


def iter_text_lines(url: str, options: StorageOptions | None, hint: str = "") -> Iterator[tuple[int, bytes]]:
    """``(1-based line number, raw line)`` of a text file, gunzipped if it starts with the gzip magic.

    Lines stay bytes so that a line that is not UTF-8 is one bad record, not a failed file.
    """
    with _open(url, options, hint) as raw:
        buffered = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(raw)  # type: ignore[arg-type]
        stream: Any = gzip.GzipFile(fileobj=buffered) if buffered.peek(2)[:2] == b"\x1f\x8b" else buffered
        try:
            for lineno, line in enumerate(stream, start=1):
                if line.strip():
                    yield lineno, line
        except (OSError, EOFError) as e:
            raise ConversionError(f"{url}: unreadable or truncated file ({type(e).__name__}: {e})") from e
