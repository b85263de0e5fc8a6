"""Training-step speed and peak memory of the fMRL-LRU model on CPU, and its parameter saving.

    .venv/bin/python bench/trunk.py                      # all configurations, writes docs/benchmarks.md
    .venv/bin/python bench/trunk.py --configs demo --impls fmrl --no-write

Each (configuration, implementation) pair runs in a fresh subprocess with one intra-op thread, so its peak
RSS (VmHWM) is its own. A step is forward, Matryoshka loss, backward, gradient clipping and an AdamW step
on full-length sequences (every position has a target). Implementations:
* fmrl: models/fmrl (grouped nested GEMMs, hand-written scan and layer-norm backward, fused chunked loss);
* official-style: bench/official_style.py, the official code's way of computing the same maths (a loop
  of small matmuls per nested layer, complex matmuls, autograd through the scan, all logits materialised).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BEGIN, END = "<!-- bench/trunk.py:begin -->", "<!-- bench/trunk.py:end -->"

CONFIGS = {
    # the paper's Beauty-size configuration (fMRLRec, EMNLP Findings 2024)
    "beauty": dict(
        num_items=12101,
        text_dim=1024,
        image_dim=1024,
        sizes=[8, 16, 32, 64, 128, 256, 512, 1024],
        num_blocks=2,
        batch=32,
        length=50,
        dropout=0.6,
    ),
    # configs/demo.yaml
    "demo": dict(
        num_items=2000,
        text_dim=64,
        image_dim=48,
        sizes=[8, 16, 32, 64, 128],
        num_blocks=2,
        batch=64,
        length=30,
        dropout=0.1,
    ),
}
STEPS = {"fmrl": 5, "official-style": 3}
REPEATS = {"fmrl": 3, "official-style": 1}
REFERENCE_ALL_LOGITS_BEAUTY = (14.4, 4.2)
"""Step time (s) and peak RSS (GB) of an all-logits implementation at the Beauty-size configuration on this
machine kind with 1 thread, as given in the project's foundation issue (measured before this code existed)."""
"""Fresh worker processes per pair: shared 2-core VMs vary by +-15% from run to run, so the table gives
the median over workers of each worker's median step, with the range."""


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def worker(config_name: str, impl: str, steps: int) -> dict:
    """Time ``steps`` training steps after one warm-up step; runs inside the subprocess."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    c = CONFIGS[config_name]
    n = c["num_items"]
    text = torch.randn(n + 1, c["text_dim"])
    image = torch.randn(n + 1, c["image_dim"])
    text[0] = image[0] = 0
    tokens = torch.randint(1, n + 1, (c["batch"], c["length"]))
    labels = torch.randint(1, n + 1, (c["batch"], c["length"]))

    if impl == "fmrl":
        from models.fmrl import FMRLConfig, FMRLRec, matryoshka_loss

        cfg = FMRLConfig(
            nested_sizes=c["sizes"],
            num_blocks=c["num_blocks"],
            dropout=c["dropout"],
            attn_dropout=c["dropout"],
        )
        model = FMRLRec(cfg, n, text, image)

        def loss_fn():
            hidden, items = model(tokens)
            return matryoshka_loss(hidden, items, labels, cfg.nested_sizes, cfg.loss_chunk_mb)[0]
    else:
        sys.path.insert(0, HERE)
        from official_style import OfficialStyleFMRL

        model = OfficialStyleFMRL(c["sizes"], c["num_blocks"], text, image, c["dropout"], c["dropout"])

        def loss_fn():
            return model.loss(tokens, labels)

    del text, image
    if impl == "fmrl":
        from sharding.optim import build_optimizer

        optimizer = build_optimizer(model, 1e-4, 0.01)
    else:  # the official code's plain AdamW (the fused kernel rejects its complex parameters)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-9, weight_decay=0.01)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()

    step()  # warm-up: allocator, optimizer state
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return dict(
        config=config_name,
        impl=impl,
        step_s=median,
        min_s=min(times),
        steps=steps,
        sequences_per_s=c["batch"] / median,
        peak_rss_mib=peak_rss_mib(),
    )


def parameter_saving(sizes: list[int], input_dim: int, num_blocks: int) -> dict:
    """Trainable parameters of one nested model vs one independent model per size (built on 'meta').

    Counts for the whole model (projector from ``input_dim`` features + trunk) and for the trunk alone.
    *free* counts the block lower triangle of each nested weight (what is stored and trained); *dense*
    counts every nested weight as a full D x D matrix, as the paper's analysis does.
    """
    from models.fmrl import FMRLConfig, FMRLRec
    from models.fmrl.layers import NestedLinear

    def build(nested: list[int]) -> FMRLRec:
        cfg = FMRLConfig(nested_sizes=nested, num_blocks=num_blocks, use_image_features=False)
        with torch.device("meta"):
            return FMRLRec(cfg, 10, text_features=torch.empty(11, input_dim))

    def counts(model: FMRLRec) -> dict:
        free = model.num_parameters()
        trunk_free = free - sum(p.numel() for p in model.item_tower.parameters() if p.requires_grad)
        extra = sum(
            m.sizes[-1] ** 2 - sum(p.numel() for p in m.weight_parts)
            for m in model.modules()
            if isinstance(m, NestedLinear)
        )
        masked = free - sum(p.numel() for p in model.parameters() if p.requires_grad)  # <= 0
        return dict(
            free=free,
            dense=free - masked + extra,
            trunk_free=trunk_free,
            trunk_dense=trunk_free - masked + extra,
        )

    nested = counts(build(sizes))
    independent = [counts(build([m])) for m in sizes]
    return dict(
        sizes=sizes,
        nested=nested,
        independent_total=sum(c["free"] for c in independent),
        independent_trunk=sum(c["trunk_free"] for c in independent),
    )


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, Linux, Python {platform.python_version()}, torch {torch.__version__}"
    )


def render(results: list[dict], savings: list[dict], command: str) -> str:
    lines = [
        BEGIN,
        "## Trunk: training step on CPU, 1 thread (`bench/trunk.py`)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Date: {time.strftime('%Y-%m-%d')}",
        "",
        "A step = forward, Matryoshka loss over all nested sizes, backward, clipping, AdamW, on full-length "
        "sequences. Median step time; peak RSS of the whole process (VmHWM).",
        "",
        "| configuration | implementation | step (s), median | range over workers | sequences/s | "
        "peak RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        low, high = r["range_s"]
        lines.append(
            f"| {r['config']} | {r['impl']} | {r['step_s']:.2f} | {low:.2f}-{high:.2f} ({r['workers']} workers) "
            f"| {r['sequences_per_s']:.1f} | {r['peak_rss_mib']:.0f} |"
        )
    by_key = {(r["config"], r["impl"]): r for r in results}
    for config in CONFIGS:
        ours, theirs = by_key.get((config, "fmrl")), by_key.get((config, "official-style"))
        if ours and theirs:
            lines.append("")
            lines.append(
                f"{config}: {theirs['step_s'] / ours['step_s']:.1f}x faster, "
                f"{ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}x the peak memory of the "
                f"official-style implementation."
            )
    ours = by_key.get(("beauty", "fmrl"))
    if ours:
        step_s, rss_gb = REFERENCE_ALL_LOGITS_BEAUTY
        lines.append("")
        lines.append(
            f"beauty, against the reference figure for an implementation that loops over the sizes and "
            f"materialises all logits ({step_s} s per step, {rss_gb} GB peak RSS on this machine kind, 1 thread; "
            f"target: at least 3x faster and at most a quarter of the memory): "
            f"{step_s / ours['step_s']:.1f}x faster, {ours['peak_rss_mib'] * 2**20 / (rss_gb * 1e9):.2f}x the memory."
        )
    lines += [
        "",
        "### Parameters: one nested model vs independent models at every size",
        "",
        "Trainable parameters. *Free* counts the block lower triangle of every nested weight (what the model "
        "stores and trains); *dense* counts each nested weight as a full D x D matrix, as the paper's saving "
        "analysis does (it reports independent / nested = 4/3, i.e. 33% saved relative to the nested model, for "
        "the weight matrices). *Trunk* leaves out the projector, whose 2048 x m weights grow linearly in m.",
        "",
        "| sizes | part | nested (free) | nested (dense) | sum of independent models "
        "| independent / nested (dense) | independent / nested (free) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in savings:
        label = f"{s['sizes'][0]}..{s['sizes'][-1]} ({len(s['sizes'])} sizes)"
        n = s["nested"]
        for part, free, dense, indep in (
            ("whole model", n["free"], n["dense"], s["independent_total"]),
            ("trunk", n["trunk_free"], n["trunk_dense"], s["independent_trunk"]),
        ):
            lines.append(
                f"| {label} | {part} | {free / 1e6:.2f}M | {dense / 1e6:.2f}M | {indep / 1e6:.2f}M "
                f"| {indep / dense:.2f} | {indep / free:.2f} |"
            )
    lines.append(END)
    return "\n".join(lines)


def read_section(path: str, begin: str, end: str) -> str:
    """The text from ``begin`` up to ``end`` in ``path``; "" if the file or a marker is missing."""
    if not os.path.exists(path):
        return ""
    text = open(path).read()
    if begin not in text or end not in text:
        return ""
    return text[text.index(begin) : text.index(end)]


def write_json(path: str, value: dict) -> None:
    """Write ``value`` to ``path`` through a temporary name: a reader never sees a half-written file."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)


