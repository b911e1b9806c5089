"""
End-to-end check of lab/studies.py (the paper's ablations and baselines) with a tiny budget:
every study runs, writes its results.json (one record per run, with the keys the issue names),
table.md and plot, and a second call reuses the finished runs instead of training again.

    python -m pytest -q tests/test_studies.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ["onpolicy", "teacher", "divergence", "baselines", "size", "passk", "law", "inside"]


def studies(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "lab/studies.py", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("studies")
    r = studies("all", "--quick", "--seeds", "0", "--skills", "jab", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    return out, r


@pytest.mark.parametrize("study", STUDIES)
def test_each_study_writes_its_results(quick, study):
    out, _ = quick
    results = json.loads((out / study / "results.json").read_text())
    assert results["runs"], study
    for r in results["runs"]:
        for key in ("study", "variant", "seed", "new_accuracy", "prior_average"):
            assert key in r, (study, key)
        assert (r["study"] == study and list(r["new_accuracy"]) == ["jab"]
                and 0 <= r["prior_average"] <= 1)
    assert (out / study / "table.md").read_text().startswith("|")
    assert (out / study / f"{study}.png").stat().st_size > 0


def test_what_each_study_measures(quick):
    out, _ = quick
    load = lambda s: json.loads((out / s / "results.json").read_text())["runs"]
    assert {r["variant"] for r in load("onpolicy")} == {
        "sdft", "offline-kl", "offline-kl-sft-rate", "offline-ce", "offline-ce-sdft-rate", "sft"}
    # validation curves from step 0
    assert all(r["curve"] and r["curve"][0][0] == 0 for r in load("teacher"))
    # the trained model, reading a demonstration
    assert all(0 <= r["demo_accuracy_end"] <= 1 for r in load("teacher"))
    assert {r["size"] for r in load("size")} == {"1x16", "1x32"}
    assert all(0 <= r["teacher_accuracy"] <= 1 for r in load("size"))
    for r in load("passk"):
        values = [r["pass_at_k"][k] for k in ("1", "2", "4", "8", "16")]
        assert values == sorted(values)  # never falls with k
    reinvoke = next(r for r in load("baselines") if r["variant"] == "sft+reinvoke")
    sft = next(r for r in load("baselines") if r["variant"] == "sft")
    assert reinvoke["steps"] > sft["steps"]  # SFT's steps, then the re-invoke stage's
    runs = load("law")  # every single-skill variant but re-invoke
    assert len(runs) == 18 and all("kl_from_base" in r and "prior_drop" in r for r in runs)
    assert "R^2" in (out / "law" / "table.md").read_text()
    inside = load("inside")[0]["rollouts"][0]["tokens"]
    assert inside and all("divergence" in t and "teacher_top" in t for t in inside)


def test_finished_runs_are_reused(quick):
    out, _ = quick
    before = {p: p.stat().st_mtime for p in (out / "runs").glob("*/metrics.jsonl")}
    r = studies("divergence", "--quick", "--seeds", "0", "--skills", "jab", "--out", out)
    assert r.returncode == 0, r.stderr
    assert before and {p: p.stat().st_mtime
                       for p in (out / "runs").glob("*/metrics.jsonl")} == before


def test_bad_input_is_one_error_line(tmp_path):
    """Each bad flag: a non-zero exit and one 'error:' line naming it (in one process: each is
    mostly importing torch)."""
    from conftest import run_each
    cases = [(["--skills", "nope"], "nope"), (["--skills", "copy"], "new skills"),
             (["--seeds", "x"], "--seeds")]
    done = run_each([["lab/studies.py", "onpolicy", "--quick", *flags, "--out", tmp_path]
                     for flags, _ in cases])
    for (flags, needle), (returncode, _, stderr) in zip(cases, done):
        lines = stderr.strip().splitlines()
        assert (returncode != 0 and len(lines) == 1
                and lines[0].startswith("error:")), (flags, stderr)
        assert needle in lines[0], (flags, stderr)


def test_a_run_is_reused_only_from_the_same_checkpoint(tmp_path):
    """runner.run_once reruns a finished command when the checkpoint it starts from has changed
    under the same path (a base made again), and reuses it otherwise."""
    sys.path.insert(0, str(ROOT))
    from runner import run_once
    script, base, log = tmp_path / "count.py", tmp_path / "base.pt", tmp_path / "runs.txt"
    script.write_text(f"open({str(log)!r}, 'a').write('ran\\n')\n")
    base.write_bytes(b"one base")
    command, out = ([str(script), "--init", str(base), "--out", str(tmp_path / "out")],
                    tmp_path / "out")
    out.mkdir()
    run_once(command, str(out))
    run_once(command, str(out))  # the same command from the same base: reused
    assert log.read_text().count("ran") == 1
    base.write_bytes(b"another base, same path")
    run_once(command, str(out))
    assert log.read_text().count("ran") == 2


def test_one_recipe_the_scripts_defaults_are_the_chosen_rates():
    """The rates the drivers pass (runner.LR, chosen on validation in results/lr) are the
    training scripts' own defaults: `python train_sdft.py` alone runs the headline's recipe."""
    import re
    sys.path.insert(0, str(ROOT))
    from runner import LR
    for method in ("sft", "sdft"):
        source = (ROOT / f"train_{method}.py").read_text()
        default = re.search(r'training.add_arguments\(parser, out="[^"]+", lr=([0-9.e+-]+)\)',
                            source)  # each script's default for training.py's --lr
        assert default and float(default.group(1)) == LR[method], method


def test_baselines_sweep_every_rate_and_choose_on_validation(quick):
    """DFT and re-invoke run at each rate of their sweeps (two with --quick), and the rate shown in
    the main table is the one with the best validation accuracy of the new skill."""
    out, _ = quick
    results = json.loads((out / "baselines" / "results.json").read_text())
    runs, config = results["runs"], results["config"]
    assert ({"dft", "dft-lr0.001", "sft+reinvoke", "sft+reinvoke-lr0.001"}
            <= {r["variant"] for r in runs})
    for method, chosen in config["chosen"].items():
        scores = {v: sum(r["val_accuracy"][r["skill"]] for r in runs if r["variant"] == v)
                  / sum(r["variant"] == v for r in runs)
                  for v in config["val_scores"] if v.split("-lr")[0] == method}
        assert len(scores) == 2 and scores == {v: config["val_scores"][v] for v in scores}
        assert scores[chosen] == max(scores.values())
