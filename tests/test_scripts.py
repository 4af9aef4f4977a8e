"""Every script in scripts/ answers --help with its usage and does nothing else (no benchmark
run, no model built, no tracked picture overwritten)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "scripts").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_only_helps(script):
    pictures = {p: p.stat().st_mtime_ns for p in (ROOT / "docs" / "pictures").glob("*.png")}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:")
    assert {p: p.stat().st_mtime_ns for p in pictures} == pictures


def test_bench_prints_the_performance_pages_table():
    """scripts/bench.py's closing table has docs/performance.md's table's columns, and the
    percentage is the sweep's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    times = {k: {"min": v} for k, v in (("forward", 0.1), ("gemm", 0.2), ("sweep", 0.33),
                                         ("sweep+csv", 0.35), ("original", 0.9))}
    row = {"model": "m", "backend": "torch", "T": 16, "times": times, "floor": 0.3,
           "sweep_over_floor": 1.1, "original_over_sweep_csv": 2.57, "sweep_peak_fraction": 0.25,
           "peak_extra_bytes": {"sweep": 10 * 2**20, "gemm": 40 * 2**20}}
    lines = bench.format_table([row]).splitlines()
    page = (ROOT / "docs" / "performance.md").read_text()
    assert lines[0] in page  # the page's header, column for column
    assert lines[2] == ("| m | torch | 16 | 0.100 s | 0.200 s | 0.330 s | 1.10 | 2.6 | "
                        "10 MiB (25.0%) |")


def test_the_cli_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "mlx_lens.cli", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: ")
