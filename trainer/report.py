"""End-of-run report: the per-size metrics table and the plot of metric against nested size."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from trainer.evaluation.metrics import METRIC_NAMES


def format_size_table(
    results: Mapping[int, Mapping[str, float]],
    ks: Sequence[int],
    baseline: Mapping[str, float] | None = None,
    baseline_name: str = "most-popular",
) -> str:
    """A plain-text table: one row per nested size (and the baseline), one column per metric."""
    columns = [f"{m}@{k}" for m in METRIC_NAMES for k in ks]
    header = ["size", *columns]
    rows = [[str(size), *(f"{results[size][c]:.4f}" for c in columns)] for size in sorted(results)]
    if baseline is not None:
        rows.append([baseline_name, *(f"{baseline[c]:.4f}" for c in columns)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.rjust(width) for cell, width in zip(cells, widths))

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def save_size_plot(
    results: Mapping[int, Mapping[str, float]],
    ks: Sequence[int],
    path: str,
    title: str,
    baseline: Mapping[str, float] | None = None,
) -> None:
    """PNG of each metric against nested size (log2 x axis), one panel per metric family."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training machines
    import matplotlib.pyplot as plt

    sizes = sorted(results)
    fig, axes = plt.subplots(
        1, len(METRIC_NAMES), figsize=(5 * len(METRIC_NAMES), 4), constrained_layout=True
    )
    for ax, metric in zip(axes, METRIC_NAMES):
        for k in ks:
            name = f"{metric}@{k}"
            (line,) = ax.plot(sizes, [results[s][name] for s in sizes], marker="o", label=name)
            if baseline is not None:
                ax.axhline(baseline[name], color=line.get_color(), linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("nested size m")
        ax.set_title(metric + (" (dotted: most-popular)" if baseline is not None else ""))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
