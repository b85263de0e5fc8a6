"""Write a synthetic multimodal catalog as WebDataset shards: item text + real PNG images, user sequences.

Why: :mod:`data_pipeline.synthetic` builds features in process, which is enough for the demo but never
exercises the path real datasets take (raw text and images in shards -> encoders -> features). This writer
produces a dataset in exactly the layout the Amazon / MovieLens converters write, at any size (1M items
is a few numpy arrays of length N), with the same latent structure, so a model has something to learn::

    from data_pipeline.synthetic_shards import prepare_synthetic
    prepare_synthetic("s3://bucket/synthetic", num_items=100_000, num_users=50_000, num_clusters=200,
                      min_seq_len=5, max_seq_len=30, seed=0)

How it is made (all from ``seed``; the same arguments give byte-identical shards):

* every item belongs to one of C latent clusters (balanced, random) and has a latent vector
  z = centre + noise, drawn from its own generator ``default_rng((seed, 1, item_id))`` so an item's
  bytes do not depend on chunking or on the items before it;
* text: title, brand, category and description words come from per-cluster vocabularies of
  pseudo-words, mixed with shared filler words and words of random other clusters (noise), laid out
  like the paper's Amazon text (:data:`ITEM_TEXT_TEMPLATE`); the price's scale depends on the cluster;
* image: a 64x64 (``image_size``) RGB PNG whose shape type and base hue are set by the cluster, while z
  jitters hue, saturation, size and position, so image features carry the cluster signal too;
* users: as in :mod:`data_pipeline.synthetic`, the next item stays in the current cluster (30%), moves
  to one of its two successor clusters (60%) or jumps anywhere (10%), and within the cluster is drawn by
  a Zipf popularity; each user has its own generator ``default_rng((seed, 2, user_index))``.

Output under ``out_url``::

    items-000000.tar ... items.manifest.json   key f"{item_id:09d}" (1..N): "json" + "png"
    users-000000.tar ... users.manifest.json   key f"{user_index:09d}" (0..U-1): "json"
    dataset.json                               written last: its presence means the dataset is complete

Item json: ``{"item_id", "source_id", "text", "title", "brand", "category", "price", "description",
"cluster"}``; user json: ``{"user_id", "items": [item ids, chronological]}``. Splitting (leave-one-out)
is the reader's job; the manifests' meta says so.
"""

from __future__ import annotations

import colorsys
import json
import math
import struct
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from data_pipeline.shards import ShardWriter, generated_dataset, read_manifest
from data_pipeline.storage import StorageOptions, atomic_write, join

__all__ = ["ITEM_TEXT_TEMPLATE", "SyntheticShardsSummary", "prepare_synthetic"]

ITEM_TEXT_TEMPLATE = (
    "Title: {title}\nPrice: {price}\nBrand: {brand}\nCategories: {category}\nDescription: {description}"
)

_LATENT_DIM = 16
# the same cluster walk as data_pipeline.synthetic (not imported: that module pulls in torch)
_STAY, _SUCCESSOR = 0.3, 0.6  # the remaining 0.1 jumps to a uniformly random cluster
_ZIPF = 1.1
# a word of a title or description is from the item's cluster, shared filler, or another cluster (noise)
_OWN, _FILLER = 0.7, 0.2
_TITLE_WORDS, _DESCRIPTION_WORDS, _BRANDS, _SUBCATEGORIES = 24, 40, 3, 4
_FILLER_VOCAB = (
    "new premium set pack classic daily care soft natural gentle pro mini travel size original formula "
    "with and for the of in long lasting light ultra fresh smooth easy best"
).split()
# enough for the longest title and description at up to 3 draws per word, plus the other fields
_UNIFORMS_PER_ITEM = 1 + 6 * 3 + 1 + 29 * 3 + 3
_CONSONANTS, _VOWELS = "bcdfghjklmnprstvz", "aeiou"
# seed-tuple tags: independent generator streams for clusters, items and users
_CLUSTER_STREAM, _ITEM_STREAM, _USER_STREAM = 0, 1, 2


@dataclass(frozen=True)
class SyntheticShardsSummary:
    """What :func:`prepare_synthetic` wrote."""

    out_url: str
    num_items: int
    num_users: int
    num_interactions: int
    item_shards: int
    user_shards: int
    reused: bool = False
    """True when a complete dataset with the same settings was already there and nothing was written."""


