"""
Smoke tests of the scripts (lab/pretrain.py, train_sft.py, eval.py, and what train_sdft.py
shares with train_sft.py) through subprocess, with tiny budgets: they run, write what they
promise, are reproducible, show the time left, and fail cleanly on bad input.

    python -m pytest -q tests/test_scripts.py

A tiny pretrained checkpoint (1 layer, 32 wide, 3 steps) is made once per module and shared.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_each
from data import NEW_SKILLS, PRIOR_SKILLS, SKILLS, Tokenizer, world_signature
from eval import evaluate
from model import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ALL_SKILLS = list(PRIOR_SKILLS) + list(NEW_SKILLS)
PRETRAIN = ["lab/pretrain.py", "--steps", 3, "--n-layer", 1, "--n-embd", 32, "--n-head", 2,
            "--device", "cpu"]
METRICS = '{"step": 0, "loss": 1.0}\n'  # a run's metrics.jsonl, beside its checkpoint


def script_env():
    # One intra-op thread per process: on 2 shared cores, more threads make these runs ~5x slower.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def start(*args):
    """Start a script in the repo root; several started together run side by side."""
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=180):
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


def run(*args):
    return finish(start(*args))


def read_metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pretrain_runs(tmp_path_factory):
    """The same tiny pretraining run twice, side by side (seed 0).
    Returns {name: (out dir, returncode, stdout, stderr)}."""
    root = tmp_path_factory.mktemp("scripts")
    procs = {name: start(*PRETRAIN, "--seed", 0, "--out", root / f"{name}.pt")
             for name in ("base", "base_again")}
    return {name: (root / f"{name}.pt", *finish(proc)) for name, proc in procs.items()}


@pytest.fixture(scope="module")
def base_ckpt(pretrain_runs):
    path, rc, _, stderr = pretrain_runs["base"]
    assert rc == 0, stderr
    return path


def pretrain_losses(stdout):
    """The losses of lab/pretrain.py's step lines (every 100th step and the last)."""
    return [float(x) for x in re.findall(r"\| loss (\S+) \|", stdout)]


# -----------------------------------------------------------------------------
# lab/pretrain.py

def test_pretrain_smoke(pretrain_runs):
    path, rc, stdout, stderr = pretrain_runs["base"]
    assert rc == 0, stderr
    assert "Traceback" not in stderr
    assert path.is_file() and not Path(str(path) + ".tmp").exists()
    assert re.findall(r"step (\d+)/3 ", stdout) == ["1", "3"]
    losses = pretrain_losses(stdout)
    assert losses[0] == pytest.approx(math.log(42), rel=0.1)  # untrained: about uniform
    model, ckpt = load_checkpoint(str(path))
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (1, 2, 32)
    assert model.config.vocab_size == 42
    assert {"model", "model_config", "args", "world"} <= set(ckpt)
    assert not {"optimizer", "data_rng", "torch_rng"} & set(ckpt)  # a base: no training state
    assert (ckpt["args"]["steps"] == 3 and ckpt["world"] == world_signature()
            and ckpt["knowledge_world"] is None)


