"""
End-to-end test of benchmark.py --quick through subprocess: it runs, writes results.json of
the documented shape with values in range, draws the three plots, and refuses bad input
with one clear sentence without touching earlier results.

    python -m pytest -q tests/test_benchmark.py
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data import NEW_SKILLS, PRIOR_SKILLS

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # 2 shared cores
    return subprocess.run([sys.executable, "benchmark.py", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("benchmark")
    proc = run_benchmark("--quick", "--seeds", "0,1", "--out", tmp / "out", "--base", tmp / "base" / "ckpt.pt")
    return tmp, proc


def test_quick_run_writes_results(quick):
    tmp, proc = quick
    assert proc.returncode == 0, proc.stderr
    assert "total time" in proc.stdout.splitlines()[-1]
    for name in ("stages.png", "pareto.png", "forgetting.png"):
        assert (tmp / "out" / name).stat().st_size > 1000, name
    results = json.loads((tmp / "out" / "results.json").read_text())
    assert set(results) == {"config", "base", "runs"}
    every = list(PRIOR_SKILLS) + list(NEW_SKILLS)
    assert set(results["base"]) == {"accuracy", "teacher_accuracy"}
    for key in ("accuracy", "teacher_accuracy"):
        assert list(results["base"][key]) == every
        assert all(0 <= a <= 1 for a in results["base"][key].values())
    runs = results["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs) == [("sdft", 0), ("sdft", 1), ("sft", 0), ("sft", 1)]
    for run in runs:
        assert run["demo_style"] == "expert" and run["lr"] > 0
        assert [s["skill"] for s in run["stages"]] == list(NEW_SKILLS)
        for stage in run["stages"]:
            assert set(stage) == {"skill", "steps", "seconds", "accuracy", "kl_from_base"}
            assert list(stage["accuracy"]) == every
            assert all(0 <= a <= 1 for a in stage["accuracy"].values())
            assert 0 <= stage["steps"] <= results["config"]["finetune"]["steps"]
            assert stage["seconds"] > 0
            assert math.isfinite(stage["kl_from_base"]) and stage["kl_from_base"] >= 0


def test_reuses_cached_base(quick):
    tmp, _ = quick
    before = (tmp / "base" / "ckpt.pt").stat().st_mtime_ns
    proc = run_benchmark("--quick", "--seeds", "0", "--skills", "rotl", "--out", tmp / "again",
                         "--base", tmp / "base" / "ckpt.pt")
    assert proc.returncode == 0, proc.stderr
    assert "reusing" in proc.stdout
    assert (tmp / "base" / "ckpt.pt").stat().st_mtime_ns == before


@pytest.mark.parametrize("flags, needle", [
    (["--skills", "rotl,nope"], "nope"),
    (["--seeds", ""], "--seeds"),
    (["--seeds", "a,b"], "--seeds"),
    (["--lr", "-1"], "--lr"),
    (["--out", "/proc/no-such-dir/out"], "--out"),
])
def test_bad_input(quick, flags, needle):
    tmp, _ = quick
    before = (tmp / "out" / "results.json").read_bytes()
    proc = run_benchmark("--quick", "--out", tmp / "out", "--base", tmp / "base" / "ckpt.pt", *flags)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert (tmp / "out" / "results.json").read_bytes() == before  # nothing earlier destroyed
