"""
Smoke test of lab/speed.py through subprocess, with tiny settings and without TRL: it runs, and
its last line has the format a script can check. Correctness only: no wall-clock assertions.

    python -m pytest -q tests/test_speed.py
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--skip-trl", "--device", "cpu", "--threads", "1", "--repeats", "2", "--warmup", "1",
        "--gen-batch-size", "4", "--gen-tokens", "4", "--batch-size", "4", "--new-tokens", "4"]


def run_bench(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # 2 shared cores
    return subprocess.run([sys.executable, "lab/speed.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_bench_last_line():
    proc = run_bench(*TINY)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    match = re.fullmatch(r"cache_speedup=(\S+) sdft_over_sft=(\S+) trl_speedup=(\S+)", lines[-1])
    assert match, lines[-1]
    cache_speedup, sdft_over_sft, trl_speedup = map(float, match.groups())
    assert math.isfinite(cache_speedup) and cache_speedup > 0
    assert math.isfinite(sdft_over_sft) and sdft_over_sft > 0
    assert math.isnan(trl_speedup)  # --skip-trl
    # the three parts were printed, and the SDFT step's phases are all there
    for text in ("matmul ceiling", "KV cache", "generation", "teacher and student forward",
                 "student backward", "forward+backward",
                 "optimizer + EMA", "SDFT step / SFT step"):
        assert text in proc.stdout, text


def test_bench_bad_flag():
    proc = run_bench("--repeats", "0", "--skip-trl")
    assert proc.returncode != 0
    assert "--repeats must be positive" in proc.stderr