def test_pretrain_reproducible(pretrain_runs):
    """The same seed twice: identical losses and weights."""
    losses = {}
    for name, (_, rc, stdout, stderr) in pretrain_runs.items():
        assert rc == 0, (name, stderr)
        losses[name] = pretrain_losses(stdout)
    assert len(losses["base"]) == 2 and losses["base"] == losses["base_again"]
    a = torch.load(pretrain_runs["base"][0], weights_only=True)["model"]
    b = torch.load(pretrain_runs["base_again"][0], weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -----------------------------------------------------------------------------
# train_sft.py


def test_sft_smoke(base_ckpt, tmp_path):
    out = tmp_path / "sft"
    rc, stdout, stderr = run("train_sft.py", "--init", base_ckpt, "--skills", "jab,mug",
                             "--steps", 2, "--eval-every", 1, "--eval-n", 4, "--device", "cpu",
                             "--out", out)
    assert rc == 0, stderr
    assert "Traceback" not in stderr
    records = read_metrics(out)
    stages = [r for r in records if "accuracy" in r]
    assert [(r["stage"], r["skill"]) for r in stages] == [(0, "jab"), (1, "mug")]
    for r in stages:
        assert (list(r["accuracy"]) == ALL_SKILLS
                and all(0 <= a <= 1 for a in r["accuracy"].values()))
    steps = [r for r in records if "loss" in r]
    assert ([(r["skill"], r["step"]) for r in steps]
            == [("jab", 0), ("jab", 1), ("mug", 0), ("mug", 1)])
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in steps)
    evals = [r for r in records if "val_acc" in r]  # --eval-every 1: before each step
    assert ([(r["skill"], r["step"]) for r in evals]
            == [("jab", 0), ("jab", 1), ("mug", 0), ("mug", 1)])
    model, ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["stage"] == 1 and ckpt["skills"] == ["jab", "mug"]
    # size read from the base checkpoint
    assert (model.config.n_layer, model.config.n_embd) == (1, 32)
    base, _ = load_checkpoint(str(base_ckpt))
    assert any(not torch.equal(p, q)
               for p, q in zip(model.state_dict().values(), base.state_dict().values()))


def test_keep_best_ends_on_the_best_validation(base_ckpt, tmp_path):
    """--keep-best (both scripts): the last weights are validated too, and the stage ends on the
    weights of the best validation, the earliest on a tie, with its step count in the record.
    The tiny base validates at 0 throughout, so the kept weights are the starting ones (and so
    is SDFT's EMA teacher), though 4 steps at a high rate have moved the model."""
    flags = ["--init", base_ckpt, "--skills", "jab", "--steps", 4, "--eval-every", 2, "--eval-n", 4,
             "--lr", 1e-2, "--warmup", 0, "--batch-size", 4, "--device", "cpu", "--keep-best"]
    procs = {script: start(script, *flags, "--out", tmp_path / script)
             for script in ("train_sft.py", "train_sdft.py")}
    base, _ = load_checkpoint(str(base_ckpt))
    for script, proc in procs.items():
        rc, _, stderr = finish(proc)
        assert rc == 0, stderr
        records = read_metrics(tmp_path / script)
        evals = [(r["step"], r["val_acc"]) for r in records if "val_acc" in r]
        # the last weights (after step 4) are validated too
        assert [step for step, _ in evals] == [0, 2, 4]
        best_step, best_acc = max(evals, key=lambda e: (e[1], -e[0]))  # the earliest best
        assert [r["steps"] for r in records if "accuracy" in r] == [best_step]
        model, ckpt = load_checkpoint(str(tmp_path / script / "ckpt.pt"))
        weights = [model.state_dict()] + ([ckpt["teacher"]] if script == "train_sdft.py" else [])
        if best_step == 0:
            for w in weights:
                assert all(torch.equal(w[k], v) for k, v in base.state_dict().items()), script
        else:  # (not with this base, but then) the kept weights validate as the best did
            assert evaluate(model, Tokenizer(), ["jab"], torch.device("cpu"), split="val",
                            n=4)["jab"] == best_acc
        # the budget ran: the weights kept are not simply the last
        assert len([r for r in records if "loss" in r]) == 4


