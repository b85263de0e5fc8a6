"""An HTTP JSON recommendation service for one exported size (FastAPI + uvicorn).

    python -m deploy.serve runs/demo/export --size auto --max-latency-ms 5 --port 8000
    fmrl serve runs/demo/export --size 64 [--funnel-prefix 16 --funnel-candidates 200] [--quantised]

    curl -s localhost:8000/recommend -d '{"history": ["item-12", "item-7"], "k": 5}'
    {"items": ["item-93", ...], "ids": [93, ...], "scores": [4.1, ...]}

* ``POST /recommend``: ``{"history": [item ids of the source data, oldest first], "k": 10}`` -> the top-k
  items not in the history, best first, with their scores. Concurrent requests are grouped: a request
  waits at most ``--batch-wait-ms`` for others and up to ``--max-batch`` go through one batched forward.
  At most ``--max-queue`` requests wait; beyond that the answer is 503.
* ``GET /health``: ``{"status": "ok"}`` once the model is loaded.
* ``GET /info``: the size, the number of items, the exported sizes, the run's test quality at this size
  (when ``fmrl sizes`` saved it beside the export) and the serving options.

Unknown item ids, a ``k`` out of range and malformed bodies are answered with 422 and a message. The
process loads torch, the web framework and the export only (no training code).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from deploy.artifact import ExportError, exported_sizes, fmrl_manifest, join, read_bytes
from deploy.costs import COSTS_FILE
from deploy.options import add_arguments
from deploy.recommender import Funnel, Recommender, load_recommender

log = logging.getLogger("fmrl.serve")


class RecommendRequest(BaseModel):
    history: list[str | int] = Field(max_length=10_000)
    """Item ids of the source data (strings as in the export's item_ids.json), oldest first; an export
    without source ids takes internal ids 1..N."""
    k: int = Field(10, ge=1, le=10_000)


class RecommendResponse(BaseModel):
    items: list[str] | None
    ids: list[int]
    scores: list[float]


@dataclass
class _Pending:
    history: list[int]
    k: int
    answer: asyncio.Future


class Batcher:
    """Groups requests that arrive within ``wait_ms`` of the first into one ``recommend`` call of at most
    ``max_batch`` histories; the forward runs in a worker thread so the event loop keeps accepting."""

    def __init__(self, recommender: Recommender, max_batch: int, wait_ms: float, max_queue: int) -> None:
        self.recommender = recommender
        self.max_batch, self.wait_s = max_batch, wait_ms / 1000
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=max_queue)
        self.batches = 0
        self.requests = 0

    async def submit(self, history: list[int], k: int) -> tuple[list[int], list[float]]:
        pending = _Pending(history, k, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise HTTPException(503, f"the service is busy ({self.queue.maxsize} requests waiting)") from None
        return await pending.answer

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            group = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while len(group) < self.max_batch:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    group.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            results = await loop.run_in_executor(None, self._answer, group)
            self.batches += 1
            self.requests += len(group)
            for pending, result in zip(group, results):
                if pending.answer.done():
                    continue
                if isinstance(result, Exception):
                    pending.answer.set_exception(result)
                else:
                    pending.answer.set_result(result)

    def _answer(self, group: Sequence[_Pending]) -> list[tuple[list[int], list[float]] | Exception]:
        """One batched forward for the group; if it is refused (one bad request), each on its own, so
        that only the bad request gets the error."""
        k = max(p.k for p in group)
        try:
            scores, ids = self.recommender.recommend([p.history for p in group], k=k)
            return [(ids[i, : p.k].tolist(), scores[i, : p.k].tolist()) for i, p in enumerate(group)]
        except ValueError:
            if len(group) == 1:
                return [_one(self.recommender, group[0])]
            return [_one(self.recommender, p) for p in group]


def _one(recommender: Recommender, pending: _Pending) -> tuple[list[int], list[float]] | Exception:
    try:
        scores, ids = recommender.recommend([pending.history], k=pending.k)
        return ids[0].tolist(), scores[0].tolist()
    except ValueError as error:
        return HTTPException(422, str(error))


def create_app(
    recommender: Recommender,
    info: dict[str, Any],
    max_batch: int = 64,
    batch_wait_ms: float = 2.0,
    max_queue: int = 1024,
) -> FastAPI:
    """The service of ``recommender``; ``info`` is what ``GET /info`` answers (plus batching counts)."""
    batcher = Batcher(recommender, max_batch, batch_wait_ms, max_queue)
    source_to_id = {source: i for i, source in enumerate(recommender.item_ids or []) if i > 0}
    worker: list[asyncio.Task] = []

    async def lifespan(app: FastAPI):
        worker.append(asyncio.create_task(batcher.run()))
        yield
        worker[0].cancel()

    app = FastAPI(title="fmrl recommendations", lifespan=lifespan)

    def internal_ids(history: list[str | int]) -> list[int]:
        if source_to_id:
            unknown = [value for value in history if str(value) not in source_to_id]
            if unknown:
                raise HTTPException(422, f"unknown item ids {unknown[:10]}: not in the export's catalog")
            return [source_to_id[str(value)] for value in history]
        bad = [v for v in history if isinstance(v, str) or not 1 <= v <= recommender.num_items]
        if bad:
            raise HTTPException(
                422,
                f"unknown item ids {bad[:10]}: this export has no catalog; ids are 1..{recommender.num_items}",
            )
        return [int(v) for v in history]

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    async def get_info() -> dict[str, Any]:
        return {**info, "batches": batcher.batches, "requests": batcher.requests}

    @app.post("/recommend")
    async def recommend(request: RecommendRequest) -> RecommendResponse:
        history = internal_ids(request.history)
        if request.k > recommender.num_items:
            raise HTTPException(422, f"k = {request.k} but the catalog has {recommender.num_items} items")
        ids, scores = await batcher.submit(history, request.k)
        items = [recommender.item_ids[i] for i in ids] if recommender.item_ids else None
        return RecommendResponse(items=items, ids=ids, scores=scores)

    return app


def service_info(
    url: str, recommender: Recommender, quantised: bool, funnel: Funnel | None
) -> dict[str, Any]:
    """What ``/info`` reports: size, items, sizes, quality at this size (from the saved cost table)."""
    manifest = fmrl_manifest(url)
    quality = None
    try:
        saved = json.loads(read_bytes(join(url, COSTS_FILE)))
        entry = next((e for e in saved["sizes"] if e["size"] == recommender.size), None)
        if saved.get("fingerprint") == manifest.get("fingerprint") and entry:
            quality = entry.get("quality")
    except (ExportError, ValueError, KeyError):
        pass
    return {
        "size": recommender.size,
        "num_items": recommender.num_items,
        "sizes": exported_sizes(manifest),
        "quality": quality,
        "quantised": quantised,
        "funnel": None if funnel is None else dataclasses.asdict(funnel),
    }


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="fmrl serve", description="Serve recommendations of an export.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size: int | str = (
        args.size if args.size == "auto" else int(args.size) if args.size.isdigit() else args.size
    )
    funnel = None
    if args.funnel_prefix:
        funnel = Funnel(args.funnel_prefix, args.funnel_candidates, args.ann)
    try:
        recommender = load_recommender(
            args.export,
            size,
            max_latency_ms=args.max_latency_ms,
            max_memory_mb=args.max_memory_mb,
            min_ndcg=args.min_ndcg,
            quantised=args.quantised,
            funnel=funnel,
        )
    except ValueError as error:
        print(f"fmrl serve: {error}", file=sys.stderr)
        return 2
    info = service_info(args.export, recommender, args.quantised, funnel)
    app = create_app(recommender, info, args.max_batch, args.batch_wait_ms, args.max_queue)
    print(
        f"fmrl serve: size {recommender.size}, {recommender.num_items} items, http://{args.host}:{args.port}"
    )
    sys.stdout.flush()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
