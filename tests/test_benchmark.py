"""
End-to-end test of benchmark.py --quick through subprocess: it runs, writes results.json of
the documented shape with values in range, draws the three plots, uses a base only for the
settings and the world it was made for, never replaces one, and refuses bad input with one
clear sentence without touching earlier results.

    python -m pytest -q tests/test_benchmark.py
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_each  # noqa: E402
from data import NEW_SKILLS, PRIOR_SKILLS, world_signature

ROOT = Path(__file__).resolve().parents[1]
TWO = list(NEW_SKILLS)[:2]  # two new skills: two orders, and quick


def start_benchmark(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # 2 shared cores
    return subprocess.Popen([sys.executable, "benchmark.py", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc):
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run_benchmark(*args):
    return finish(start_benchmark(*args))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick run over both orders of two new skills, two seeds; it pretrains its tiny base."""
    tmp = tmp_path_factory.mktemp("benchmark")
    proc = run_benchmark("--quick", "--seeds", "0,1", "--skills", ",".join(TWO), "--orders", "all",
                         "--out", tmp / "out", "--base", tmp / "base" / "ckpt.pt")
    return tmp, proc


def test_quick_run_writes_results(quick):
    tmp, proc = quick
    assert proc.returncode == 0, proc.stderr
    assert "pretraining into" in proc.stdout
    assert "total time" in proc.stdout.splitlines()[-1]
    for name in ("stages.png", "pareto.png", "forgetting.png"):
        assert (tmp / "out" / name).stat().st_size > 1000, name
    results = json.loads((tmp / "out" / "results.json").read_text())
    assert set(results) == {"config", "base", "runs"}
    assert results["config"]["world"] == world_signature()
    every = list(PRIOR_SKILLS) + list(NEW_SKILLS)
    assert set(results["base"]) == {"accuracy", "teacher_accuracy"}
    for key in ("accuracy", "teacher_accuracy"):
        assert list(results["base"][key]) == every
        assert all(0 <= a <= 1 for a in results["base"][key].values())
    runs = results["runs"]
    orders = [TWO, TWO[::-1]]
    assert sorted((r["method"], r["order"], r["seed"]) for r in runs) == sorted(
        (m, o, s) for m in ("sft", "sdft") for o in orders for s in (0, 1))
    for run in runs:
        assert run["demo_style"] == "expert" and run["lr"] > 0
        assert [s["skill"] for s in run["stages"]] == run["order"]
        for stage in run["stages"]:
            assert set(stage) == {"skill", "steps", "seconds", "accuracy", "val_accuracy",
                                  "kl_from_base"}
            assert list(stage["accuracy"]) == list(stage["val_accuracy"]) == every
            assert all(0 <= a <= 1
                       for a in [*stage["accuracy"].values(), *stage["val_accuracy"].values()])
            assert 0 <= stage["steps"] <= results["config"]["finetune"]["steps"]
            assert stage["seconds"] > 0
            assert math.isfinite(stage["kl_from_base"]) and stage["kl_from_base"] >= 0
    # the markdown table: the base row, then one row per order, method, learning rate and stage
    table = (tmp / "out" / "table.md").read_text().splitlines()
    assert len(table) == 3 + len(orders) * 2 * len(TWO)
    # every prior average beside its worst single skill (the base's row: its lowest prior skill)
    base_acc = results["base"]["accuracy"]
    worst = min(results["config"]["prior_skills"], key=lambda k: base_acc[k])
    assert "| prior average | worst prior skill |" in table[0]
    assert f"| {worst} {base_acc[worst]:.2f} |" in table[2]
    assert "every learned skill >= 0.9 in" in proc.stdout
    summary = (tmp / "out" / "summary.txt").read_text()
    assert summary.count("every learned skill >= 0.9 in") == 2 and summary in proc.stdout
    assert summary.count("worst single prior skill in any run") == 2


def test_replot_redraws_from_results(quick, tmp_path):
    """--replot: no training, the same table and summary from OUT/results.json and its settings
    (not the flags), the plots drawn again; without a results.json, one error line."""
    tmp, _ = quick
    out = tmp_path / "copy"
    out.mkdir()
    for name in ("results.json", "table.md", "summary.txt"):
        (out / name).write_bytes((tmp / "out" / name).read_bytes())
    # flags ignored
    proc = run_benchmark("--replot", "--out", out, "--seeds", "5", "--skills", TWO[0])
    assert proc.returncode == 0, proc.stderr
    assert "training runs" not in proc.stdout and "base model" not in proc.stdout
    for name in ("results.json", "table.md", "summary.txt"):
        assert (out / name).read_bytes() == (tmp / "out" / name).read_bytes(), name
    assert all((out / name).stat().st_size > 1000
               for name in ("stages.png", "pareto.png", "forgetting.png"))
    proc = run_benchmark("--replot", "--out", tmp_path / "empty")
    assert proc.returncode != 0 and proc.stderr.strip().startswith("error: --replot needs")
    assert "Traceback" not in proc.stderr


