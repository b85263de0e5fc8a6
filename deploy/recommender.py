"""The recommender of one exported size: encode histories, score every item, top-k with the history
(and padding) left out, a batch at a time; optionally through a Matryoshka funnel.

    from deploy import load_recommender
    rec = load_recommender("runs/demo/export", size=64)
    scores, ids = rec.recommend([[12, 7, 301], [5]], k=10)       # (2, 10) each, history excluded
    rec.source_ids(ids)                                          # the items' ids in the source data
    rec = load_recommender("runs/demo/export", size="auto", max_latency_ms=5, max_memory_mb=20)
    rec.max_len, rec.history_limit                               # histories keep their last items only

Shapes: B batch, L history length, m size, N items (ids 1..N; 0 is padding), C funnel candidates.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deploy.artifact import (
    ExportError,
    exported_sizes,
    fmrl_manifest,
    join,
    read_bytes,
    read_catalog,
    read_manifest,
    read_size,
    recorded_max_len,
)
from deploy.costs import COSTS_FILE, choose_size, size_costs
from deploy.scoring import ScoringModel


@dataclass
class Funnel:
    """Matryoshka funnel retrieval: shortlist ``candidates`` items with the first ``prefix`` channels of
    the query and the items (the size-``prefix`` model's own scores, since the sizes are nested), then
    re-rank the shortlist with the full size. ``ann``: shortlist through a faiss HNSW inner-product index
    on the prefix instead of a product with every item."""

    prefix: int
    candidates: int = 200
    ann: bool = False

    def __post_init__(self) -> None:
        if self.prefix < 1 or self.candidates < 1:
            raise ValueError(
                f"funnel prefix and candidates must be >= 1, got {self.prefix}, {self.candidates}"
            )


class PrefixIndex:
    """faiss HNSW (inner product) over the items' first ``prefix`` channels, ids 1..N."""

    def __init__(self, items: torch.Tensor, prefix: int) -> None:
        import faiss  # optional: only the ANN funnel needs it

        self.index = faiss.IndexHNSWFlat(prefix, 32, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efSearch = 256
        self.index.add(items[1:, :prefix].contiguous().numpy())

    def search(self, queries: torch.Tensor, count: int) -> torch.Tensor:
        """(B, prefix) queries -> (B, count) item ids 1..N (best first)."""
        self.index.hnsw.efSearch = max(256, count)
        _, index = self.index.search(queries.contiguous().numpy(), count)
        return torch.from_numpy(index).long() + 1


def distinct_items(tokens: torch.Tensor) -> torch.Tensor:
    """(B,) number of distinct items (padding not counted) in each row of (B, L) ``tokens``."""
    ordered = tokens.sort(dim=1).values
    new = torch.cat([ordered[:, :1] > 0, (ordered[:, 1:] != ordered[:, :-1]) & (ordered[:, 1:] > 0)], dim=1)
    return new.sum(dim=1)


def mask_history_(scores: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Set the scores (B, N) of items 1..N that appear in each history (B, L) to -inf, in place, touching
    only B * L entries (no (B, N) mask). A padding position points at the row's last item (real unless
    the row is empty) and writes -inf there too; an empty row writes column 0's own score back."""
    real = tokens > 0
    nonempty = real.any(dim=1, keepdim=True)  # (B, 1)
    index = torch.where(real, tokens - 1, (tokens[:, -1:] - 1).clamp(min=0))  # (B, L)
    fill = torch.where(nonempty, float("-inf"), scores.gather(1, index))
    return scores.scatter_(1, index, fill.to(scores.dtype))


NO_HISTORIES = (
    "no histories given: pass a list of histories, each a list of item ids (an empty history, [[]], "
    "gets the most popular items)"
)

SCORES_AT_A_TIME = 2**26
"""Scores (histories x items) :meth:`Recommender.recommend` holds at a time (256 MiB of fp32): a batch of
histories is answered a few rows at a time when B x N would be more (the answer is the same)."""

UNRECORDED_MAX_LEN = 200
"""The history kept for an export that records no training ``max_len`` (written before exports
recorded it): the largest ``train.max_len`` of this project's configs (configs/ml-100k.yaml). It bounds
what one history costs: encoding grows with the square of its length."""


class Recommender:
    """A size-m model: the scoring program (trunk + (N + 1, m) item table) and the item catalog.

    Histories are item ids 1..N, oldest first. :meth:`recommend` and :meth:`scores` take either a list of
    histories (any lengths, padded here) or a (B, L) integer tensor left-padded with 0 (padding first,
    as the model was trained). An empty history has nothing to go on: it gets the most popular items of
    the training data (when the export records them); an empty list of histories is refused.

    Only the last :attr:`history_limit` items of a longer history are used, to encode it and to leave
    out of the answer: the training ``max_len`` (the model never saw longer histories, and encoding
    cost grows with the square of the length), or the lower ``history_cap`` if one is set (the service
    sets it to bound a request's cost). ``max_len`` is None for an export that does not record it
    (written before exports did); :data:`UNRECORDED_MAX_LEN` items are kept then.
    """

    def __init__(
        self,
        model: ScoringModel,
        item_ids: list[str] | None = None,
        popularity: torch.Tensor | None = None,
        funnel: Funnel | None = None,
        max_len: int | None = None,
        history_cap: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.item_ids = item_ids
        self.popularity = popularity
        self.funnel = funnel
        for name, value in (("max_len", max_len), ("history_cap", history_cap)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        self.max_len: int | None = max_len
        """The training ``train.max_len`` the export records (None: not recorded)."""
        self.history_cap: int | None = history_cap
        """An optional lower limit on the items of a history used (the service's ``--max-history``)."""
        self._index: PrefixIndex | None = None
        if funnel is not None:
            if funnel.prefix > model.size:
                raise ValueError(f"funnel prefix {funnel.prefix} is larger than the size {model.size}")
            # the items' prefixes, contiguous (N, p): a strided slice would be copied at every query
            self._prefix_table = model.items()[1:, : funnel.prefix].contiguous()
            if funnel.ann:
                self._index = PrefixIndex(model.items(), funnel.prefix)

    @property
    def size(self) -> int:
        return self.model.size

    @property
    def items(self) -> torch.Tensor:
        """The float (N + 1, m) item table."""
        return self.model.items()

    @property
    def num_items(self) -> int:
        return self.model.num_items

    @property
    def history_limit(self) -> int:
        """How many of a history's most recent items are used: ``max_len`` (or
        :data:`UNRECORDED_MAX_LEN`), or ``history_cap`` where that is lower."""
        limit = self.max_len if self.max_len is not None else UNRECORDED_MAX_LEN
        return limit if self.history_cap is None else min(limit, self.history_cap)

    def as_batch(self, histories: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """(B, L) left-padded int64 ids from ``histories`` (checked: ids in 1..N, padding on the left),
        with L at most :attr:`history_limit`: a longer history keeps its most recent items."""
        limit = self.history_limit
        n = self.num_items
        if isinstance(histories, torch.Tensor):
            if histories.ndim != 2 or histories.dtype.is_floating_point or histories.dtype == torch.bool:
                raise ValueError(
                    f"histories must be a (batch, length) integer tensor, got {histories.dtype} of shape "
                    f"{tuple(histories.shape)}"
                )
            if histories.shape[0] == 0:
                raise ValueError(NO_HISTORIES)
            tokens = histories.long()
            bad = (tokens < 0) | (tokens > n)
            if bool(bad.any()):
                row, col = (int(v) for v in bad.nonzero()[0])
                raise ValueError(
                    f"histories[{row}, {col}] = {int(tokens[row, col])}: item ids are 1..{n} (0 is padding)"
                )
            real = tokens > 0
            # left padding: once a row has a real item, no padding follows
            right_padded = (real.int().cummax(dim=1).values.bool() & ~real).any(dim=1)
            if bool(right_padded.any()):
                row = int(right_padded.nonzero()[0])
                raise ValueError(
                    f"histories row {row} has padding (0) after an item: pad on the left (0s first, the most "
                    "recent item last), or pass the histories as lists of ids"
                )
            return tokens[:, -limit:]
        rows = []
        for index, history in enumerate(histories):
            if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
                raise ValueError(
                    f"histories[{index}] must be a sequence of item ids, got {type(history).__name__}"
                )
            for value in history:  # numpy integers are integers too (numbers.Integral)
                if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= n:
                    shown = repr(value) if isinstance(value, str) else str(value)  # 5, not np.int64(5)
                    raise ValueError(f"histories[{index}] holds {shown}: item ids are integers in 1..{n}")
            rows.append([int(value) for value in history][-limit:])
        if not rows:
            raise ValueError(NO_HISTORIES)
        width = max((len(r) for r in rows), default=0)
        tokens = torch.zeros(len(rows), max(width, 1), dtype=torch.int64)
        for index, row in enumerate(rows):
            if row:
                tokens[index, -len(row) :] = torch.tensor(row)
        return tokens

    def _empty_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        empty = ~(tokens > 0).any(dim=1)  # (B,)
        if bool(empty.any()) and self.popularity is None:
            raise ValueError(
                f"histories row {int(empty.nonzero()[0])} is empty and this export records no item "
                "popularity to fall back on: give at least one item"
            )
        return empty

    @torch.no_grad()
    def scores(self, histories: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """(B, N) scores of items 1..N for each history (see :meth:`as_batch`). Rows with an empty history
        get the items' training popularity instead."""
        tokens = self.as_batch(histories)
        empty = self._empty_rows(tokens)
        scores = self.model(tokens)  # (B, N)
        if bool(empty.any()):
            scores[empty] = self.popularity[1:].to(scores.dtype)
        return scores

    @torch.no_grad()
    def recommend(
        self, histories: torch.Tensor | Sequence[Sequence[int]], k: int = 10, exclude_history: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (scores, item ids 1..N), each (B, k). The items of each history are left out unless
        ``exclude_history=False``. With a :class:`Funnel`, the top-k of the re-ranked shortlist."""
        tokens = self.as_batch(histories)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_items:
            raise ValueError(f"k must be an integer in 1..{self.num_items} (the number of items), got {k!r}")
        exclude = exclude_history
        if exclude:
            left = self.num_items - int(distinct_items(tokens).max())
            if k > left:
                raise ValueError(
                    f"k = {k} but a history covers all but {left} of the {self.num_items} items: ask for at "
                    "most that many, or pass exclude_history=False"
                )
        # a few histories at a time: each scores every item (B x N floats), 16 GB for 200 users at 20M items
        rows = max(1, SCORES_AT_A_TIME // self.num_items)
        answers = [self._top_k(tokens[i : i + rows], k, exclude) for i in range(0, tokens.shape[0], rows)]
        if len(answers) == 1:
            return answers[0]
        return torch.cat([a[0] for a in answers]), torch.cat([a[1] for a in answers])

    def _top_k(self, tokens: torch.Tensor, k: int, exclude: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`recommend` of a (b, L) batch of left-padded histories."""
        if self.funnel is not None:
            return self._funnel_top_k(tokens, k, exclude)
        scores = self.scores(tokens)
        if exclude:
            mask_history_(scores, tokens)
        values, index = torch.topk(scores, k, dim=1)
        return values, index + 1

    def _funnel_top_k(self, tokens: torch.Tensor, k: int, exclude: bool) -> tuple[torch.Tensor, torch.Tensor]:
        funnel = self.funnel
        assert funnel is not None
        empty = self._empty_rows(tokens)
        query = self.model.encode(tokens)  # (B, m)
        prefix = query[:, : funnel.prefix]  # (B, p)
        count = min(max(funnel.candidates, k), self.num_items)
        if self._index is not None:
            # ask for enough more that the history's items can be dropped and `count` still remain
            extra = int(distinct_items(tokens).max()) if exclude else 0
            found = self._index.search(prefix, min(count + extra, self.num_items))  # (B, C + extra)
            valid = found >= 1  # faiss answers -1 (here 0) when it finds fewer
            if exclude:
                valid &= ~(found[:, :, None] == tokens[:, None, :]).any(dim=2)  # (B, C + extra)
            # keep the first `count` valid ids per row, in the index's order
            order = torch.argsort((~valid).int(), dim=1, stable=True)[:, :count]
            candidates, valid = found.gather(1, order).clamp(min=1), valid.gather(1, order)
        else:
            short = prefix @ self._prefix_table.T  # (B, N)
            if exclude:
                mask_history_(short, tokens)
            shortlist, index = torch.topk(short, count, dim=1)
            candidates, valid = index + 1, torch.isfinite(shortlist)  # (B, C)
        rows = self.model.item_rows(candidates)  # (B, C, m)
        full = torch.einsum("bm,bcm->bc", query, rows).masked_fill(~valid, float("-inf"))  # (B, C)
        values, order = torch.topk(full, k, dim=1)
        ids = candidates.gather(1, order)
        if bool(empty.any()):
            popular_values, popular = torch.topk(self.popularity[1:], k)
            values[empty], ids[empty] = popular_values.to(values.dtype), popular + 1
        return values, ids

    def source_ids(self, ids: torch.Tensor) -> list[list[str]]:
        """The source-data ids of internal item ids ``ids`` (B, k), e.g. of :meth:`recommend`'s answer."""
        if self.item_ids is None:
            raise ValueError("this export records no source ids (it was written without its data set)")
        return [[self.item_ids[int(i)] for i in row] for row in ids]


def measure_export(
    url: str, storage_options: Mapping[str, Any] | None = None, repeats: int = 30
) -> list[dict[str, Any]]:
    """Cost entries of every size of the export at ``url``, measured here."""
    manifest = read_manifest(url, storage_options)
    if manifest is None:
        raise ExportError(f"{url} has no export.json: not an export")
    catalog = read_catalog(url, manifest, storage_options)
    entries = []
    for size in exported_sizes(manifest):
        export = read_size(url, size, manifest, storage_options)
        model = ScoringModel.from_state(export.config, export.trunk_state, export.items)
        recommender = Recommender(
            model, catalog.item_ids, catalog.popularity, max_len=recorded_max_len(url, manifest)
        )
        entries.append(size_costs(model, recommender.recommend, repeats=repeats))
    return entries


def cost_table(
    url: str, manifest: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The saved cost table of the export (``sizes.json``, if it lists the export's sizes), else one
    measured now (latency and memory only)."""
    fs_url = join(url, COSTS_FILE)
    try:
        saved = json.loads(read_bytes(fs_url, storage_options))
    except ExportError:
        saved = None
    if saved and saved.get("fingerprint") == manifest.get("fingerprint"):
        entries = saved["sizes"]
        if sorted(e["size"] for e in entries) == exported_sizes(manifest):
            return entries
    return measure_export(url, storage_options, repeats=10)


def load_recommender(
    url: str,
    size: int | str = "auto",
    *,
    max_latency_ms: float | None = None,
    max_memory_mb: float | None = None,
    min_ndcg: float | None = None,
    quantised: bool = False,
    funnel: Funnel | None = None,
    history_cap: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Recommender:
    """The recommender of one size of the export at ``url`` (safetensors and JSON only; every file
    checked against the sha256 that export.json records).

    ``size="auto"`` takes the largest size that fits ``max_latency_ms`` (p99 of one user's query),
    ``max_memory_mb`` (model and item table) and ``min_ndcg`` (the test NDCG@10 at that size as served,
    history masked), from the cost table that ``fmrl sizes`` saved beside the export (``sizes.json``),
    or, without one, from latency and memory measured here; an ExportError says why none fits.
    ``history_cap``: use at most that many of a history's most recent items (below the training
    ``max_len`` the export records; see :class:`Recommender`).
    """
    manifest = fmrl_manifest(url, storage_options)
    if size == "auto":
        table = cost_table(url, manifest, storage_options)
        choice = choose_size(table, max_latency_ms, max_memory_mb, min_ndcg, quantised)
        if choice.size is None:
            raise ExportError(f"{url}: {choice.reason}")
        size = choice.size
    export = read_size(url, size, manifest, storage_options)  # type: ignore[arg-type]
    try:
        model = ScoringModel.from_state(export.config, export.trunk_state, export.items, quantised)
    except (RuntimeError, ValueError) as error:
        raise ExportError(
            f"{export.folder}/model.safetensors does not fit {export.folder}/config.json: {error}"
        ) from error
    catalog = read_catalog(url, manifest, storage_options)
    max_len = recorded_max_len(url, manifest)
    return Recommender(model, catalog.item_ids, catalog.popularity, funnel, max_len, history_cap)