@dataclass(frozen=True)
class _ClusterVocab:
    title: list[str]
    description: list[str]
    brands: list[str]
    category: str
    subcategories: list[str]
    hue: float
    shape: int
    log_price: float


class _Catalog:
    """The global latent structure: O(C) per-cluster data plus three numpy arrays of length N.

    ``order`` lists item indices (0-based) grouped by cluster, in random order within a cluster;
    ``cum_pop`` is the running sum of Zipf weights along ``order`` so a popularity-weighted draw within a
    cluster is one ``searchsorted`` over its segment ``offsets[c]:offsets[c+1]``.
    """

    def __init__(self, *, num_items: int, num_clusters: int, seed: int) -> None:
        rng = np.random.default_rng((seed, _CLUSTER_STREAM))
        self.seed = seed
        self.num_clusters = num_clusters
        self.cluster = rng.permutation(np.arange(num_items) % num_clusters).astype(np.int32)  # (N,)
        self.centres = rng.standard_normal((num_clusters, _LATENT_DIM))
        self.successors = np.stack(
            [rng.choice(np.delete(np.arange(num_clusters), c), 2, replace=False) for c in range(num_clusters)]
        )
        self.order = np.lexsort((rng.random(num_items), self.cluster)).astype(np.int32)  # (N,)
        self.offsets = np.searchsorted(self.cluster[self.order], np.arange(num_clusters + 1))  # (C+1,)
        rank = np.arange(num_items) - np.repeat(self.offsets[:-1], np.diff(self.offsets))
        self.cum_pop = np.cumsum(1.0 / (rank + 1.0) ** _ZIPF)  # (N,) float64
        self.vocab = [self._cluster_vocab(c) for c in range(num_clusters)]

    def _cluster_vocab(self, c: int) -> _ClusterVocab:
        rng = np.random.default_rng((self.seed, _CLUSTER_STREAM, c))
        return _ClusterVocab(
            title=[_pseudo_word(rng) for _ in range(_TITLE_WORDS)],
            description=[_pseudo_word(rng) for _ in range(_DESCRIPTION_WORDS)],
            brands=[_pseudo_word(rng).capitalize() for _ in range(_BRANDS)],
            category=_pseudo_word(rng).capitalize(),
            subcategories=[_pseudo_word(rng).capitalize() for _ in range(_SUBCATEGORIES)],
            # golden-ratio steps spread the hues of any number of clusters evenly around the wheel
            hue=(c * 0.6180339887) % 1.0,
            shape=c % 4,
            log_price=float(rng.uniform(1.0, 5.0)),
        )

    def draw_item(self, c: int, rng: np.random.Generator) -> int:
        """A popularity-weighted item id (1-based) of cluster ``c``."""
        start, end = int(self.offsets[c]), int(self.offsets[c + 1])
        low = self.cum_pop[start - 1] if start else 0.0
        u = low + rng.random() * (self.cum_pop[end - 1] - low)
        index = min(int(np.searchsorted(self.cum_pop[start:end], u, side="right")) + start, end - 1)
        return int(self.order[index]) + 1


def _pseudo_word(rng: np.random.Generator) -> str:
    syllables = int(rng.integers(2, 4))
    return "".join(
        _CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(5)] for _ in range(syllables)
    )


def _pick(options: list[str], u: float) -> str:
    return options[int(u * len(options))]


def _words(u: Iterator[float], catalog: _Catalog, own: list[str], field: str, count: int) -> str:
    out = []
    for _ in range(count):
        kind = next(u)
        if kind < _OWN:
            out.append(_pick(own, next(u)))
        elif kind < _OWN + _FILLER:
            out.append(_pick(_FILLER_VOCAB, next(u)))
        else:
            other = catalog.vocab[int(next(u) * catalog.num_clusters)]
            out.append(_pick(getattr(other, field), next(u)))
    return " ".join(out)


