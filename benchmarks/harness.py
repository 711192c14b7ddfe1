"""Shared benchmark harness: timing with quantiles, peak memory, long-format CSV rows.

Timing: ``time_fn`` runs warm-ups, then ``reps`` timed calls, and reports the median and the 20% /
80% quantiles (CUDA: events and synchronisation; CPU: ``perf_counter``).

Memory on the CPU: torch's allocations are invisible to tracemalloc, so every variant runs in a
fresh process (``run_worker``) that reports its peak RSS (``ru_maxrss``) twice: once its inputs are
allocated (in place, without temporaries) and after the timed runs. The difference is the
variant's extra peak memory; a worker that only allocates the inputs gives the environment row. On a GPU:
``torch.cuda.max_memory_allocated`` over one call after a warm-up call (``cuda_extra_peak``).

CSV rows (one per measurement): op, provider, mode, shape, metric, value, unit, device, isa,
threads, torch, sppo_fast, timestamp. ``plot.py`` draws figures from these files.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

FIELDS = ["op", "provider", "mode", "shape", "metric", "value", "unit", "device", "isa", "threads",
          "torch", "sppo_fast", "timestamp"]


@dataclass
class Row:
    op: str
    provider: str
    mode: str
    shape: str
    metric: str
    value: float
    unit: str
    device: str = ""
    isa: str = ""
    threads: int = 0
    torch: str = ""
    sppo_fast: str = ""
    timestamp: str = ""


def environment() -> dict:
    """Device, ISA, thread count and versions for every row."""
    import torch

    import sppo_fast

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu: {_cpu_name()} ({os.cpu_count()} cores)"
    return {"device": device, "isa": sppo_fast.cpu_isa(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "sppo_fast": sppo_fast.__version__,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def relative(speedup: float) -> str:
    """``"2.50x faster"`` or ``"3.70x slower"`` (never "0.27x faster")."""
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"


def time_fn(fn: Callable[[], object], *, warmup: int = 1, reps: int = 5, cuda: bool = False) -> dict:
    """Median and 20/80% quantiles of ``fn``'s wall time in seconds (CUDA: triton.testing.do_bench,
    which flushes the L2 cache between calls, when Triton is installed)."""
    import torch

    if cuda:
        try:
            from triton.testing import do_bench
        except ImportError:
            pass
        else:
            med, q20, q80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
            return {"median": med / 1e3, "q20": q20 / 1e3, "q80": q80 / 1e3, "reps": "do_bench"}
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    # (inclusive: the quantiles stay within the samples; the default extrapolates, which gave
    # negative times for 2-3 repetitions)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
    return {"median": statistics.median(times), "q20": q[0], "q80": q[3], "reps": reps}


def cuda_extra_peak(fn: Callable[[], object], grads_of: Iterable = (), base: Optional[int] = None) -> int:
    """GPU memory one call of ``fn`` allocates at its peak beyond ``base`` (default: what exists
    before that call), measured on a second call: the first one's compilation stays out, and so does
    the 256 MB L2-flush buffer of Triton's ``do_bench`` (it comes later). Pass as ``base`` the memory
    read before ``fn`` was built, so that buffers a provider allocates up front count. The gradients
    the first call left on ``grads_of`` are dropped first (a step that recreates them would
    otherwise count only their growth)."""
    import torch

    fn()
    for t in grads_of:
        t.grad = None
    torch.cuda.synchronize()
    if base is None:
        base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def run_worker(script: Path, args: Iterable[str]) -> dict:
    """Run ``script --worker ARGS`` in a fresh Python process and parse the JSON it prints last."""
    cmd = [sys.executable, str(script), "--worker", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_rows(path: Path, rows: list[Row], append: bool = False) -> None:
    """Write (or append) rows to a CSV file, via a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if append and path.exists() else ""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as f:
        if old:
            f.write(old)
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if not old:
            w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
    os.replace(tmp, path)