def test_base_is_weights_only_and_reused_and_flags_reach_the_runs(quick):
    """The quick base holds weights, settings and world only. Another run from it, with
    --pretrain, reuses it (same settings, same world) and leaves it untouched; --agreed-prefix
    reaches the SDFT runs only, --stop-at both."""
    tmp, _ = quick
    base = tmp / "base" / "ckpt.pt"
    ckpt = torch.load(base, weights_only=True)
    assert {"model", "model_config", "args", "world"} <= set(ckpt)
    assert not {"optimizer", "data_rng", "torch_rng"} & set(ckpt)  # weights only: no training state
    assert ckpt["world"] == world_signature()
    before = base.stat().st_mtime_ns
    out = tmp / "agreed"
    proc = run_benchmark("--quick", "--seeds", "0", "--skills", TWO[0], "--out", out,
                         "--base", base, "--pretrain", "--agreed-prefix", "--stop-at", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert "reusing" in proc.stdout and "pretraining" not in proc.stdout
    assert base.stat().st_mtime_ns == before
    runs = {p.name.split("-")[0]: torch.load(p / "ckpt.pt", weights_only=False)["args"]
            for p in (out / "runs").iterdir()}
    assert runs["sdft"]["agreed_prefix"] is True and "agreed_prefix" not in runs["sft"]
    assert runs["sdft"]["stop_at"] == runs["sft"]["stop_at"] == 0.5
    assert "SDFT (agreed prefix)" in (out / "table.md").read_text()


def test_base_seeds_table(quick):
    """--base-seeds: the base recipe under other pretraining seeds (made beside the results), one
    record per seed in OUT/seeds.json, and nothing fine-tuned; seed 0 is --base itself."""
    tmp, _ = quick
    out = tmp / "seeds"
    proc = run_benchmark("--quick", "--base-seeds", "0,1", "--out", out,
                         "--base", tmp / "base" / "ckpt.pt")
    assert proc.returncode == 0, proc.stderr
    records = json.loads((out / "seeds.json").read_text())
    assert [r["seed"] for r in records] == [0, 1]
    for r in records:
        assert (list(r["sampled"]) == list(NEW_SKILLS)
                and list(r["greedy"]) == list(PRIOR_SKILLS) + list(NEW_SKILLS))
        assert (set(r["with_demo"]) == {"own", "expert"}
                and list(r["with_demo"]["own"]) == list(r["greedy"]))
    seed1 = torch.load(out / "runs" / "base-seed1" / "ckpt.pt", weights_only=True)
    assert (seed1["args"]["seed"] == 1 and not (out / "runs" / "base-seed0").exists()
            and not (out / "table.md").exists())
    assert records[0] != records[1]  # another seed, another base


REFUSED_BASES = [  # (change to the quick base, flags, text of the error line)
    ("world", [], "another toy world"),  # e.g. made before a skill was added
    ("world", ["--pretrain"], "another toy world"),  # --pretrain never replaces it either
    (None, ["--p-new", "0.05"], "other settings"),
    ("garbage", ["--pretrain"], "not a readable checkpoint"),
]
BAD_INPUTS = [  # (flags, text of the error line)
    (["--skills", "jab,nope"], "nope"),
    (["--skills", "copy"], "new skills"),
    (["--skills", "jab,jab"], "distinct"),
    (["--seeds", ""], "--seeds"),
    (["--seeds", "a,b"], "--seeds"),
    (["--lr-sdft", "-1"], "--lr-sdft"),
    (["--lr-sft", "x"], "--lr-sft"),
    (["--stop-at", "1.5"], "--stop-at"),
    (["--out", "/proc/no-such-dir/out"], "--out"),
]


@pytest.fixture(scope="module")
def refusals(quick, tmp_path_factory):
    """Every refused base and bad input, in one process (each is mostly importing torch):
    [(needle, returncode, stderr, what must be as it was: (path, bytes before))]."""
    tmp, _ = quick
    cases = []
    for i, (change, flags, needle) in enumerate(REFUSED_BASES):
        base = tmp_path_factory.mktemp(f"refused{i}") / "ckpt.pt"
        ckpt = torch.load(tmp / "base" / "ckpt.pt", weights_only=True)
        if change == "world":
            ckpt["world"] = "0" * 8
        torch.save(ckpt, base)
        if change == "garbage":
            base.write_bytes(b"not a checkpoint")
        cases.append((["--out", base.parent / "out", "--base", base, *flags], needle, base))
    for flags, needle in BAD_INPUTS:  # into the quick run's OUT: its results.json must survive
        cases.append((["--out", tmp / "out", "--base", tmp / "base" / "ckpt.pt", *flags], needle,
                      tmp / "out" / "results.json"))
    kept = [(path, path.read_bytes()) for _, _, path in cases]
    done = run_each([["benchmark.py", "--quick", *flags] for flags, _, _ in cases])  # one process
    return [(needle, rc, stderr, before)
            for (_, needle, _), (rc, _, stderr), before in zip(cases, done, kept)]


@pytest.mark.parametrize("i", range(len(REFUSED_BASES) + len(BAD_INPUTS)))
def test_bad_base_or_input_is_one_error_line(refusals, i):
    """A base of another world or settings, or an unreadable one, is refused and never replaced;
    a bad flag is refused before anything earlier is touched."""
    needle, returncode, stderr, (path, before) = refusals[i]
    lines = stderr.strip().splitlines()
    assert returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], stderr
    assert path.read_bytes() == before


def test_no_base_without_pretrain(tmp_path):
    proc = run_benchmark("--out", tmp_path / "out", "--base", tmp_path / "none" / "ckpt.pt")
    assert proc.returncode != 0 and "--pretrain" in proc.stderr and "Traceback" not in proc.stderr