def test_sft_first_step_loss_and_dft(base_ckpt, tmp_path):
    """The first logged loss of train_sft.py is the token mean of -log p over the demonstration
    tokens of the first batch, computed here; with --dft each token's term is weighted by its
    probability p (DFT), which is below 1, so the DFT loss is the smaller."""
    import random

    import torch.nn.functional as F

    from data import Tokenizer, sft_batch, skill_examples
    procs = {dft: start("train_sft.py", "--init", base_ckpt, "--skills", "jab", "--steps", 1,
                        "--batch-size", 4, "--eval-n", 2, "--seed", 5, "--device", "cpu",
                        "--out", tmp_path / f"dft{dft}", *(["--dft"] * dft))
             for dft in (False, True)}
    model, _ = load_checkpoint(str(base_ckpt))
    prompts, targets, _ = skill_examples(random.Random(5), "jab", 4, "expert")
    ids, mask, loss_mask = sft_batch(Tokenizer(), prompts, targets)
    with torch.no_grad():
        nll = F.cross_entropy(model(ids[:, :-1], mask[:, :-1]).transpose(1, 2), ids[:, 1:],
                              reduction="none")
    weights = loss_mask[:, 1:].float()
    for dft, proc in procs.items():
        rc, _, stderr = finish(proc)
        assert rc == 0, stderr
        logged = [r["loss"] for r in read_metrics(tmp_path / f"dft{dft}") if "loss" in r][0]
        per_token = torch.exp(-nll) * nll if dft else nll  # DFT: p(y) * -log p(y)
        expected = (per_token * weights).sum() / weights.sum()
        assert logged == pytest.approx(expected.item(), rel=1e-5), dft


def script_function(script, name):
    """A function of a flat script, compiled alone from the script's source (without running
    the script), so that a test can pin what it computes."""
    import ast
    tree = ast.parse((ROOT / script).read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {"torch": torch}
    exec(compile(ast.Module([node], type_ignores=[]), script, "exec"), namespace)
    return namespace[name]


def test_dft_loss_value_and_detached_weight():
    """DFT (train_sft.py's dft_loss): p(y) * -log p(y), where p(y) is a constant: the gradient
    is p(y) times SFT's."""
    import numpy as np
    dft_loss = script_function("train_sft.py", "dft_loss")
    logits = torch.tensor([[1.0, 2.0, 0.5]], requires_grad=True)
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor([1]), reduction="none")
    p = math.exp(-nll.item())
    loss = dft_loss(nll)
    assert loss.item() == pytest.approx(p * -math.log(p), rel=1e-6)
    loss.backward()
    softmax = np.exp([1.0, 2.0, 0.5]) / np.exp([1.0, 2.0, 0.5]).sum()
    expected = p * (softmax - np.eye(3)[1])  # d/dlogits of p * nll, p held fixed
    np.testing.assert_allclose(logits.grad[0].numpy(), expected, rtol=1e-5, atol=1e-7)


def test_step_lines_end_with_time_left(base_ckpt, tmp_path):
    """Both training scripts end every step line with the time left in the stage ('eta 1m05s'
    or 'eta 42s'), which is 0s at the last step of each stage."""
    tiny = ["--init", base_ckpt, "--skills", "jab,mug", "--steps", 3, "--eval-every", 100,
            "--eval-n", 2, "--batch-size", 2, "--device", "cpu"]
    procs = {script: start(script, *tiny, "--out", tmp_path / script)
             for script in ("train_sft.py", "train_sdft.py")}
    for script, proc in procs.items():
        rc, stdout, stderr = finish(proc)
        assert rc == 0, (script, stderr)
        lines = [line for line in stdout.splitlines() if "| loss " in line]  # one per step
        assert len(lines) == 6, (script, stdout)
        for line in lines:
            assert re.search(r" \| eta ([1-9]\d*m[0-5]\ds|[1-5]?\ds)$", line), (script, line)
        # the last step of each stage
        assert all(line.endswith("| eta 0s") for line in lines[2::3]), (script, lines)


# -----------------------------------------------------------------------------
# eval.py

