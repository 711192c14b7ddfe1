"""Print a short table of benchmark CSVs: median time, speed-ups, bandwidth and memory per provider.

    python benchmarks/summarize.py benchmarks/results/*.csv
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

SHOWN = [("time_median", "ms"), ("speedup_vs_reference", "x ref"), ("fraction_of_copy_bandwidth", "% copy"),
         ("effective_bandwidth", "GB/s"), ("extra_peak_memory", "MiB extra"), ("time_vs_gemm3", "x gemm3"),
         ("gflops_6NHV", "GFLOP/s"), ("prompts_per_s", "prompts/s"), ("time", "s"), ("peak_memory", "MiB peak"),
         ("d_hidden_max_err_vs_reference", "x ref d_h err"), ("d_weight_max_err_vs_reference", "x ref d_w err"),
         ("loss_max_err_vs_reference", "x ref loss err")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="+", type=Path)
    for path in p.parse_args().csv:
        if not path.is_file():
            print(f"{path}: no such file (nothing measured)")
            continue
        rows = list(csv.DictReader(path.open()))
        # one table per (op, shape): a file may hold several lengths or batch sizes
        tables: dict = defaultdict(lambda: defaultdict(dict))
        for r in rows:
            tables[(r["op"], r["shape"], r["device"])][(r["provider"], r["mode"])][r["metric"]] = float(r["value"])
        for (op, shape, device), val in tables.items():
            cols = [(m, u) for m, u in SHOWN if any(m in v for v in val.values())]
            if not cols:
                continue
            wp = max(len("provider"), *(len(p) for p, _ in val)) + 2
            wm = max(len("mode"), *(len(m) for _, m in val)) + 2
            print(f"\n{op}  {shape}  [{device}]")
            print(f"{'provider':<{wp}}{'mode':<{wm}}" + "".join(f"{u:>15}" for _, u in cols))
            for (prov, mode), v in val.items():
                print(f"{prov:<{wp}}{mode:<{wm}}" + "".join(f"{v[m]:>15.4g}" if m in v else f"{'':>15}"
                                                            for m, _ in cols))


if __name__ == "__main__":
    main()
