"""Wall time of the `fmrl` command where a user waits for an answer and nothing is trained: the help, a
config typo, `fmrl config show`, next to a bare interpreter and `import torch`.

    .venv/bin/python bench/cli.py                        # 11 runs each; writes docs/benchmarks.md
    .venv/bin/python bench/cli.py --quick --no-write

Each command is a fresh process (the installed `fmrl` console script, or `python -m trainer.cli` when
there is none) started ``--runs`` times in a row after one untimed warm-up run (which fills the OS file
cache, as any second use does); the median and the range of the wall times are reported. The commands
import neither torch nor TorchRec (trainer/cli.py, tests/unit/test_cli.py), so their time is the
interpreter's start plus the config code.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from trunk import machine, write_section  # bench/ is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BEGIN, END = "<!-- bench/cli.py:begin -->", "<!-- bench/cli.py:end -->"


def fmrl() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "fmrl")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "trainer.cli"]


CASES = [
    # (what, arguments after the command, expected exit code)
    ("`fmrl --help`", ["--help"], 0),
    ("`fmrl train --help`", ["train", "--help"], 0),
    (
        "config typo: `fmrl train --config configs/demo.yaml train.lrr=1e-3`",
        ["train", "--config", "configs/demo.yaml", "train.lrr=1e-3"],
        2,
    ),
    ("`fmrl config show --config configs/demo.yaml`", ["config", "show", "--config", "configs/demo.yaml"], 0),
]
REFERENCES = [
    ("reference: `python -c pass` (interpreter start)", [sys.executable, "-c", "pass"]),
    ("reference: `python -c 'import torch'`", [sys.executable, "-c", "import torch"]),
]


def timed(command: list[str], expected: int, runs: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": REPO}  # this checkout's code, also through the console script
    times = []
    for index in range(runs + 1):
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
        elapsed = time.perf_counter() - start
        if done.returncode != expected:
            raise SystemExit(f"{command}: exit code {done.returncode}, expected {expected}:\n{done.stderr}")
        if index:  # the first run warms the file cache
            times.append(elapsed)
    return times


def render(rows: list[tuple[str, list[float]]], command: str, runs: int, load: float) -> str:
    lines = [
        BEGIN,
        "## Command line: answers without training (`bench/cli.py`)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Date: {time.strftime('%Y-%m-%d')}, load average {load:.1f} at the start (other jobs share the "
        "machine)",
        "",
        f"Wall time of a fresh process, median and range of {runs} runs after one warm-up run. `fmrl` is "
        "the console script. None of these commands imports torch, TorchRec, fbgemm or DeepSpeed "
        "(checked by tests/unit/test_cli.py); the `import torch` row is what each would cost otherwise.",
        "",
        "| command | median (s) | range (s) |",
        "|---|---:|---:|",
    ]
    for what, times in rows:
        lines.append(f"| {what} | {statistics.median(times):.3f} | {min(times):.3f}-{max(times):.3f} |")
    return "\n".join([*lines, END])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=11, help="timed runs per command")
    parser.add_argument("--quick", action="store_true", help="3 runs each (smoke test)")
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "benchmarks.md"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    runs = 3 if args.quick else args.runs
    load = os.getloadavg()[0]
    rows = [(what, timed([*fmrl(), *argv], code, runs)) for what, argv, code in CASES]
    rows += [(what, timed(command, 0, runs)) for what, command in REFERENCES]
    command = "python bench/cli.py" + (f" --runs {args.runs}" if args.runs != 11 and not args.quick else "")
    section = render(rows, command + (" --quick" if args.quick else ""), runs, load)
    print(section)
    if not args.no_write:
        write_section(args.output, section, BEGIN, END)


if __name__ == "__main__":
    main()
