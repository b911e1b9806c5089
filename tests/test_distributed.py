"""
Several processes, resuming, and safe checkpoints, through subprocess on CPU (gloo):

    python -m pytest -q tests/test_distributed.py

- 2 processes (torchrun) end with the same weights as 1 process doing the same micro-batches;
- a run killed in the middle and continued with --resume ends exactly like an uninterrupted one;
- --resume refuses a truncated, mismatched or missing checkpoint with one "error:" line and
  leaves OUT as it was.

The tiny base checkpoint of conftest.py is shared.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from conftest import run_each  # noqa: E402
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
SDFT = ["train_sdft.py", "--skills", "jab,mug", "--eval-every", 2, "--eval-n", 4,
        "--max-new-tokens", 8, "--batch-size", 8, "--device", "cpu", "--seed", 3, "--lr", 1e-2,
        "--warmup", 2]
TIMING = ("ms", "gen_ms", "update_ms", "seconds")  # the only values a rerun may change


def script_env():
    # One intra-op thread per process (2 shared cores); unbuffered, so lines arrive as printed.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start(*args, launcher=(sys.executable,)):
    return subprocess.Popen([*launcher, *map(str, args)], cwd=ROOT, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=180):
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


def weights(out, key="model"):
    return torch.load(out / "ckpt.pt", weights_only=True)[key]


def records(out):
    """metrics.jsonl without the timings."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


@pytest.fixture(scope="module")
def base_ckpt(tiny_base):
    return tiny_base


def test_two_processes_match_one_process(base_ckpt, tmp_path):
    """torchrun with 2 processes and --batch-size 8 against 1 process with --grad-accum 2.
    Micro-batch i of every step draws its queries and rollouts from seed + i, so both runs
    see the same 2 micro-batches of 4 queries and the same rollouts; DDP averages the two
    gradients, --grad-accum sums the two halves: the same update. The EMA teacher of rank 1
    feeds rank 1's loss, so a teacher out of step on rank 1 would show up in the weights.
    Tolerance: 1e-6 absolute (float32 rounding of the gradient sums); in practice the
    weights come out bit for bit equal, since halving and a sum of two are exact in order."""
    flags = [*SDFT, "--init", base_ckpt, "--steps", 4]
    ddp = start(*flags, "--out", tmp_path / "ddp", launcher=TORCHRUN)
    one = start(*flags, "--grad-accum", 2, "--out", tmp_path / "one")
    (rc_ddp, out_ddp, err_ddp), (rc_one, _, err_one) = finish(ddp), finish(one)
    # the workers' own lines come before torchrun's summary
    assert rc_ddp == 0 and rc_one == 0, (err_ddp[-6000:], err_one[-2000:])
    assert out_ddp.count("model:") == 1 and "2 processes" in out_ddp  # rank 0 alone prints
    for key in ("model", "teacher"):
        a, b = weights(tmp_path / "ddp", key), weights(tmp_path / "one", key)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=f"{key} {name}")
    base = torch.load(base_ckpt, weights_only=True)["model"]
    assert any(not torch.equal(base[n], a[n]) for n in base)  # it did train
    # rank 0 alone writes metrics: one record per step, and every value (the reduced loss too)
    # agrees
    steps = [r for r in records(tmp_path / "ddp") if "loss" in r]
    assert ([(r["skill"], r["step"]) for r in steps]
            == [(s, i) for s in ("jab", "mug") for i in range(4)])
    for r, q in zip(records(tmp_path / "ddp"), records(tmp_path / "one")):
        assert r.keys() == q.keys()
        for k in r:
            assert r[k] == pytest.approx(q[k], abs=1e-6), (k, r, q)


def test_resume_matches_uninterrupted(base_ckpt, tmp_path):
    """A run killed in the middle of its first stage, then continued with --resume, ends with
    the same weights, teacher and metrics (timings aside) as the same run left alone: the
    checkpoint every 2 steps holds the optimizer, the step, the data and rollout RNGs, and
    (--keep-best) the best validation so far with its weights, which end each stage."""
    flags = [*SDFT, "--init", base_ckpt, "--steps", 6, "--ckpt-every", 2, "--keep-best"]
    whole = start(*flags, "--out", tmp_path / "whole")
    cut = start(*flags, "--out", tmp_path / "cut")
    # kill it while it trains step 5 of the first stage (checkpoint after step 4)
    for line in cut.stdout:
        if "jab | step 5/6" in line:
            cut.send_signal(signal.SIGKILL)
            break
    cut.communicate(timeout=60)
    ckpt = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)
    assert ckpt["stage"] == 0 and not ckpt["stage_done"] and ckpt["step"] in (4, 6), (
        "not killed in the middle")
    rc, stdout, stderr = finish(start(*flags, "--out", tmp_path / "cut", "--resume"))
    assert rc == 0, stderr
    assert "resuming stage 1" in stdout
    rc, _, stderr = finish(whole)
    assert rc == 0, stderr
    for key in ("model", "teacher", "optimizer"):
        a, b = weights(tmp_path / "whole", key), weights(tmp_path / "cut", key)
        if key == "optimizer":
            a, b = a["state"], b["state"]
            a, b = ([t for s in d.values() for t in s.values() if torch.is_tensor(t)]
                    for d in (a, b))
            assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b)), key
        else:
            assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), key
    assert records(tmp_path / "cut") == records(tmp_path / "whole")
    assert not (tmp_path / "cut" / "ckpt.pt.tmp").exists()


