"""The command line of the service (``fmrl serve``, ``python -m deploy.serve``): argparse only, so that
``fmrl`` can list it without importing the web framework."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceOptions:
    """How the service batches, bounds and drains requests (the defaults are the command line's)."""

    max_batch: int = 64
    batch_wait_ms: float = 2.0
    max_queue: int = 1024
    request_timeout_s: float = 10.0
    max_body_bytes: int = 1_048_576
    drain_timeout_s: float = 10.0

    @classmethod
    def of(cls, args: argparse.Namespace) -> ServiceOptions:
        """The options parsed by :func:`add_arguments`."""
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__})


def _bounded(kind: type, low: float, high: float | None = None) -> Callable[[str], float]:
    """An argparse type: ``kind`` (int or float) in ``low``..``high``; anything else is a usage error
    (one line, exit 2) instead of a traceback later."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}"
            ) from None
        if not (low <= value < float("inf") and (high is None or value <= high)):  # NaN fails too
            bound = f"in {low:g}..{high:g}" if high is not None else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {bound}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fmrl serve`` and ``python -m deploy.serve``."""
    parser.add_argument("export", help="export folder (local or s3://; `fmrl export` writes it)")
    parser.add_argument(
        "--size", default="auto", help="a size of the export, or auto (the largest that fits)"
    )
    parser.add_argument("--max-latency-ms", type=float, help="auto: p99 latency budget of one query")
    parser.add_argument("--max-memory-mb", type=float, help="auto: memory budget (trunk + item table)")
    parser.add_argument("--min-ndcg", type=float, help="auto: the least test NDCG@10 accepted")
    parser.add_argument("--quantised", action="store_true", help="hold the item table in int8 (row-wise)")
    parser.add_argument("--funnel-prefix", type=int, help="shortlist with this prefix size, re-rank in full")
    parser.add_argument("--funnel-candidates", type=int, default=200, help="shortlist length of the funnel")
    parser.add_argument("--ann", action="store_true", help="shortlist through a faiss HNSW index")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback by default)")
    parser.add_argument("--port", type=_bounded(int, 1, 65535), default=8000, help="TCP port to listen on")
    parser.add_argument(
        "--max-batch",
        type=_bounded(int, 1),
        default=ServiceOptions.max_batch,
        help="most requests in one batched forward",
    )
    parser.add_argument(
        "--batch-wait-ms",
        type=_bounded(float, 0),
        default=ServiceOptions.batch_wait_ms,
        help="how long a request waits for others",
    )
    parser.add_argument(
        "--max-queue",
        type=_bounded(int, 1),
        default=ServiceOptions.max_queue,
        help="most waiting requests (then 503)",
    )
    parser.add_argument(
        "--max-history",
        type=_bounded(int, 1),
        help="use at most the last N items of a history (default and upper bound: the training max_len "
        "the export records)",
    )
    parser.add_argument(
        "--request-timeout-s",
        type=_bounded(float, 0.001),
        default=ServiceOptions.request_timeout_s,
        help="answer 504 to a request not answered within this time (dropped if still queued)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=_bounded(int, 64),
        default=ServiceOptions.max_body_bytes,
        help="refuse larger request bodies with 413",
    )
    parser.add_argument(
        "--drain-timeout-s",
        type=_bounded(float, 0),
        default=ServiceOptions.drain_timeout_s,
        help="on SIGTERM: how long in-flight requests may take before the process exits anyway",
    )
    parser.add_argument(
        "--threads", type=_bounded(int, 0), default=0, help="torch threads (0: torch's default)"
    )


def argv_of(args: argparse.Namespace) -> list[str]:
    """``args`` (parsed by :func:`add_arguments`) back as a command line of this module."""
    argv = [args.export]
    for name in (
        "size",
        "max_latency_ms",
        "max_memory_mb",
        "min_ndcg",
        "funnel_prefix",
        "funnel_candidates",
        "host",
        "port",
        "max_batch",
        "batch_wait_ms",
        "max_queue",
        "max_history",
        "request_timeout_s",
        "max_body_bytes",
        "drain_timeout_s",
        "threads",
    ):
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    argv += [f"--{flag}" for flag in ("quantised", "ann") if getattr(args, flag)]
    return argv
