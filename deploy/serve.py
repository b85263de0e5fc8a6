"""An HTTP JSON recommendation service for one exported size (FastAPI + uvicorn).

    python -m deploy.serve runs/demo/export --size auto --max-latency-ms 5 --port 8000
    fmrl serve runs/demo/export --size 64 [--funnel-prefix 16 --funnel-candidates 200] [--quantised]

    curl -s localhost:8000/recommend -H 'Content-Type: application/json' \\
        -d '{"history": ["item-12", "item-7"], "k": 5}'
    {"items": ["item-93", ...], "ids": [93, ...], "scores": [4.1, ...], "history_used": 2, "history_dropped": 0}

* ``POST /recommend``: ``{"history": [item ids of the source data, oldest first], "k": 10}`` -> the top-k
  items not in the (used) history, best first, with their scores. Only the last ``--max-history`` items
  (default: the training max_len the export records) are used; ``history_used`` and
  ``history_dropped`` say how many. Concurrent requests are grouped: a request waits at most
  ``--batch-wait-ms`` for others and up to ``--max-batch`` go through one batched forward. At most
  ``--max-queue`` requests wait (then 503); one not answered within ``--request-timeout-s`` gets 504.
* ``GET /health`` (liveness): ``{"status": "ok"}`` while the batching task runs and no forward has
  outlasted the request timeout; 503 otherwise.
* ``GET /ready`` (readiness): 200 once a real recommendation went through the batcher; 503 while
  draining or when it fails.
* ``GET /info``: the size, the number of items, the exported sizes, the test quality at this size as served
  (when ``fmrl sizes`` saved it beside the export), the history cap and the serving options.

Bodies are strict JSON (no coercion: ``"k": "10"``, ``true``, NaN and infinities are refused) of at most
``--max-body-bytes`` (then 413); unknown item ids, a ``k`` out of range and malformed bodies get 422 with
a message. A failure of the model fails only the requests it was computing (500 with a message, the
traceback in the log); the batcher goes on. SIGTERM drains: new requests are refused, those in flight
are answered, and the process exits within ``--drain-timeout-s`` even if a forward is stuck. The process
loads torch, the web framework and the export only (no training code).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, TypeVar

import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deploy.artifact import ExportError, exported_sizes, fmrl_manifest, join, read_bytes
from deploy.costs import COSTS_FILE, quality_report
from deploy.options import ServiceOptions, add_arguments
from deploy.recommender import Funnel, Recommender, load_recommender

log = logging.getLogger("fmrl.serve")

MAX_HISTORY_IDS = 10_000
"""The most ids a request may send; only the last ``Recommender.history_limit`` of them are used."""
T = TypeVar("T")


class RecommendRequest(BaseModel):
    """The body of ``POST /recommend``: strict (a string is not an integer, nor is ``true``), no extra keys."""

    model_config = ConfigDict(strict=True, extra="forbid")

    history: list[str | int] = Field(max_length=MAX_HISTORY_IDS)
    """Item ids of the source data (strings as in the export's item_ids.json), oldest first; an export
    without source ids takes internal ids 1..N."""
    k: int = Field(10, ge=1, le=10_000)


class RecommendResponse(BaseModel):
    items: list[str] | None
    ids: list[int]
    scores: list[float]
    history_used: int
    """How many of the history's most recent items the model read."""
    history_dropped: int
    """How many older items were left out (the history was longer than the cap)."""


@dataclass
class _Pending:
    history: list[int]
    k: int
    answer: asyncio.Future


def _in_daemon_thread(function: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """Run ``function(*args)`` in a daemon thread; the future settles on the calling loop. A daemon
    thread (not an executor's) so that a stuck forward never holds the process at exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def work() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (function(*args), None)
        except BaseException as error:  # handed to the awaiting task, which logs it
            outcome = (None, error)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop closed meanwhile (the process is exiting)
            pass

    threading.Thread(target=work, name="fmrl-serve-forward", daemon=True).start()
    return future


class Batcher:
    """Groups requests that arrive within ``wait_ms`` of the first into one ``recommend`` call of at most
    ``max_batch`` histories; the forward runs in a worker thread so the event loop keeps accepting. Any
    failure fails only the requests it was computing; the loop itself never ends but by cancellation."""

    def __init__(self, recommender: Recommender, max_batch: int, wait_ms: float, max_queue: int) -> None:
        self.recommender = recommender
        self.max_batch, self.wait_s = max_batch, wait_ms / 1000
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=max_queue)
        self.batches = 0
        self.requests = 0
        self.model_failures = 0
        self.task: asyncio.Task | None = None
        self.busy_since: float | None = None
        """Loop time at which the running forward began (None when idle)."""
        self.draining = False

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run(), name="fmrl-serve-batcher")

    def stop(self) -> None:
        """Cancel the loop and fail every request still queued (503)."""
        if self.task is not None:
            self.task.cancel()
        while not self.queue.empty():
            pending = self.queue.get_nowait()
            if not pending.answer.done():
                pending.answer.set_exception(HTTPException(503, "the service is shutting down"))

    def busy_s(self) -> float:
        """How long the running forward has taken so far (0 when idle)."""
        return 0.0 if self.busy_since is None else asyncio.get_running_loop().time() - self.busy_since

    def down_reason(self, stuck_after_s: float) -> str | None:
        """Why the batcher cannot answer (None when it can): its task ended, or one forward has run for
        more than ``stuck_after_s``."""
        if self.task is None or self.task.done():
            return "the batching task is not running"
        if self.busy_s() > stuck_after_s:
            return f"one forward has been running for {self.busy_s():.0f} s"
        return None

    async def submit(
        self, history: list[int], k: int, timeout_s: float | None = None
    ) -> tuple[list[int], list[float]]:
        """The top-k (ids, scores) of ``history``; HTTPException 503 when draining or the queue is full,
        504 after ``timeout_s`` (the request leaves the queue if it is still waiting there)."""
        if self.draining:
            raise HTTPException(503, "the service is shutting down")
        pending = _Pending(history, k, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise HTTPException(503, f"the service is busy ({self.queue.maxsize} requests waiting)") from None
        try:
            # on timeout wait_for cancels the answer: the loop then skips the request if still queued
            return await asyncio.wait_for(pending.answer, timeout_s)
        except TimeoutError:
            raise HTTPException(
                504, f"no answer within {timeout_s:g} s (--request-timeout-s); the request was dropped"
            ) from None

    async def _next_group(self) -> list[_Pending]:
        """Up to ``max_batch`` waiting requests: the first one, then those arriving within ``wait_s``."""
        loop = asyncio.get_running_loop()
        group = [await self.queue.get()]
        deadline = loop.time() + self.wait_s
        while len(group) < self.max_batch and not self.draining:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                group.append(await asyncio.wait_for(self.queue.get(), left))
            except TimeoutError:
                break
        return [pending for pending in group if not pending.answer.done()]  # timed out meanwhile

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            group = await self._next_group()
            if not group:
                continue
            self.busy_since = loop.time()
            try:
                results = await _in_daemon_thread(self._answer, group)
            except Exception as error:  # _answer handles the model's failures: this is a bug of ours
                log.exception("the batch of %d requests failed", len(group))
                results = [_server_error(error)] * len(group)
            finally:
                self.busy_since = None
            self.batches += 1
            self.requests += len(group)
            for pending, result in zip(group, results):
                if pending.answer.done():  # timed out while computing
                    continue
                if isinstance(result, Exception):
                    pending.answer.set_exception(result)
                else:
                    pending.answer.set_result(result)

    def _answer(self, group: Sequence[_Pending]) -> list[tuple[list[int], list[float]] | Exception]:
        """One batched forward for the group; if it fails (one bad or too costly request), each on its
        own, so that only the failing request gets the error."""
        k = max(p.k for p in group)
        try:
            scores, ids = self.recommender.recommend([p.history for p in group], k=k)
            return [(ids[i, : p.k].tolist(), scores[i, : p.k].tolist()) for i, p in enumerate(group)]
        except Exception as error:
            if len(group) == 1:
                return [self._failure(error, 1)]
            log.warning("a batch of %d requests failed (%s); answering each on its own", len(group), error)
            return [self._one(p) for p in group]

    def _one(self, pending: _Pending) -> tuple[list[int], list[float]] | Exception:
        try:
            scores, ids = self.recommender.recommend([pending.history], k=pending.k)
            return ids[0].tolist(), scores[0].tolist()
        except Exception as error:
            return self._failure(error, 1)

    def _failure(self, error: Exception, requests: int) -> HTTPException:
        """422 for a request the recommender refuses (ValueError), 500 (logged with its traceback) for a
        failure of the model itself."""
        if isinstance(error, ValueError):
            return HTTPException(422, str(error))
        self.model_failures += 1
        log.error("the model failed on a batch of %d request(s)", requests, exc_info=error)
        return _server_error(error)


def _server_error(error: BaseException) -> HTTPException:
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    return HTTPException(500, f"the model failed on this request: {type(error).__name__}: {first_line}")


def _validation_message(error: ValidationError) -> str:
    """One line of the body's problems, without echoing the values (a NaN cannot even be put in JSON)."""
    problems: dict[str, str] = {}
    for item in error.errors(include_url=False, include_input=False):
        loc, message = list(item["loc"]), item["msg"]
        if len(loc) > 1 and loc[-1] in ("str", "int"):  # the two branches of an item id (str | int)
            loc, message = loc[:-1], "Input should be an item id (a string or an integer)"
        problems.setdefault(".".join(str(part) for part in loc) or "body", message)
    return "; ".join(f"{where}: {message}" for where, message in list(problems.items())[:5])


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes (declared or streamed)."""
    too_large = HTTPException(413, f"the body is larger than {limit} bytes (--max-body-bytes)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def parse_request(body: bytes, content_type: str | None) -> RecommendRequest:
    """The strict request of ``body`` (JSON whatever the declared content type, so that ``curl -d``
    works); HTTPException 422 with a one-line message otherwise."""
    try:
        return RecommendRequest.model_validate_json(body)
    except ValidationError as error:
        message = _validation_message(error)
        if "json" not in (content_type or "").lower() and any(
            e["type"] == "json_invalid" for e in error.errors()
        ):
            message += " (send a JSON body with Content-Type: application/json)"
        raise HTTPException(422, message) from None


_RECOMMEND_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": RecommendRequest.model_json_schema()}},
    }
}


def create_app(
    recommender: Recommender, info: dict[str, Any], options: ServiceOptions | None = None
) -> FastAPI:
    """The service of ``recommender``; ``info`` is what ``GET /info`` answers (plus the history cap and
    batching counts)."""
    options = options or ServiceOptions()
    batcher = Batcher(recommender, options.max_batch, options.batch_wait_ms, options.max_queue)
    source_to_id = {source: i for i, source in enumerate(recommender.item_ids or []) if i > 0}
    cap = recommender.history_limit  # the training max_len, or the lower --max-history
    timeout_s = options.request_timeout_s

    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="fmrl recommendations", lifespan=lifespan)
    app.state.batcher = batcher

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
    async def health() -> JSONResponse:
        reason = batcher.down_reason(stuck_after_s=timeout_s)
        if reason is None:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "down", "reason": reason}, status_code=503)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if batcher.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        try:  # a real recommendation through the batcher: the model, the worker thread, the loop
            await batcher.submit([1], 1, timeout_s)
        except HTTPException as error:
            return JSONResponse({"status": "not ready", "reason": error.detail}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/info")
    async def get_info() -> dict[str, Any]:
        return {
            **info,
            "history_limit": cap,
            "max_len": recommender.max_len,
            "options": dataclasses.asdict(options),
            "batches": batcher.batches,
            "requests": batcher.requests,
            "model_failures": batcher.model_failures,
        }

    @app.post("/recommend", openapi_extra=_RECOMMEND_BODY)
    async def recommend(request: Request) -> RecommendResponse:
        body = await _read_body(request, options.max_body_bytes)
        query = parse_request(body, request.headers.get("content-type"))
        history = internal_ids(query.history)
        if query.k > recommender.num_items:
            raise HTTPException(422, f"k = {query.k} but the catalog has {recommender.num_items} items")
        used = history[-cap:]
        ids, scores = await batcher.submit(used, query.k, timeout_s)
        items = [recommender.item_ids[i] for i in ids] if recommender.item_ids else None
        return RecommendResponse(
            items=items,
            ids=ids,
            scores=scores,
            history_used=len(used),
            history_dropped=len(history) - len(used),
        )

    return app


def service_info(
    url: str, recommender: Recommender, quantised: bool, funnel: Funnel | None
) -> dict[str, Any]:
    """What ``/info`` reports: size, items, sizes, quality at this size (from the saved cost table: as
    served and the run's own, :func:`deploy.costs.quality_report`)."""
    manifest = fmrl_manifest(url)
    quality = None
    try:
        saved = json.loads(read_bytes(join(url, COSTS_FILE)))
        entry = next((e for e in saved["sizes"] if e["size"] == recommender.size), None)
        if saved.get("fingerprint") == manifest.get("fingerprint") and entry:
            quality = quality_report(entry)
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


class _DrainingServer(uvicorn.Server):
    """uvicorn, which on SIGTERM/SIGINT stops accepting and finishes the requests in flight (at most
    ``timeout_graceful_shutdown``); the batcher refuses new requests from the signal on."""

    def __init__(self, config: uvicorn.Config, batcher: Batcher) -> None:
        super().__init__(config)
        self.batcher = batcher

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.batcher.draining:
            log.warning(
                "signal %d: draining (new requests refused, at most %g s)",
                sig,
                self.config.timeout_graceful_shutdown,
            )
        self.batcher.draining = True
        super().handle_exit(sig, frame)


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` (not yet listening: connections are refused until the model
    is loaded); ValueError naming the address if it cannot be bound."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        sock.bind((host, port))
    except OSError as error:
        reason = error.strerror or str(error)
        raise ValueError(f"cannot listen on {host}:{port} (--host, --port): {reason.lower()}") from None
    return sock


def serve(app: FastAPI, sock: socket.socket, drain_timeout_s: float) -> None:
    """Run ``app`` on the bound ``sock`` until SIGTERM or SIGINT, then drain for at most
    ``drain_timeout_s``. uvicorn re-raises the signal at the end: the process ends as that signal says."""
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=drain_timeout_s)
    _DrainingServer(config, app.state.batcher).run(sockets=[sock])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fmrl serve", description="Serve recommendations of an export.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    size: int | str = (
        args.size if args.size == "auto" else int(args.size) if args.size.isdigit() else args.size
    )
    options = ServiceOptions.of(args)
    funnel = None
    try:
        sock = listening_socket(args.host, args.port)  # before the model: a busy port fails in a second
        if args.funnel_prefix:
            funnel = Funnel(args.funnel_prefix, args.funnel_candidates, args.ann)
        recommender = load_recommender(
            args.export,
            size,
            max_latency_ms=args.max_latency_ms,
            max_memory_mb=args.max_memory_mb,
            min_ndcg=args.min_ndcg,
            quantised=args.quantised,
            funnel=funnel,
            history_cap=args.max_history,
        )
    except ValueError as error:
        print(f"fmrl serve: {error}", file=sys.stderr)
        return 2
    info = service_info(args.export, recommender, args.quantised, funnel)
    app = create_app(recommender, info, options)
    host, port = sock.getsockname()[:2]
    print(
        f"fmrl serve: size {recommender.size}, {recommender.num_items} items, histories cut to their last "
        f"{recommender.history_limit} items, http://{host}:{port}"
    )
    sys.stdout.flush()
    try:
        serve(app, sock, options.drain_timeout_s)
    except KeyboardInterrupt:  # Ctrl-C, re-raised by uvicorn once drained: end as the shell expects
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