def write_section(path: str, section: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the section between ``begin`` and ``end`` in ``path`` with ``section`` (which carries the
    markers), or append it; written to a temporary file, then renamed. Every bench script uses this."""
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--impls", default="fmrl,official-style")
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "benchmarks.md"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, STEPS[args.worker[1]])))
        return

    results = []
    for config in args.configs.split(","):
        for impl in args.impls.split(","):
            runs = []
            for _ in range(REPEATS[impl]):
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", config, impl],
                    check=True,
                    capture_output=True,
                    text=True,
                    env={**os.environ, "OMP_NUM_THREADS": "1"},
                )
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            result = dict(runs[0])
            result["step_s"] = statistics.median(r["step_s"] for r in runs)
            result["range_s"] = (min(r["step_s"] for r in runs), max(r["step_s"] for r in runs))
            result["sequences_per_s"] = CONFIGS[config]["batch"] / result["step_s"]
            result["peak_rss_mib"] = statistics.median(r["peak_rss_mib"] for r in runs)
            result["workers"] = len(runs)
            print(
                f"{config:7s} {impl:15s} step {result['step_s']:.2f} s  {result['sequences_per_s']:.1f} seq/s  "
                f"peak RSS {result['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
            results.append(result)
    savings = [
        parameter_saving([2**i for i in range(3, 11)], 2048, 2),
        parameter_saving([2**i for i in range(7, 12)], 2048, 2),
    ]
    for s in savings:
        print(s)
    section = render(results, savings, "python bench/trunk.py")
    print(section)
    if not args.no_write:
        write_section(args.output, section)


if __name__ == "__main__":
    main()
