"""Write a synthetic catalog at scale (millions of items): item attributes that drive the users'
transitions, no images, generated with vectorised numpy, plus synthetic frozen feature tables written
directly (no encoder runs), so scale runs test the trainer rather than the data preparation::

    fmrl data prepare-synthetic-scale runs/data/scale-10m --num-items 10000000 --num-users 2000000 \\
        --num-categories 1000 --num-brands 50000 --text-dim 64

    from data_pipeline.synthetic_scale import prepare_synthetic_scale
    prepare_synthetic_scale("s3://bucket/scale", num_items=1_000_000, num_users=200_000,
                            num_categories=500, num_brands=10_000, text_dim=384, image_dim=1280)

The embedded catalog of :mod:`data_pipeline.synthetic_shards` exercises the real-data path (raw text and
PNG images -> encoders -> features) and writes a few thousand items per second; this writer is its
fast sibling for scale tests. It writes the same shard layout with the same :class:`ShardWriter`:

    items-000000.tar ... items.manifest.json   key f"{item_id:09d}" (1..N): "json"
    users-000000.tar ... users.manifest.json   key f"{user_index:09d}" (0..U-1): "json"
    features/text_features.safetensors ...     the `fmrl features` layout (data_pipeline/features.py)
    item_attributes.{offsets,values}.npy       the attribute index (data_pipeline/item_index.py)
    dataset.json                               written last; ``num_attributes`` = C + B

How it is made (all from ``seed``; the same arguments give byte-identical files):

* every item has a brand (B brands, balanced, random) and every brand one category (C categories,
  balanced, random), so a category holds about N / C items and a brand N / B. The item's attribute bag
  is ``[category + 1, C + brand + 1]`` (ids 1..C + B, for the model's attribute table), its popularity a
  log-normal weight;
* users: a chronological walk whose next item is, by popularity, from the current item's brand (50%),
  from one of its category's two successor categories (30%), from its category (10%), or from the whole
  catalog (10%). So the category and brand of the last items predict the next one: a model learns from
  the attribute table, the ID table, or features that encode them. Users are generated a block at a
  time, a vectorised step per position;
* features: item i's row is ``normalise((z_category + 0.7 z_brand + 0.3 noise) @ P + 0.05 noise)``
  with 32-d latents and a random (32, F) projection per table, written in row blocks straight into the
  safetensors file, so a table larger than memory can be written.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np

from data_pipeline.features import FEATURES_VERSION, write_feature_table
from data_pipeline.item_index import write_attribute_index
from data_pipeline.shards import ShardWriter
from data_pipeline.storage import StorageOptions, atomic_write, join
from data_pipeline.synthetic_shards import (
    SyntheticShardsSummary,
    _check,
    _commit_dataset,
    _existing_dataset,
    _progress,
)

__all__ = ["SYNTHETIC_FEATURE_MODEL", "ScaleCatalog", "prepare_synthetic_scale", "write_synthetic_features"]

SYNTHETIC_FEATURE_MODEL = "synthetic"
"""The ``text_model`` / ``image_model`` that features.json records for generated tables."""
# the user walk: next item from the brand, a successor category, the category, else anywhere
_BRAND, _SUCCESSOR, _CATEGORY = 0.5, 0.3, 0.1
_POPULARITY_SIGMA = 1.0  # log-normal popularity: the top 1% of items are ~10x the median
_LATENT_DIM = 32
_USER_BLOCK = 65_536  # users generated per vectorised block
_FEATURE_BLOCK = 32_768  # feature rows generated and written per block
# seed-tuple tags: independent generator streams
_CATALOG_STREAM, _USER_STREAM, _FEATURE_STREAM = 10, 11, 12


def _segments(sizes: np.ndarray) -> np.ndarray:
    """(K, 2) [lo, hi) of K consecutive segments of the given sizes (K,)."""
    ends = np.cumsum(sizes)
    return np.stack([ends - sizes, ends], axis=1).astype(np.int64)


class ScaleCatalog:
    """The catalog's structure, O(N) numpy arrays: each item's brand and category, and popularity-weighted
    draws of an item from a brand, a category or the whole catalog.

    ``order`` lists item indices (0-based) sorted by (category, brand), so every brand and every category
    is a contiguous segment of it; ``cum_pop`` is the running sum of the popularity weights along
    ``order``, and a draw from segment [lo, hi) is one ``searchsorted`` of a uniform in its range.
    """

    def __init__(self, *, num_items: int, num_categories: int, num_brands: int, seed: int) -> None:
        rng = np.random.default_rng((seed, _CATALOG_STREAM))
        self.num_items, self.num_categories, self.num_brands = num_items, num_categories, num_brands
        self.brand_category = rng.permutation(np.arange(num_brands) % num_categories).astype(np.int32)  # (B,)
        self.brand = rng.permutation(np.arange(num_items) % num_brands).astype(np.int32)  # (N,)
        self.category = self.brand_category[self.brand]  # (N,)
        # two successor categories per category, never itself (C >= 3)
        shift = rng.integers(1, num_categories, size=(num_categories, 2))
        shift[:, 1] = np.where(
            shift[:, 1] == shift[:, 0], shift[:, 0] % (num_categories - 1) + 1, shift[:, 1]
        )
        self.successors = (np.arange(num_categories)[:, None] + shift) % num_categories  # (C, 2)
        popularity = rng.lognormal(0.0, _POPULARITY_SIGMA, num_items)  # (N,)
        self.order = np.lexsort((self.brand, self.category)).astype(np.int64)  # (N,)
        self.cum_pop = np.cumsum(popularity[self.order])  # (N,) float64
        # each brand's and each category's segment [lo, hi) of `order`: (B, 2) and (C, 2). Segments come
        # in (category, brand) order, which is the order of `sorted_brands`
        sorted_brands = np.lexsort((np.arange(num_brands), self.brand_category))  # (B,)
        self.brand_segment = _segments(np.bincount(self.brand, minlength=num_brands)[sorted_brands])
        self.brand_segment[sorted_brands] = self.brand_segment.copy()
        self.category_segment = _segments(np.bincount(self.category, minlength=num_categories))

    def attributes(self, item_ids: np.ndarray) -> np.ndarray:
        """(n, 2) attribute ids [category + 1, C + brand + 1] of 1-based ``item_ids`` (n,)."""
        index = item_ids - 1
        return np.stack([self.category[index] + 1, self.num_categories + self.brand[index] + 1], axis=1)

    def draw(self, segment: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One popularity-weighted item id (1-based) from each segment [lo, hi) of ``order``, (n, 2); (n,)."""
        lo, hi = segment[:, 0], segment[:, 1]
        low = np.where(lo > 0, self.cum_pop[np.maximum(lo - 1, 0)], 0.0)
        u = low + rng.random(len(lo)) * (self.cum_pop[hi - 1] - low)
        # sorted keys walk the table in order: 5x faster than random probes into a large table
        by_key = np.argsort(u)
        index = np.empty(len(u), dtype=np.int64)
        index[by_key] = np.searchsorted(self.cum_pop, u[by_key], side="right")
        index = np.clip(index, lo, hi - 1)
        return self.order[index] + 1

    def walks(self, lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(U, max(lengths)) item ids of U users' walks (entries past a user's length are junk)."""
        users = len(lengths)
        steps = np.empty((users, int(lengths.max())), dtype=np.int64)
        everything = np.array([0, self.num_items], dtype=np.int64)
        steps[:, 0] = self.draw(np.broadcast_to(everything, (users, 2)), rng)
        for t in range(1, steps.shape[1]):
            index = steps[:, t - 1] - 1
            category = self.category[index]
            successor = self.successors[category, rng.integers(0, 2, users)]
            move = rng.random(users)[:, None]  # (U, 1)
            segment = np.where(
                move < _BRAND,
                self.brand_segment[self.brand[index]],
                np.where(
                    move < _BRAND + _SUCCESSOR,
                    self.category_segment[successor],
                    np.where(
                        move < _BRAND + _SUCCESSOR + _CATEGORY, self.category_segment[category], everything
                    ),
                ),
            )  # (U, 2)
            steps[:, t] = self.draw(segment, rng)
        return steps


def _check_structure(num_items: int, num_categories: int, num_brands: int) -> None:
    _check("num_categories", num_categories, 3)  # 3: each category needs two other successors
    if num_brands < num_categories:
        raise ValueError(
            f"num_brands ({num_brands}) must be >= num_categories ({num_categories}): every category "
            "needs at least one brand"
        )
    if num_items < num_brands:
        raise ValueError(
            f"num_items ({num_items}) must be >= num_brands ({num_brands}): every brand needs at least "
            "one item"
        )


def prepare_synthetic_scale(
    out_url: str,
    *,
    num_items: int,
    num_users: int,
    num_categories: int,
    num_brands: int,
    min_seq_len: int = 5,
    max_seq_len: int = 30,
    seed: int = 0,
    text_dim: int = 384,
    image_dim: int = 0,
    max_samples_per_shard: int = 50_000,
    options: StorageOptions | None = None,
    progress: bool = True,
) -> SyntheticShardsSummary:
    """Write the scale catalog (item and user shard sets, the feature tables under ``out_url/features``
    unless both widths are 0, then ``dataset.json``). A complete data set with the same settings is
    reused; one made with other settings is a ValueError naming them."""
    _check("num_items", num_items, 2, 10**9 - 1)  # keys have 9 digits
    _check("num_users", num_users, 1, 10**9 - 1)
    _check("num_brands", num_brands, 3)
    _check_structure(num_items, num_categories, num_brands)
    _check("min_seq_len", min_seq_len, 3)
    _check("max_seq_len", max_seq_len, min_seq_len)
    _check("seed", seed, 0)
    _check("text_dim", text_dim, 0)
    _check("image_dim", image_dim, 0)
    _check("max_samples_per_shard", max_samples_per_shard, 1)

    meta = {
        "dataset": "synthetic-scale",
        "num_items": num_items,
        "num_users": num_users,
        "split": "leave-one-out",
        "seed": seed,
        "num_categories": num_categories,
        "num_brands": num_brands,
        "min_seq_len": min_seq_len,
        "max_seq_len": max_seq_len,
        "text_dim": text_dim,
        "image_dim": image_dim,
    }
    existing = _existing_dataset(out_url, meta, max_samples_per_shard, options)
    if existing is not None:
        return existing
    catalog = ScaleCatalog(
        num_items=num_items, num_categories=num_categories, num_brands=num_brands, seed=seed
    )

    with ShardWriter(out_url, "items", max_samples_per_shard, options=options, meta=meta) as items:
        bar = _progress(range(num_items), num_items, "items", progress)
        for start in range(1, num_items + 1, _USER_BLOCK):
            ids = np.arange(start, min(start + _USER_BLOCK, num_items + 1))
            items.write_many(
                "json",
                (
                    (
                        f"{item_id:09d}",
                        b'{"item_id": %d, "source_id": "synthetic-%09d", "text": "category %d brand %d", '
                        b'"attributes": [%d, %d]}' % (item_id, item_id, category, brand, category, brand),
                    )
                    for item_id, (category, brand) in zip(ids.tolist(), catalog.attributes(ids).tolist())
                ),
            )
            bar.update(len(ids))
        bar.close()

    num_interactions = 0
    with ShardWriter(out_url, "users", max_samples_per_shard, options=options, meta=meta) as users:
        bar = _progress(range(num_users), num_users, "users", progress)
        for block, start in enumerate(range(0, num_users, _USER_BLOCK)):
            count = min(_USER_BLOCK, num_users - start)
            rng = np.random.default_rng((seed, _USER_STREAM, block))
            lengths = rng.integers(min_seq_len, max_seq_len + 1, count)
            walks = catalog.walks(lengths, rng).tolist()
            users.write_many(
                "json",
                (
                    (
                        f"{start + offset:09d}",
                        b'{"user_id": "synthetic-u%09d", "items": [%s]}'
                        % (start + offset, ", ".join(map(str, walk[:length])).encode()),
                    )
                    for offset, (walk, length) in enumerate(zip(walks, lengths.tolist()))
                ),
            )
            num_interactions += int(lengths.sum())
            bar.update(count)
        bar.close()

    if text_dim or image_dim:
        write_synthetic_features(
            catalog,
            join(out_url, "features"),
            out_url,
            text_dim=text_dim,
            image_dim=image_dim,
            seed=seed,
            options=options,
        )
    # the attribute index: every item's bag is [category, brand], so offsets step by 2 from item 1 on
    bag_offsets = np.concatenate([[0], np.arange(num_items + 1, dtype=np.int64) * 2])  # (N + 2,)
    bag_values = catalog.attributes(np.arange(1, num_items + 1)).reshape(-1)  # (2N,)
    attribute_index = write_attribute_index(
        out_url, bag_offsets, bag_values, num_categories + num_brands, options
    )
    dataset = {
        "name": "synthetic-scale",
        "num_items": num_items,
        "num_users": num_users,
        "num_interactions": num_interactions,
        "num_attributes": num_categories + num_brands,
        "attribute_index": attribute_index,
        "items_prefix": "items",
        "users_prefix": "users",
        "skipped": {},
        "generator": {**meta, "max_samples_per_shard": max_samples_per_shard},
    }
    return _commit_dataset(out_url, dataset, items, users, options)


def write_synthetic_features(
    catalog: ScaleCatalog,
    out_url: str,
    dataset_url: str,
    *,
    text_dim: int,
    image_dim: int,
    seed: int,
    options: StorageOptions | None = None,
) -> dict:
    """Write frozen feature tables of ``catalog`` in the layout ``fmrl features`` writes (a text table of
    width ``text_dim``, an image table of width ``image_dim``; 0 leaves one out), ``features.json``
    last; returns its content. Rows encode the items' category and brand (see the module docstring)."""
    if not (text_dim or image_dim):
        raise ValueError("text_dim and image_dim are both 0: there is no feature table to write")
    info: dict = {
        "version": FEATURES_VERSION,
        "dataset_url": dataset_url,
        "num_items": catalog.num_items,
        "text_model": SYNTHETIC_FEATURE_MODEL if text_dim else None,
        "image_model": SYNTHETIC_FEATURE_MODEL if image_dim else None,
        "generator": {"seed": seed, "latent_dim": _LATENT_DIM},
    }
    for table, (modality, dim) in enumerate((("text", text_dim), ("image", image_dim))):
        if not dim:
            continue
        name = f"{modality}_features.safetensors"
        blocks = _feature_rows(catalog, dim, np.random.default_rng((seed, _FEATURE_STREAM, table)))
        written = write_feature_table(
            join(out_url, name), catalog.num_items + 1, dim, blocks, SYNTHETIC_FEATURE_MODEL, options
        )
        info[f"{modality}_dim"], info[f"{modality}_file"] = dim, name
        info[f"{modality}_sha256"], info[f"{modality}_blocks"] = written["sha256"], written["blocks"]
    if image_dim:
        info["image_fallbacks"] = 0
    with atomic_write(join(out_url, "features.json"), options) as f:
        f.write(json.dumps(info, indent=1, sort_keys=True).encode())
    return info


def _feature_rows(catalog: ScaleCatalog, dim: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Blocks of float32 rows 0..N of one table: row 0 (padding) zeros, row i item i's unit vector."""
    categories = rng.standard_normal((catalog.num_categories, _LATENT_DIM), dtype=np.float32)
    brands = rng.standard_normal((catalog.num_brands, _LATENT_DIM), dtype=np.float32)
    projection = rng.standard_normal((_LATENT_DIM, dim), dtype=np.float32) / np.sqrt(_LATENT_DIM)
    for start in range(0, catalog.num_items + 1, _FEATURE_BLOCK):
        ids = np.arange(max(start, 1), min(start + _FEATURE_BLOCK, catalog.num_items + 1))
        latent = categories[catalog.category[ids - 1]] + 0.7 * brands[catalog.brand[ids - 1]]  # (n, 32)
        latent += 0.3 * rng.standard_normal(latent.shape, dtype=np.float32)
        rows = latent @ projection  # (n, F)
        rows += 0.05 * rng.standard_normal(rows.shape, dtype=np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        if start == 0:
            rows = np.concatenate([np.zeros((1, dim), dtype=np.float32), rows])
        yield rows