def _item_sample(catalog: _Catalog, item_id: int, image_size: int) -> dict[str, bytes]:
    c = int(catalog.cluster[item_id - 1])
    vocab = catalog.vocab[c]
    rng = np.random.default_rng((catalog.seed, _ITEM_STREAM, item_id))
    z = catalog.centres[c] + 0.6 * rng.standard_normal(_LATENT_DIM)  # (LATENT,)
    # one block of uniforms consumed in order: a numpy call per word would dominate the run time
    u = iter(rng.random(_UNIFORMS_PER_ITEM).tolist())

    title = _words(u, catalog, vocab.title, "title", 3 + int(next(u) * 4)).title()
    description = _words(u, catalog, vocab.description, "description", 12 + int(next(u) * 18))
    if next(u) < 0.9:
        brand = _pick(vocab.brands, next(u))
    else:  # a few items carry another cluster's brand (resellers, mislabels)
        brand = catalog.vocab[int(next(u) * catalog.num_clusters)].brands[0]
    category = f"Synthetic > {vocab.category} > {_pick(vocab.subcategories, next(u))}"
    price = round(math.exp(vocab.log_price + 0.3 * math.tanh(z[0])), 2)
    fields = {"title": title, "price": f"{price:.2f}", "brand": brand, "category": category}
    text = ITEM_TEXT_TEMPLATE.format(description=description, **fields)
    record = {
        "item_id": item_id,
        "source_id": f"synthetic-{item_id:09d}",
        "text": text,
        "title": title,
        "brand": brand,
        "category": category,
        "price": price,
        "description": description,
        "cluster": c,
    }
    return {"json": json.dumps(record).encode(), "png": _image(vocab, z, image_size)}


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return round(r * 255), round(g * 255), round(b * 255)


def _image(vocab: _ClusterVocab, z: np.ndarray, size: int) -> bytes:
    """A shape on a background: cluster -> shape type and hue; the latent vector jitters the rest."""
    t = np.tanh(z[1:8])  # bounded jitters in (-1, 1)
    image = Image.new("RGB", (size, size), _rgb(vocab.hue + 0.5, 0.25 + 0.1 * t[0], 0.9))
    draw = ImageDraw.Draw(image)
    half = size * (0.3 + 0.1 * t[1])
    cx, cy = size * (0.5 + 0.12 * t[2]), size * (0.5 + 0.12 * t[3])
    box = (cx - half, cy - half, cx + half, cy + half)
    fill = _rgb(vocab.hue + 0.04 * t[4], 0.75 + 0.2 * t[5], 0.8 + 0.15 * t[6])
    if vocab.shape == 0:
        draw.ellipse(box, fill=fill)
    elif vocab.shape == 1:
        draw.rectangle(box, fill=fill)
    elif vocab.shape == 2:
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=fill)
    return _encode_png(image)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _encode_png(image: Image.Image) -> bytes:
    """A standard 8-bit RGB PNG (any decoder reads it), written directly rather than by ``Image.save``,
    whose per-call overhead was over half the cost of a small item."""
    width, height = image.size
    raw = image.tobytes()
    stride = 3 * width
    # each scanline is prefixed by its filter type; 0 = none (zlib does the compressing)
    rows = b"".join(b"\x00" + raw[y * stride : (y + 1) * stride] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit depth, colour type 2 = RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows, 6))
        + _png_chunk(b"IEND", b"")
    )


def _user_items(catalog: _Catalog, seed: int, user_index: int, min_len: int, max_len: int) -> list[int]:
    rng = np.random.default_rng((seed, _USER_STREAM, user_index))
    length = int(rng.integers(min_len, max_len + 1))
    current = int(rng.integers(catalog.num_clusters))
    items = []
    for _ in range(length):
        items.append(catalog.draw_item(current, rng))
        move = rng.random()
        if move < _STAY:
            pass
        elif move < _STAY + _SUCCESSOR:
            current = int(catalog.successors[current, rng.integers(2)])
        else:
            current = int(rng.integers(catalog.num_clusters))
    return items


def _progress(iterable: Iterable[int], total: int, desc: str, enabled: bool) -> Iterable[int]:
    # in logs (no tty) a bar redrawn 10x a second is noise; every 30 s is a heartbeat
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(iterable, total=total, desc=desc, unit=desc, disable=not enabled, mininterval=interval)


