"""Loopback load test of `fmrl serve` under abuse: latency of normal requests alone, then with long-history
and bad requests mixed in; the record goes to bench/results/serve/, the table into docs/deploy.md.

    .venv/bin/python bench/serve_load.py runs/demo/export [--size 128] [--clients 4 --seconds 10]
    .venv/bin/python bench/serve_load.py --make-export runs/bench/serve-export   # untrained, demo-shaped
    .venv/bin/python bench/serve_load.py --report-only                           # the table from the record

One service process (``python -m deploy.serve``, one torch thread; started as bench/serve.py does) on a
free port of 127.0.0.1. Phase "alone": ``--clients`` threads post 20-item histories (k = 10) for
``--seconds``. Phase "mixed": the same clients, plus one client posting 10,000-item histories (the most a
request may hold; the service uses their last max_len items) and one posting bad requests (NaN and
string k, unknown ids, a body over the size limit, a body that is not JSON), for ``--seconds`` again.
Every client stops after ``--max-requests`` requests. The record keeps each phase's normal-request
p50/p99, the long requests' latencies and every status code seen, with the machine and the date; the
table is written from the record alone (``--no-write``: print only).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from collections import Counter

import httpx

# bench/, the script's folder, is on sys.path
from serve import start_service
from trunk import machine, write_json, write_section

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from deploy.costs import percentile  # noqa: E402

RESULTS = os.path.join(HERE, "results", "serve")
RECORD = os.path.join(RESULTS, "load.json")
BEGIN, END = "<!-- bench/serve_load.py:begin -->", "<!-- bench/serve_load.py:end -->"
NORMAL_LENGTH = 20
LONG_LENGTH = 10_000


def bad_bodies(item_ids: list[str]) -> list[tuple[str, bytes, str]]:
    """(what, body, content type) of the bad requests, tried in turn."""
    history = json.dumps(item_ids[1:4])
    return [
        ("k NaN", f'{{"history": {history}, "k": NaN}}'.encode(), "application/json"),
        ("k as a string", f'{{"history": {history}, "k": "10"}}'.encode(), "application/json"),
        ("unknown ids", b'{"history": ["no-such-item", "nor-this"], "k": 10}', "application/json"),
        (
            "2 MB body",
            json.dumps({"history": item_ids[1:4], "pad": "x" * 2_000_000}).encode(),
            "application/json",
        ),
        ("not JSON", b"history=1,2,3&k=10", "application/x-www-form-urlencoded"),
    ]


def client(
    url: str, bodies: list[tuple[bytes, str]], stop: float, max_requests: int, seen: list[tuple[int, float]]
) -> None:
    """Post ``bodies`` in turn until ``stop`` (monotonic) or ``max_requests``; append (status, ms)."""
    with httpx.Client(timeout=60) as session:
        for count in range(max_requests):
            if time.monotonic() >= stop:
                return
            body, content_type = bodies[count % len(bodies)]
            start = time.perf_counter()
            try:
                status = session.post(
                    f"{url}/recommend", content=body, headers={"content-type": content_type}
                ).status_code
            except httpx.HTTPError:
                status = 0  # no answer at all
            seen.append((status, (time.perf_counter() - start) * 1000))


def phase(url: str, item_ids: list[str], args: argparse.Namespace, mixed: bool) -> dict:
    """One phase: normal clients (and, if ``mixed``, a long and a bad client) for ``args.seconds``."""
    rng = random.Random(0)
    normal = [
        [
            (
                json.dumps({"history": rng.sample(item_ids[1:], NORMAL_LENGTH), "k": 10}).encode(),
                "application/json",
            )
        ]
        for _ in range(50)
    ]
    kinds = {
        f"normal-{i}": [b for batch in normal[i :: args.clients] for b in batch] for i in range(args.clients)
    }
    if mixed:
        long_bodies = [
            (
                json.dumps({"history": rng.choices(item_ids[1:], k=LONG_LENGTH), "k": 10}).encode(),
                "application/json",
            )
            for _ in range(3)
        ]
        kinds["long"] = long_bodies
        kinds["bad"] = [(body, content_type) for _, body, content_type in bad_bodies(item_ids)]
    seen: dict[str, list[tuple[int, float]]] = {name: [] for name in kinds}
    stop = time.monotonic() + args.seconds
    threads = [
        threading.Thread(target=client, args=(url, bodies, stop, args.max_requests, seen[name]))
        for name, bodies in kinds.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    normal_seen = [s for name, values in seen.items() if name.startswith("normal") for s in values]
    ok = [ms for status, ms in normal_seen if status == 200]
    result = {
        "normal": {
            "requests": len(normal_seen),
            "ok": len(ok),
            "p50_ms": percentile(ok, 50) if ok else None,
            "p99_ms": percentile(ok, 99) if ok else None,
            "statuses": dict(Counter(str(status) for status, _ in normal_seen)),
        }
    }
    for name in ("long", "bad"):
        if name in seen:
            values = seen[name]
            result[name] = {
                "requests": len(values),
                "p50_ms": percentile([ms for _, ms in values], 50) if values else None,
                "statuses": dict(Counter(str(status) for status, _ in values)),
            }
    return result


def make_export(out: str) -> str:
    """An untrained export of the demo's shape (sizes 8..128, 2 LRU blocks, 2,000 items, max_len 50):
    latency does not depend on training."""
    import torch

    from models.fmrl import FMRLConfig, FMRLRec
    from trainer.export import ItemCatalog, export_model

    torch.manual_seed(0)
    num_items = 2000
    cfg = FMRLConfig(nested_sizes=[8, 16, 32, 64, 128], num_blocks=2, use_id_embedding=True)
    text, image = torch.randn(num_items + 1, 64), torch.randn(num_items + 1, 48)
    text[0] = image[0] = 0
    model = FMRLRec(cfg, num_items, text_features=text, image_features=image).eval()
    popularity = torch.rand(num_items + 1)
    popularity[0] = 0
    catalog = ItemCatalog([""] + [f"item-{i}" for i in range(1, num_items + 1)], popularity)
    export_model(model, out, [128], catalog=catalog, overwrite=True, max_len=50)
    return out


def render(record: dict) -> str:
    """The table of ``record`` (docs/deploy.md section, markers included)."""
    s = record["settings"]
    lines = [
        BEGIN,
        f"Command: `{record['command']}`  ",
        f"Machine: {record['machine']}, load average {record['load_average']:.1f} at the end (shared)  ",
        f"Date: {record['date']}",
        "",
        f"Size {record['size']}, {record['num_items']} items, histories cut to {record['history_limit']} items; "
        f"{s['clients']} normal clients ({NORMAL_LENGTH}-item histories, k = 10) for {s['seconds']:g} s per "
        f"phase; mixed: plus one client posting {LONG_LENGTH:,}-item histories and one posting bad requests.",
        "",
        "| phase | normal requests | normal p50 ms | normal p99 ms | normal errors | long requests (p50 ms) "
        "| bad requests: statuses |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for name in ("alone", "mixed"):
        r = record["phases"][name]
        n = r["normal"]
        long = f"{r['long']['requests']} ({r['long']['p50_ms']:.1f})" if "long" in r else "-"
        bad = ", ".join(f"{k}: {v}" for k, v in sorted(r["bad"]["statuses"].items())) if "bad" in r else "-"
        lines.append(
            f"| {name} | {n['requests']} | {n['p50_ms']:.1f} | {n['p99_ms']:.1f} | {n['requests'] - n['ok']} "
            f"| {long} | {bad} |"
        )
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("export", nargs="?", help="export folder (local)")
    parser.add_argument(
        "--make-export", metavar="DIR", help="write an untrained demo-shaped export there and use it"
    )
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--max-requests", type=int, default=5000, help="per client and phase")
    parser.add_argument("--report-only", action="store_true", help="write the table from the record")
    parser.add_argument("--record", default=RECORD, help="where the record goes")
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "deploy.md"))
    parser.add_argument("--no-write", action="store_true", help="print only (no record, no table)")
    args = parser.parse_args(argv)
    if args.report_only:
        record = json.load(open(args.record))
    else:
        export = make_export(args.make_export) if args.make_export else args.export
        if export is None:
            parser.error("give an export folder or --make-export DIR")
        item_ids = json.load(open(os.path.join(export, "item_ids.json")))
        process, url = start_service(export, args.size, [])
        try:
            phases = {"alone": phase(url, item_ids, args, False), "mixed": phase(url, item_ids, args, True)}
            info = httpx.get(f"{url}/info").json()
            alive = httpx.get(f"{url}/health").status_code == 200
        finally:
            process.terminate()
            process.wait(timeout=30)
        record = {
            "command": "python bench/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine(),
            "date": time.strftime("%Y-%m-%d"),
            "load_average": os.getloadavg()[0],
            "size": info["size"],
            "num_items": info["num_items"],
            "history_limit": info["history_limit"],
            "settings": {"clients": args.clients, "seconds": args.seconds, "max_requests": args.max_requests},
            "phases": phases,
            "healthy_after": alive,
        }
        print(json.dumps(record, indent=1))
        if not args.no_write:
            os.makedirs(os.path.dirname(args.record), exist_ok=True)
            write_json(args.record, record)
    section = render(record)
    print(section)
    if not args.no_write:
        write_section(args.output, section, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
