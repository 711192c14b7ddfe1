"""Draw benchmark figures from the CSV files the benchmark scripts write.

    python benchmarks/plot.py benchmarks/results/*.csv          # one PNG per CSV, next to it

Each figure: forward+backward median time per provider (with the 20-80% range) and, where measured,
the extra peak memory, so speed and memory read off one picture. Ranking benchmarks (rows with
``prompts_per_s``) get one bar per provider in prompts per second; benchmarks over sequence lengths
(attention) get time and memory against L.
"""

from __future__ import annotations

import argparse
import csv
import re
from collections import defaultdict
from pathlib import Path


def _title(r0: dict, shape: str = "") -> str:
    return f"{r0['op']}: {shape or r0['shape']}\n{r0['device']}, torch {r0['torch']}"


def _save(fig, csv_path: Path, plt) -> Path:
    """The figure as a PNG next to its CSV."""
    fig.tight_layout()
    out = csv_path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot(csv_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_path.open()))
    if not rows:
        raise SystemExit(f"{csv_path}: no rows")
    val = defaultdict(dict)
    for r in rows:
        val[(r["provider"], r["mode"])][r["metric"]] = float(r["value"])
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    if any(r["metric"] == "prompts_per_s" for r in rows):
        return _plot_throughput(csv_path, rows, providers, val, plt)
    if len({r["shape"] for r in rows}) > 1 and all(re.search(r"\bL=\d+", r["shape"]) for r in rows):
        return _plot_by_length(csv_path, rows, providers, plt)
    full = [p for p in providers if "time_median" in val[(p, "full")]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    med = [val[(p, "full")]["time_median"] for p in full]
    lo = [m - val[(p, "full")]["time_q20"] for p, m in zip(full, med)]
    hi = [val[(p, "full")]["time_q80"] - m for p, m in zip(full, med)]
    fwd = [val[(p, "forward")].get("time_median", 0.0) for p in full]
    ax.bar(full, med, yerr=[lo, hi], capsize=4, color="#4c72b0", label="forward + backward")
    ax.bar(full, fwd, color="#dd8452", label="forward only")
    for i, m in enumerate(med):
        ax.text(i, m, f"{m:.0f} ms", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("median time (ms)")
    ax.set_title("time per step (lower is better)")
    ax.legend()
    ax = axes[1]
    mem = [val[(p, "full")].get("extra_peak_memory", 0.0) for p in full]
    ax.bar(full, mem, color="#55a868")
    for i, m in enumerate(mem):
        ax.text(i, m, f"{m:.0f} MiB", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("extra peak memory (MiB)")
    ax.set_title("memory beyond the inputs (lower is better)")
    fig.suptitle(_title(rows[0]), fontsize=10)
    return _save(fig, csv_path, plt)


def _plot_by_length(csv_path: Path, rows, providers, plt) -> Path:
    """Benchmarks over sequence lengths (attention): time and extra memory against L, one line per
    provider, on log-log axes, so quadratic and linear growth read off the slopes."""
    series = defaultdict(dict)  # (provider, metric) -> {L: value}
    for r in rows:
        L = int(re.search(r"\bL=(\d+)", r["shape"]).group(1))
        series[(r["provider"], r["metric"])][L] = float(r["value"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label, title in ((axes[0], "time_median", "median time (ms)", "time (lower is better)"),
                                     (axes[1], "extra_peak_memory", "extra peak memory (MiB)",
                                      "memory beyond the inputs (lower is better)")):
        for p in providers:
            pts = sorted((L, v) for L, v in series[(p, metric)].items() if v == v and v > 0)
            if pts:
                ax.plot([L for L, _ in pts], [v for _, v in pts], marker="o", label=p)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length L")
        ax.set_title(title)
        if not ax.lines:  # not measured here (memory on a CPU)
            ax.text(0.5, 0.5, "not measured on this device", ha="center", transform=ax.transAxes)
            continue
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(_title(rows[0], re.sub(r"\s*\bL=\d+", "", rows[0]["shape"])), fontsize=10)
    return _save(fig, csv_path, plt)


def _plot_throughput(csv_path: Path, rows, providers, val, plt) -> Path:
    """Ranking benchmarks: prompts per second per provider, as horizontal bars."""
    have = [p for p in providers if "prompts_per_s" in val[(p, "forward")]]
    rate = [val[(p, "forward")]["prompts_per_s"] for p in have]
    base = max((r for p, r in zip(have, rate) if p.startswith("llm-blender")), default=None)
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(have) + 1.6))
    colors = ["#8c8c8c" if p.startswith("llm-blender") else "#4c72b0" for p in have]
    ax.barh(have, rate, color=colors)
    for i, r in enumerate(rate):
        label = f"{r:.2f}" + (f"  ({r / base:.2f}x LLM-Blender's best)" if base else "")
        ax.text(r, i, " " + label, va="center", fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, max(rate) * 1.6)
    ax.set_xlabel("prompts per second (higher is better)")
    ax.set_title(_title(rows[0]), fontsize=10)
    return _save(fig, csv_path, plt)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="+", type=Path)
    for path in p.parse_args().csv:
        print(f"wrote {plot(path)}")


if __name__ == "__main__":
    main()