def print_table(rows: list[Row], metrics: tuple[str, ...]) -> None:
    keep = [r for r in rows if r.metric in metrics]
    if not keep:
        return
    width = max(len(r.provider) for r in keep) + 2
    print(f"{'provider':<{width}}{'mode':<10}{'metric':<22}{'value':>12}  unit")
    for r in keep:
        print(f"{r.provider:<{width}}{r.mode:<10}{r.metric:<22}{r.value:>12.4g}  {r.unit}")


# ---- the driver every benchmark script shares ------------------------------------------------------
def add_common_args(p) -> None:
    """Options every benchmark script takes (and the hidden ones of its worker processes)."""
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch / OpenMP threads (default: torch's)")
    p.add_argument("--providers", nargs="*", default=None)
    p.add_argument("--modes", nargs="*", default=["forward", "full"], choices=["forward", "full"])
    p.add_argument("--cuda", action="store_true", help="run on the GPU")
    p.add_argument("--out", type=Path, default=None, help="CSV path (default benchmarks/results/...)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--provider", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="full", help=argparse.SUPPRESS)


def common_argv(args, names: Iterable[str]) -> list[str]:
    """Re-serialise the named options (plus the shared ones) for a worker process."""
    argv = []
    for name in [*names, "reps", "warmup", "threads"]:
        argv += [f"--{name}", str(getattr(args, name.replace("-", "_")))]
    return argv + (["--cuda"] if args.cuda else [])


class Driver:
    """Runs one worker per (provider, mode) in a fresh process, records time and memory rows."""

    def __init__(self, script: Path, op: str, shape: str, argv: list[str], out: Optional[Path], tag: str):
        self.script, self.op, self.shape, self.argv = script, op, shape, argv
        self.base = run_worker(script, argv + ["--provider", "inputs"])
        self.env = self.base["env"]
        self.rows: list[Row] = []
        self.results: dict[tuple[str, str], dict] = {}
        slug = re.sub(r"[^a-z0-9]+", "-", self.env["device"].lower().replace("(r)", "")).strip("-")
        self.path = out or script.parent / "results" / f"{op}-{tag}-{slug}.csv"
        print(f"{op}: {shape} on {self.env['device']} (isa {self.env['isa']}, "
              f"{self.env['threads']} threads, torch {self.env['torch']})")

    def row(self, provider: str, mode: str, metric: str, value: float, unit: str) -> None:
        self.rows.append(Row(self.op, provider, mode, self.shape, metric, value, unit, **self.env))

    def run(self, provider: str, mode: str) -> Optional[dict]:
        try:
            r = run_worker(self.script, self.argv + ["--provider", provider, "--mode", mode])
        except RuntimeError as exc:
            print(f"  {provider:<18} {mode:<8} skipped: {str(exc).strip().splitlines()[-1]}")
            return None
        t = r["time"]
        # extra peak: over the same process's peak once its inputs existed (a fresh process per
        # variant; comparing within it removes the process-to-process noise of the RSS baseline)
        r["extra_peak"] = r.get("cuda_extra_peak", r["peak_rss"] - r["inputs_peak_rss"])
        self.results[(provider, mode)] = r
        self.row(provider, mode, "time_median", t["median"] * 1e3, "ms")
        self.row(provider, mode, "time_q20", t["q20"] * 1e3, "ms")
        self.row(provider, mode, "time_q80", t["q80"] * 1e3, "ms")
        self.row(provider, mode, "extra_peak_memory", r["extra_peak"] / 2**20, "MiB")
        write_rows(self.path, self.rows)  # after every provider: a timed-out run keeps what it measured
        return r

    def speedups(self, baseline: str, providers: Iterable[str], mode: str = "full") -> None:
        if (baseline, mode) not in self.results:
            return
        ref = self.results[(baseline, mode)]["time"]["median"]
        for (provider, m), r in self.results.items():
            if m == mode and provider != baseline and provider in providers:
                speed = ref / r["time"]["median"]
                self.row(provider, mode, f"speedup_vs_{baseline}", speed, "x")
                print(f"  {provider}: {relative(speed)} than {baseline} ({mode})")

    def write(self) -> Path:
        write_rows(self.path, self.rows)
        print(f"wrote {self.path}")
        return self.path