def _check(name: str, value: int, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")


def prepare_synthetic(
    out_url: str,
    *,
    num_items: int,
    num_users: int,
    num_clusters: int,
    min_seq_len: int,
    max_seq_len: int,
    seed: int,
    max_samples_per_shard: int = 10_000,
    image_size: int = 64,
    options: StorageOptions | None = None,
    progress: bool = True,
) -> SyntheticShardsSummary:
    """Write the synthetic dataset (item and user shard sets, then ``dataset.json``) under ``out_url``.

    Items and users are generated and written one at a time, so memory stays bounded (a few numpy
    arrays of length N plus the shard writer's buffer) at any catalog size. ``min_seq_len`` is at least
    3 so that leave-one-out leaves a training prefix, a validation and a test item.
    """
    _check("num_items", num_items, 2)
    _check("num_users", num_users, 1)
    _check("num_clusters", num_clusters, 3, num_items)  # 3: each cluster needs two other successors
    _check("min_seq_len", min_seq_len, 3)
    _check("max_seq_len", max_seq_len, min_seq_len)
    _check("seed", seed, 0)
    _check("max_samples_per_shard", max_samples_per_shard, 1)
    _check("image_size", image_size, 8, 1024)

    catalog = _Catalog(num_items=num_items, num_clusters=num_clusters, seed=seed)
    meta = {
        "dataset": "synthetic",
        "num_items": num_items,
        "num_users": num_users,
        "split": "leave-one-out",
        "seed": seed,
        "num_clusters": num_clusters,
        "min_seq_len": min_seq_len,
        "max_seq_len": max_seq_len,
        "image_size": image_size,
    }
    existing = _existing_dataset(out_url, meta, max_samples_per_shard, options)
    if existing is not None:
        return existing
    with ShardWriter(out_url, "items", max_samples_per_shard, options=options, meta=meta) as items:
        for item_id in _progress(range(1, num_items + 1), num_items, "items", progress):
            items.write(f"{item_id:09d}", _item_sample(catalog, item_id, image_size))

    num_interactions = 0
    with ShardWriter(out_url, "users", max_samples_per_shard, options=options, meta=meta) as users:
        for user_index in _progress(range(num_users), num_users, "users", progress):
            seq = _user_items(catalog, seed, user_index, min_seq_len, max_seq_len)
            num_interactions += len(seq)
            record = {"user_id": f"synthetic-u{user_index:09d}", "items": seq}
            users.write(f"{user_index:09d}", {"json": json.dumps(record).encode()})

    dataset = {
        "name": "synthetic",
        "num_items": num_items,
        "num_users": num_users,
        "num_interactions": num_interactions,
        "items_prefix": "items",
        "users_prefix": "users",
        "skipped": {},
        "item_text_template": ITEM_TEXT_TEMPLATE,
        "generator": {**meta, "max_samples_per_shard": max_samples_per_shard},
    }
    return _commit_dataset(out_url, dataset, items, users, options)


def _commit_dataset(
    out_url: str, dataset: dict, items: ShardWriter, users: ShardWriter, options: StorageOptions | None
) -> SyntheticShardsSummary:
    """Write ``dataset.json`` (last: its presence means the shard sets, their manifests and any feature
    tables are complete) and summarise what was written."""
    with atomic_write(join(out_url, "dataset.json"), options) as f:
        f.write(json.dumps(dataset, indent=1, sort_keys=True).encode())
    return SyntheticShardsSummary(
        out_url=out_url,
        num_items=dataset["num_items"],
        num_users=dataset["num_users"],
        num_interactions=dataset["num_interactions"],
        item_shards=len(items.shards),
        user_shards=len(users.shards),
    )


def _existing_dataset(
    out_url: str, meta: dict, max_samples_per_shard: int, options: StorageOptions | None
) -> SyntheticShardsSummary | None:
    """The summary of a complete dataset at ``out_url`` made with the same settings; ValueError if other."""
    generator = {**meta, "max_samples_per_shard": max_samples_per_shard}
    dataset = generated_dataset(out_url, generator, ("items", "users"), options)
    if dataset is None:
        return None
    return SyntheticShardsSummary(
        out_url=out_url,
        num_items=dataset["num_items"],
        num_users=dataset["num_users"],
        num_interactions=dataset["num_interactions"],
        item_shards=len(read_manifest(out_url, "items", options).shards),
        user_shards=len(read_manifest(out_url, "users", options).shards),
        reused=True,
    )
