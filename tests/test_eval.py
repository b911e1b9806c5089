"""
Tests of eval.py's pass@k and its "inside one SDFT step" mode (--inspect): the estimator on
hand-made counts, pass@k's properties on the shipped base, that inspect_step shows the
numbers the loss uses, and the CLI on good and bad input.

    python -m pytest -q tests/test_eval.py
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data import NEW_SKILLS, demonstration, encode_prompts, student_prompt, teacher_prompt
from eval import (MAX_NEW_TOKENS, accuracy, after_first_wrong, inspect_step, pass_at_k,
                  pass_at_k_estimate)
from model import load_checkpoint
from sdft import per_token_divergence, rollout, score

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "results" / "base" / "ckpt.pt"
QUERIES = ["bijce", "gchbij", "jci", "daefjb"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def base():
    return load_checkpoint(str(BASE))[0].eval()


def run_eval(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # 2 shared cores
    proc = subprocess.run([sys.executable, "eval.py", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


# -----------------------------------------------------------------------------
# pass@k

def test_pass_at_k_estimate_by_hand():
    assert pass_at_k_estimate(16, 0, 1) == 0 and pass_at_k_estimate(16, 0, 16) == 0  # never right
    assert pass_at_k_estimate(16, 16, 1) == 1 and pass_at_k_estimate(5, 5, 3) == 1  # always right
    assert pass_at_k_estimate(2, 1, 1) == 0.5
    assert pass_at_k_estimate(16, 1, 1) == pytest.approx(1 / 16)  # pass@1 is the fraction right
    assert pass_at_k_estimate(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3, 2) / C(4, 2)
    assert pass_at_k_estimate(4, 2, 3) == 1  # any 3 of 4 include one of the 2 right ones


def test_pass_at_k_monotone_and_seeded(base, tok):
    result = pass_at_k(base, tok, "jab", QUERIES, CPU, n_samples=8, ks=(1, 2, 4, 8), seed=1)
    assert list(result) == [1, 2, 4, 8]
    values = list(result.values())
    assert all(0 <= v <= 1 for v in values)
    assert values == sorted(values)  # more tries never lower the chance of one right answer
    assert pass_at_k(base, tok, "jab", QUERIES, CPU, n_samples=8, ks=(1, 2, 4, 8), seed=1) == result


def test_pass_at_k_greedy_is_accuracy(base, tok):
    """At temperature 0 all samples of a query agree: pass@k is the greedy accuracy for every k."""
    result = pass_at_k(base, tok, "jab", QUERIES, CPU, n_samples=4, ks=(1, 4), temperature=0.0)
    assert result[1] == result[4] == pytest.approx(accuracy(base, tok, "jab", QUERIES, CPU)[0])


def test_pass_at_k_rejects_k_above_n(tiny_model, tok):
    with pytest.raises(ValueError, match="n_samples"):
        pass_at_k(tiny_model, tok, "jab", QUERIES, CPU, n_samples=4, ks=(1, 8))


# -----------------------------------------------------------------------------
# inside one SDFT step

@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_inspect_step_shows_the_loss_divergence(base, tiny_model, tok, alpha):
    """The divergences shown are per_token_divergence on the logits of train_sdft.py's step,
    recomputed here from sdft's functions, with a teacher that differs from the student
    (the untrained tiny model, near uniform)."""
    student, teacher = base, tiny_model
    rollouts = inspect_step(student, teacher, tok, "jab", QUERIES, CPU, alpha=alpha, seed=3)

    student_ids, student_mask = encode_prompts(tok, [student_prompt("jab", q) for q in QUERIES])
    teacher_ids, teacher_mask = encode_prompts(
        tok, [teacher_prompt("jab", q, demonstration(NEW_SKILLS["jab"](q), "expert"))
              for q in QUERIES])
    with torch.no_grad():
        completion, completion_mask = rollout(student, student_ids, student_mask, MAX_NEW_TOKENS,
                                              tok.eot_id, torch.Generator().manual_seed(3))
        student_logits, teacher_logits = score(student, teacher, student_ids, student_mask,
                                               teacher_ids, teacher_mask, completion,
                                               completion_mask)
    expected = per_token_divergence(student_logits, teacher_logits, alpha)  # (B, C)
    student_p = student_logits.softmax(-1).gather(-1, completion[..., None]).squeeze(-1)  # (B, C)
    for b, r in enumerate(rollouts):
        n = int(completion_mask[b].sum())
        assert ([tok.enc.decode([i]) for i in completion[b, :n].tolist()]
                == [t["token"] for t in r["tokens"]])
        assert [t["divergence"] for t in r["tokens"]] == pytest.approx(expected[b, :n].tolist(),
                                                                       abs=1e-6)
        assert [t["student_p_sampled"] for t in r["tokens"]] == pytest.approx(
            student_p[b, :n].tolist(), abs=1e-6)
        assert all(t["student_p"] >= t["student_p_sampled"]
                   and t["teacher_p"] >= t["teacher_p_sampled"]
                   for t in r["tokens"])  # the top-1 is at least as likely as the sampled token
    # two different models
    assert all(t["divergence"] > 0.01 for r in rollouts for t in r["tokens"])


def test_inspect_step_skip_and_end_of_text(base, tok):
    """in_loss is false exactly on the first `skip` tokens; tokens stop at the first end-of-text."""
    for skip in (0, 2):
        for query, r in zip(QUERIES, inspect_step(base, base, tok, "jab", QUERIES, CPU, skip=skip)):
            assert (r["prompt"], r["expected"]) == (f"jab {query}>", NEW_SKILLS["jab"](query))
            assert ([t["in_loss"] for t in r["tokens"]]
                    == [j >= skip for j in range(len(r["tokens"]))])
            texts = [t["token"] for t in r["tokens"]]
            # the base's answers end
            assert texts[-1] == "<|endoftext|>" and "<|endoftext|>" not in texts[:-1]
            assert "".join(texts[:-1]) == r["sample"]


def test_after_first_wrong_hand_computed():
    """The first wrong token is the first that differs from the right answer (end-of-text
    included); the teacher 'follows' where its top-1 is the token the student went on with."""
    def tok(token, divergence, teacher_top):
        return {"token": token, "divergence": divergence, "teacher_top": teacher_top}
    eot = "<|endoftext|>"
    right = {"expected": "12", "right": True,
             "tokens": [tok("1", 0.1, "1"), tok("2", 0.1, "2"), tok(eot, 0.0, eot)]}
    # wrong from its second token: '1' agrees, 'x' is the first wrong (teacher wants '2'), then the
    # teacher follows 'y' but not the end-of-text
    wrong = {"expected": "12", "right": False,
             "tokens": [tok("1", 0.2, "1"), tok("x", 3.0, "2"), tok("y", 0.5, "y"),
                        tok(eot, 1.5, "z")]}
    # too short: the end-of-text is the first wrong token, with nothing after it
    short = {"expected": "12", "right": False, "tokens": [tok("1", 0.0, "1"), tok(eot, 2.0, "2")]}
    r = after_first_wrong([right, wrong, short], eot)
    assert r == {"wrong_rollouts": 2, "divergence_first_wrong": pytest.approx(2.5),
                 "tokens_after": 2, "divergence_after": pytest.approx(1.0),
                 "teacher_follows": pytest.approx(0.5)}
    assert after_first_wrong([right], eot) is None


def test_inspect_cli(tmp_path):
    rc, stdout, stderr = run_eval("--inspect", "jab", "--n", 2, "--device", "cpu",
                                  "--plot", tmp_path / "i.png")
    assert rc == 0, stderr
    samples = [line for line in stdout.splitlines() if line.startswith("'jab ")]
    assert len(samples) == 2
    assert any("(right)" in line for line in samples) and any("(wrong," in line for line in samples)
    assert "<eot>" in stdout and (tmp_path / "i.png").stat().st_size > 0
    assert "wrong rollouts of 8: divergence" in stdout  # after_first_wrong, over every rollout made


@pytest.mark.parametrize("args, text", [(["--inspect", "nosuch"], "nosuch"),
                                        (["--inspect", "jab", "--n", 0], "--n")])
def test_inspect_cli_bad_input(args, text):
    rc, stdout, stderr = run_eval(*args, "--device", "cpu")
    assert rc != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], stderr
