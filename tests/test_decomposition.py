"""
End-to-end check of lab/decomposition.py (SDFT against every kind of SFT, each on its frontier)
with a tiny base and budget: two variants run at every rate (every variant's flags are checked
against its script), each is reported at the rate with the best validation score, the table
names each prior average's worst skill, and bad input is refused in one line.

    python -m pytest -q tests/test_decomposition.py
"""

import ast
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["sft-expert", "sdft"]  # run end to end; every variant's flags: checked below


def decomposition(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "lab/decomposition.py", *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("decomposition")
    r = decomposition("--quick", "--variants", ",".join(VARIANTS), "--lrs", "3e-4,1e-3", "--seeds",
                      "0", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    return out, json.loads((out / "results.json").read_text())


def test_every_variant_runs_at_every_rate(quick):
    out, results = quick
    got = {(r["variant"], r["lr"], tuple(r["order"])) for r in results["runs"]}
    assert got == {(v, lr, ("jab", "mug", "hub")) for v in VARIANTS for lr in (3e-4, 1e-3)}
    for r in results["runs"]:  # every stage tested on every skill
        assert [s["skill"] for s in r["stages"]] == ["jab", "mug", "hub"]
        assert all(set(s["accuracy"]) == set(results["base"]) for s in r["stages"])
    assert results["config"]["variants"]["sft-expert"] == ["train_sft.py", {"demo_style": "expert"}]
    assert (out / "pareto.png").stat().st_size > 0


def test_every_variant_is_its_script_with_flags_it_takes():
    """Every variant names a training script and only flags its command defines, so a variant
    not run above still runs as written."""
    tree = ast.parse((ROOT / "lab" / "decomposition.py").read_text())
    table = next(n.value for n in tree.body if isinstance(n, ast.Assign)
                 and getattr(n.targets[0], "id", "") == "VARIANTS")
    variants = ast.literal_eval(table)
    assert set(VARIANTS) < set(variants) and len(variants) == 6
    for name, (script, settings, label) in variants.items():
        # the command's files (a lab variant: lab/variants.py and the script), and training.py
        source = "".join((ROOT / f).read_text() for f in [*script.split(), "training.py"])
        for key in settings:
            assert f'("--{key.replace("_", "-")}"' in source, (name, key)  # add("--flag"


def test_each_variant_is_reported_at_its_best_rate_on_validation(quick):
    out, results = quick
    for v in VARIANTS:
        scores = {r["lr"]: statistics.mean(r["stages"][-1]["val_accuracy"][k]
                                           for k in r["order"])
                  for r in results["runs"] if r["variant"] == v}
        assert results["config"]["chosen"][v] == max(sorted(scores), key=scores.get)
    table = (out / "table.md").read_text()
    assert "prior average (worst skill)" in table
    assert table.count("| SDFT |") == 1 + 2  # at its chosen rate, then at each rate of the sweep


def test_collapse_lines_show_the_first_stage(quick):
    out, results = quick
    lines = (out / "collapse.txt").read_text()
    for label in ("SFT on the expert's demonstrations", "SDFT"):
        assert label in lines
    assert "own-style" not in lines  # the collapse lines show only the variants that ran
    assert "copy " in lines and "expected" in lines
    # the first stage alone repeats the sequence run's first stage (the script checks it too)
    for r in results["after_first_stage"]:
        seq = next(s for s in results["runs"] if s["variant"] == r["variant"]
                   and s["lr"] == r["lr"] and s["seed"] == r["seed"])
        assert r["stages"][0]["accuracy"] == seq["stages"][0]["accuracy"]


BAD_INPUTS = [("--variants", "sft,bogus", "unknown variant"), ("--lrs", "fast", "comma-separated"),
              ("--lrs", "0", "positive"), ("--skills", "copy", "new skills")]


def test_bad_input_is_one_line_and_loses_nothing(quick):
    """Each bad flag, in one process (each is mostly importing torch), into the quick run's OUT:
    one error line, no traceback, and its results.json as it was."""
    from conftest import run_each
    out, _ = quick
    before = (out / "results.json").read_bytes()
    done = run_each([["lab/decomposition.py", flag, value, "--out", out]
                     for flag, value, _ in BAD_INPUTS])
    for (flag, value, says), (returncode, _, stderr) in zip(BAD_INPUTS, done):
        assert returncode != 0 and says in stderr and "Traceback" not in stderr, (flag, value)
        assert len(stderr.strip().splitlines()) == 1, stderr
    assert (out / "results.json").read_bytes() == before
