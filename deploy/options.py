"""The command line of the service (``fmrl serve``, ``python -m deploy.serve``): argparse only, so that
``fmrl`` can list it without importing the web framework."""

from __future__ import annotations

import argparse


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
    parser.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    parser.add_argument("--max-batch", type=int, default=64, help="most requests in one batched forward")
    parser.add_argument(
        "--batch-wait-ms", type=float, default=2.0, help="how long a request waits for others"
    )
    parser.add_argument("--max-queue", type=int, default=1024, help="most waiting requests (then 503)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


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
        "threads",
    ):
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    argv += [f"--{flag}" for flag in ("quantised", "ann") if getattr(args, flag)]
    return argv