# -----------------------------------------------------------------------------
# refused: one "error:" line, a non-zero exit, and OUT exactly as it was

@pytest.fixture(scope="module")
def good_run(base_ckpt, tmp_path_factory):
    """A finished 1-stage SDFT run: OUT/ckpt.pt (with everything --resume needs) and metrics."""
    out = tmp_path_factory.mktemp("dist") / "good"
    rc, _, stderr = finish(start(*SDFT, "--init", base_ckpt, "--skills", "jab", "--steps", 2,
                                 "--out", out))
    assert rc == 0, stderr
    return out


def bad_cases(base_ckpt, good, tmp):
    """(name, command, text the error line must contain); each command's --out is tmp/name,
    a copy of the good run, altered for some cases below."""
    sdft = [*SDFT, "--init", base_ckpt, "--skills", "jab", "--steps", 2, "--resume"]
    return [
        ("truncated", sdft, "not a readable checkpoint"),
        ("missing", sdft, "no checkpoint"),
        ("other_skills", [*sdft, "--skills", "mug"], "trained on skills jab, not mug"),
        ("other_model", sdft, "another config"),
        ("other_lr", [*sdft, "--lr", 0.5], "--lr"),
        ("no_state", sdft, "no training state"),
        ("other_shards", [*sdft, "--grad-accum", 2], "micro-batches"),
        ("ckpt_every", [*sdft, "--ckpt-every", -1], "--ckpt-every"),
        ("grad_accum", [*sdft, "--grad-accum", 0], "--grad-accum"),
        ("uneven_batch", [*sdft, "--batch-size", 6, "--grad-accum", 4], "does not split"),
    ]


def test_resume_refuses_bad_checkpoints(base_ckpt, good_run, tmp_path):
    good = good_run
    cases = bad_cases(base_ckpt, good, tmp_path)
    for name, *_ in cases:
        shutil.copytree(good, tmp_path / name)
    ckpt = tmp_path / "truncated" / "ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:2000])  # cut off on disk
    (tmp_path / "missing" / "ckpt.pt").unlink()
    full = torch.load(good / "ckpt.pt", weights_only=True)
    # a complete checkpoint of another model
    small = GPT(GPTConfig(vocab_size=42, n_layer=1, n_head=2, n_embd=16))
    torch.save({**full, "model": small.state_dict(), "model_config": asdict(small.config)},
               tmp_path / "other_model" / "ckpt.pt")
    torch.save({k: v for k, v in full.items() if k != "optimizer"},
               tmp_path / "no_state" / "ckpt.pt")
    before = {name: {f: (tmp_path / name / f).read_bytes() for f in os.listdir(tmp_path / name)}
              for name, *_ in cases}
    done = run_each([[*cmd, "--out", tmp_path / name] for name, cmd, _ in cases])  # one process
    for (name, _, needle), (rc, _, stderr) in zip(cases, done):
        lines = stderr.strip().splitlines()
        assert rc != 0, name
        assert "Traceback" not in stderr, (name, stderr)
        assert len(lines) == 1 and lines[0].startswith("error:"), (name, stderr)
        assert needle in lines[0], (name, lines[0])
        after = {f: (tmp_path / name / f).read_bytes() for f in os.listdir(tmp_path / name)}
        assert after == before[name], f"{name}: OUT was changed"


def test_non_finite_stops_cleanly(base_ckpt, good_run, tmp_path):
    """A step whose loss or gradient is not finite stops the run before the update, with one
    "error:" line naming the step; the good checkpoint already in OUT is left as it was.
    The trigger: position embeddings scaled by 100 (so the teacher, at other positions, and
    the student disagree) and the final layer norm by 1e20: the logits stay finite, so the
    rollouts work, but the gradient norm overflows float32."""
    ckpt = torch.load(base_ckpt, weights_only=False)
    ckpt["model"]["wpe.weight"] = ckpt["model"]["wpe.weight"] * 100
    ckpt["model"]["ln_f.weight"] = ckpt["model"]["ln_f.weight"] * 1e20
    bad_init = tmp_path / "exploding.pt"
    torch.save(ckpt, bad_init)
    for script in ("train_sdft.py", "train_sft.py"):
        out = tmp_path / script
        shutil.copytree(good_run, out)
        before = (out / "ckpt.pt").read_bytes()
        rc, _, stderr = finish(start(script, "--init", bad_init, "--skills", "jab", "--steps", 2,
                                     "--eval-n", 4, "--batch-size", 8, "--device", "cpu",
                                     "--out", out))
        lines = stderr.strip().splitlines()
        assert rc != 0 and "Traceback" not in stderr, (script, stderr)
        assert (len(lines) == 1 and "non-finite" in lines[0]
                and "stage 1 step 0" in lines[0]), (script, stderr)
        assert (out / "ckpt.pt").read_bytes() == before, (
            f"{script}: the good checkpoint was replaced")
