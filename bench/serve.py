"""Loopback load test of `fmrl serve`: requests/s and latency p50/p99 per exported size.

    .venv/bin/python bench/serve.py runs/demo/export [--sizes 8,32,128] [--clients 8 --seconds 5] [--write]

For each size a service process (``python -m deploy.serve``, one torch thread) is started on a free port
of 127.0.0.1; ``--clients`` concurrent clients post random 20-item histories for ``--seconds`` each
(bounded: nothing leaves the machine); the service is stopped afterwards. ``--write`` puts the table
into docs/deploy.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import subprocess
import sys
import threading
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from deploy.costs import percentile  # noqa: E402

BEGIN, END = "<!-- bench/serve.py:begin -->", "<!-- bench/serve.py:end -->"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(export: str, size: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": REPO}
    command = [sys.executable, "-m", "deploy.serve", export, "--size", str(size), "--port", str(port)]
    process = subprocess.Popen([*command, "--threads", "1", *extra], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service of size {size} exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the service of size {size} did not answer /health")


def load(url: str, item_ids: list[str], clients: int, seconds: float, k: int) -> dict[str, float]:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=30) as session:
            while time.monotonic() < stop:
                body = {"history": rng.sample(item_ids[1:], 20), "k": k}
                start = time.perf_counter()
                response = session.post(f"{url}/recommend", json=body)
                elapsed = (time.perf_counter() - start) * 1000
                with lock:
                    if response.status_code == 200:
                        latencies.append(elapsed)
                    else:
                        errors[0] += 1

    began = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - began
    info = httpx.get(f"{url}/info").json()
    return {
        "requests": len(latencies),
        "errors": errors[0],
        "requests_per_s": len(latencies) / wall,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "mean_batch": info["requests"] / max(info["batches"], 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("--sizes", help="comma-separated sizes (default: all exported)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--write", action="store_true", help="put the table into docs/deploy.md")
    parser.add_argument("service_options", nargs="*", help="passed to the service, e.g. -- --quantised")
    args = parser.parse_args(argv)
    manifest = json.load(open(os.path.join(args.export, "export.json")))
    item_ids = json.load(open(os.path.join(args.export, "item_ids.json")))
    sizes = (
        [int(s) for s in args.sizes.split(",")] if args.sizes else sorted(int(s) for s in manifest["sizes"])
    )
    rows = []
    for size in sizes:
        process, url = start_service(args.export, size, args.service_options)
        try:
            result = load(url, item_ids, args.clients, args.seconds, args.k)
        finally:
            process.terminate()
            process.wait(timeout=30)
        rows.append((size, result))
        print(f"size {size}: {json.dumps(result)}", flush=True)
    load_avg = os.getloadavg()[0]
    table = [
        f"{args.clients} concurrent clients for {args.seconds:g} s per size on 127.0.0.1, 20-item histories, "
        f"k = {args.k}, service with one torch thread; {os.cpu_count()}-core {platform.machine()} VM, "
        f"load average {load_avg:.1f} at the end (shared machine: absolute numbers are pessimistic).",
        "",
        "| size | requests/s | p50 ms | p99 ms | mean batch | errors |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for size, r in rows:
        table.append(
            f"| {size} | {r['requests_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['mean_batch']:.1f} | {r['errors']} |"
        )
    text = "\n".join(table)
    print(text)
    if args.write:
        path = os.path.join(REPO, "docs", "deploy.md")
        doc = open(path).read()
        start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
        open(path, "w").write(doc[:start] + "\n" + text + "\n" + doc[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
