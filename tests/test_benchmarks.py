"""The fused-linear benchmark scripts run end to end at a tiny shape, so that the GPU check (which
has minutes, not retries) does not first meet a broken script there."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--B", "2", "--T", "33", "--H", "97", "--V", "1271"]


def _rows(path: Path) -> dict:
    return {(r["provider"], r["metric"]): float(r["value"]) for r in csv.DictReader(path.open())}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_accuracy_script(tmp_path, dtype):
    """accuracy_fused_linear.py: our gradients are as accurate as the same-dtype eager reference's
    (the rule the tests hold kernels to); a provider that is not installed is skipped, not fatal."""
    out = tmp_path / "acc.csv"
    r = subprocess.run([sys.executable, str(BENCH / "accuracy_fused_linear.py"), *TINY, "--dtype", dtype,
                        "--providers", "cpp", "cpp-recompute", "no-such-provider", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no-such-provider" in r.stdout and "skipped" in r.stdout
    rows = _rows(out)
    assert rows[("reference", "d_weight_max_err")] > 0  # (float32 and bf16 both round)
    for p in ("cpp", "cpp-recompute"):
        for g in ("d_hidden", "d_weight"):
            assert rows[(p, f"{g}_max_err_vs_reference")] <= 1.5, (p, g, rows)
        assert rows[(p, "loss_max_err")] <= rows[("reference", "loss_max_err")] + 1e-6


def test_speed_script(tmp_path):
    """bench_fused_linear.py: every provider in a fresh process, the rows the summary reads."""
    out = tmp_path / "speed.csv"
    r = subprocess.run([sys.executable, str(BENCH / "bench_fused_linear.py"), *TINY, "--reps", "1",
                        "--providers", "gemm3", "reference", "cpp", "--modes", "full", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(out)
    for p in ("gemm3", "reference", "cpp"):
        assert rows[(p, "time_median")] > 0
    assert ("cpp", "time_vs_gemm3") in rows and ("cpp", "peak_vs_reference") in rows
    s = subprocess.run([sys.executable, str(BENCH / "summarize.py"), str(out)], capture_output=True, text=True)
    assert s.returncode == 0 and "x gemm3" in s.stdout, s.stderr