def parse_eval_rows(stdout):
    """{skill: (kind, plain, own, expert)} from eval.py's table."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0] in SKILLS:
            rows[parts[0]] = (parts[1], *map(float, parts[2:]))
    return rows


def test_eval_smoke(base_ckpt):
    rc, stdout, stderr = run("eval.py", "--ckpt", base_ckpt, "--n", 4, "--device", "cpu")
    assert rc == 0, stderr
    assert "Traceback" not in stderr
    rows = parse_eval_rows(stdout)
    assert list(rows) == list(SKILLS)
    for skill, (kind, *accs) in rows.items():
        assert kind == ("prior" if skill in PRIOR_SKILLS else "new")
        assert all(0 <= a <= 1 for a in accs)


def test_eval_sampled_is_seeded(base_ckpt):
    """--temperature 1 samples: the same --seed prints the same table, and says it sampled."""
    outs = [run("eval.py", "--ckpt", base_ckpt, "--n", 4, "--device", "cpu", "--temperature", 1,
                "--seed", 3)
            for _ in range(2)]
    assert all(rc == 0 for rc, _, _ in outs), outs[0][2]
    assert "sampled (temperature 1)" in outs[0][1]
    assert parse_eval_rows(outs[0][1]) == parse_eval_rows(outs[1][1])
    assert list(parse_eval_rows(outs[0][1])) == list(SKILLS)


# -----------------------------------------------------------------------------
# bad input: a non-zero exit and one "error:" line, never a traceback

# (script and flags, text the error line must contain); {base} {missing} {corrupt} are paths
BAD_INPUTS = [
    (["eval.py", "--ckpt", "{missing}"], "no checkpoint"),
    (["eval.py", "--ckpt", "{corrupt}"], "not a readable checkpoint"),
    (["eval.py", "--ckpt", "{base}", "--skills", "jab,nope"], "nope"),
    (["eval.py", "--ckpt", "{base}", "--n", "0"], "--n"),
    (["eval.py", "--ckpt", "{base}", "--temperature", "-1"], "--temperature"),
    (["lab/pretrain.py", "--p-new", "1.5"], "--p-new"),
    (["lab/pretrain.py", "--p-mend", "-0.1"], "--p-mend"),
    (["lab/pretrain.py", "--steps", "0"], "--steps"),
    (["lab/pretrain.py", "--out", "{base}"], "already exists"),  # a base is never replaced
    (["train_sft.py", "--init", "{missing}"], "no checkpoint"),
    (["train_sft.py", "--init", "{corrupt}"], "not a readable checkpoint"),
    (["train_sft.py", "--init", "{base}", "--skills", "jab,nope"], "nope"),
    (["train_sft.py", "--init", "{base}", "--stop-at", "0"], "--stop-at"),
    (["train_sft.py", "--init", "{base}", "--stop-at", "-1"], "--stop-at"),
    (["train_sft.py", "--init", "{base}", "--steps", "0"], "--steps"),
]


@pytest.fixture(scope="module")
def bad_runs(base_ckpt, tmp_path_factory):
    """Every bad input of BAD_INPUTS (in one process: most of each run is importing torch), and
    beside them a run that fails in the middle of training. The train_sft.py runs write into --out
    directories that already hold a good checkpoint and its metrics.
    Returns (tmp dir, [(flags, needle, returncode, stderr)], bytes of the good checkpoint)."""
    tmp = tmp_path_factory.mktemp("bad")
    corrupt = tmp / "corrupt.pt"
    corrupt.write_bytes(base_ckpt.read_bytes()[:1000])  # a truncated checkpoint
    paths = {"base": base_ckpt, "missing": tmp / "missing.pt", "corrupt": corrupt}
    for name in ("out", "out_late"):
        (tmp / name).mkdir()
        shutil.copy(base_ckpt, tmp / name / "ckpt.pt")
        (tmp / name / "metrics.jsonl").write_text(METRICS)
    cases = []
    for flags, needle in BAD_INPUTS:
        args = [a.format(**paths) for a in flags]
        if args[0] == "train_sft.py":
            args += ["--eval-n", "4", "--out", str(tmp / "out")]
        elif args[0] == "lab/pretrain.py" and "--out" not in args:
            args += ["--out", str(tmp / "new.pt")]
        cases.append((args, needle))
    # fails at its second step: a huge learning rate makes the loss non-finite
    cases.append((["train_sft.py", "--init", str(base_ckpt), "--skills", "jab", "--steps", "3",
                   "--lr", "1e30", "--warmup", "0", "--eval-every", "100", "--eval-n", "2",
                   "--out", str(tmp / "out_late")],
                  "non-finite loss"))
    late = start(*cases[-1][0], "--device", "cpu")  # it trains: a process of its own
    done = run_each([[*args, "--device", "cpu"] for args, _ in cases[:-1]])  # torch imported once
    results = [(args, needle, rc, stderr) for (args, needle), (rc, _, stderr) in zip(cases, done)]
    results.append((*cases[-1], *finish(late)[::2]))
    return tmp, results, base_ckpt.read_bytes()


def check_clean_error(rc, stderr, needle, what):
    lines = stderr.strip().splitlines()
    assert rc != 0, what
    assert "Traceback" not in stderr, (what, stderr)
    assert len(lines) == 1 and lines[0].startswith("error:"), (what, stderr)
    assert needle in lines[0], (what, lines[0])


def test_bad_input(bad_runs):
    _, results, _ = bad_runs
    assert len(results) == len(BAD_INPUTS) + 1
    for args, needle, rc, stderr in results:
        check_clean_error(rc, stderr, needle, args)


def test_failing_run_keeps_good_checkpoint(bad_runs, base_ckpt):
    """Runs that fail, before training (unknown skill, missing or corrupt --init, bad flags) or
    in the middle of it (non-finite loss), leave the checkpoint already in --out byte for byte
    as it was, and leave no temporary file."""
    tmp, results, good = bad_runs
    assert any("jab,nope" in args for args, *_ in results)  # an unknown skill was among them
    assert (tmp / "out" / "ckpt.pt").read_bytes() == good
    # rejected before anything was started, so the old metrics are kept too
    assert (tmp / "out" / "metrics.jsonl").read_text() == METRICS
    assert not (tmp / "new.pt").exists()  # lab/pretrain.py with a bad flag writes nothing
    assert (tmp / "out_late" / "ckpt.pt").read_bytes() == good
    for name in ("out", "out_late"):
        assert sorted(os.listdir(tmp / name)) == ["ckpt.pt", "metrics.jsonl"]


def test_unwritable_out_is_a_clean_error(base_ckpt, tmp_path):
    """An --out that cannot be created stops both training scripts with one 'error:' line,
    before anything is loaded (the 'model:' line comes after loading)."""
    (tmp_path / "file").write_text("not a directory")
    out = tmp_path / "file" / "run"
    cases = [(*PRETRAIN, "--out", out), ("train_sft.py", "--init", base_ckpt, "--out", out),
             ("train_sdft.py", "--init", base_ckpt, "--out", out)]
    procs = [start(*args) for args in cases]  # side by side
    for args, proc in zip(cases, procs):
        rc, stdout, stderr = finish(proc)
        check_clean_error(rc, stderr, f"cannot write to --out {out}", args)
        assert stdout == "", (args, stdout)


def test_pretrain_keeps_a_base_finetuning_reruns(base_ckpt, tmp_path):
    """lab/pretrain.py refuses an --out that exists, and leaves it as it was; fine-tuning into an
    --out that holds a checkpoint runs as before (a rerun overwrites its own run)."""
    (tmp_path / "finetuned").mkdir()
    shutil.copy2(base_ckpt, tmp_path / "kept.pt")
    shutil.copy2(base_ckpt, tmp_path / "finetuned" / "ckpt.pt")
    before = ((tmp_path / "kept.pt").read_bytes(), (tmp_path / "kept.pt").stat().st_mtime_ns)
    procs = {"kept": start(*PRETRAIN, "--out", tmp_path / "kept.pt"),
             "finetuned": start("train_sft.py", "--init", base_ckpt, "--skills", "jab",
                                "--steps", 1, "--eval-n", 2, "--batch-size", 2, "--device", "cpu",
                                "--out", tmp_path / "finetuned")}
    results = {name: finish(proc) for name, proc in procs.items()}
    rc, _, stderr = results["kept"]
    check_clean_error(rc, stderr, "already exists", "pretrain over a checkpoint")
    assert ((tmp_path / "kept.pt").read_bytes(),
            (tmp_path / "kept.pt").stat().st_mtime_ns) == before
    rc, _, stderr = results["finetuned"]
    assert rc == 0, stderr
    _, ckpt = load_checkpoint(str(tmp_path / "finetuned" / "ckpt.pt"))
    assert ckpt["skills"] == ["jab"]
