"""
Tests of the lab's variants of the training scripts (lab/variants.py): the paper's ablations
(offline rollouts, cross-entropy on samples, re-invoke), the agreed prefix, and the wrapper
itself (its flags are kept for --resume; bad combinations get one error line).

    python -m pytest -q tests/test_variants.py
"""

import json
import math
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from data import Tokenizer, encode_prompts, skill_examples  # noqa: E402
from lab.variants import agreed_prefix, sampled_cross_entropy, variant_loss  # noqa: E402
from model import GPT, GPTConfig, load_checkpoint  # noqa: E402
from sdft import (loss_mask, masked_mean, per_token_divergence, rollout, score,  # noqa: E402
                  sdft_loss)

TOK = Tokenizer()
EOT = TOK.eot_id
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def np_softmax(logits):
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def popen(*args):
    import os
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env={**os.environ, **ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -----------------------------------------------------------------------------
# the variants' pieces

def test_sampled_cross_entropy_value_and_gradient():
    """-log S(y) at the given tokens; its gradient is S - onehot(y), the SFT gradient."""
    torch.manual_seed(5)
    s = (torch.randn(2, 3, 5) * 2).requires_grad_(True)
    y = torch.randint(5, (2, 3))
    loss = sampled_cross_entropy(s, y)
    loss.sum().backward()
    for b in range(2):
        for c in range(3):
            ps = np_softmax(s[b, c].detach().numpy())
            assert loss[b, c].item() == pytest.approx(-math.log(ps[y[b, c]]), rel=1e-5)
            np.testing.assert_allclose(s.grad[b, c].numpy(), ps - np.eye(5)[y[b, c]], atol=1e-6)


def test_forward_kl_to_a_sure_teacher_is_cross_entropy():
    """When the teacher is sure of the sampled token, forward KL and cross-entropy on it have the
    same gradient: offline distillation on the teacher's samples is then SFT on them."""
    torch.manual_seed(6)
    s1 = torch.randn(4, 5, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    y = torch.randint(5, (4,))
    sure = torch.full((4, 5), -1e4).scatter(1, y[:, None], 0.0)  # all the teacher's mass on y
    per_token_divergence(s1, sure, 0.0).sum().backward()
    sampled_cross_entropy(s2[:, None], y[:, None]).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad)


def test_agreed_prefix_by_hand():
    """Tokens up to and including the first one that is not the teacher's top-1; padding stays
    out."""
    V = 5
    teacher_top = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    teacher_logits = torch.nn.functional.one_hot(teacher_top, V).float() * 3.0  # (B, C, V)
    completion = torch.tensor([[1, 2, 3, 4],   # all agreed
                               [1, 0, 3, 4],   # the second is not the teacher's: it counts,
                                               # the rest does not
                               [0, 2, 3, 4]])  # the first is not
    completion_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    expected = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])
    assert torch.equal(agreed_prefix(completion, teacher_logits, completion_mask), expected)


def test_variant_loss_without_switches_is_sdft_loss():
    """variant_loss with every switch at its default computes sdft.sdft_loss, bit for bit."""
    torch.manual_seed(0)
    student = GPT(GPTConfig(vocab_size=TOK.vocab_size, n_layer=1, n_head=2, n_embd=32))
    teacher = GPT(GPTConfig(vocab_size=TOK.vocab_size, n_layer=1, n_head=2, n_embd=32))
    students, _, teachers = skill_examples(random.Random(2), "hub", 5, "expert")
    batch = (*encode_prompts(TOK, students), *encode_prompts(TOK, teachers))
    a, step_a = sdft_loss(student, teacher, *batch, 8, EOT, 0.5, 1,
                          torch.Generator().manual_seed(1))
    b, step_b = variant_loss(student, teacher, *batch, 8, EOT, 0.5, 1,
                             torch.Generator().manual_seed(1))
    assert a.item() == b.item()
    for key in ("completion", "per_token", "mask", "kl", "length", "ended"):
        assert torch.equal(step_a[key], step_b[key]), key


# -----------------------------------------------------------------------------
# the variants, run through lab/variants.py

def first_step_loss(init, variant, seed=3, batch_size=4, teacher_ckpt=None):
    """The loss of train_sdft.py's first step, computed here from sdft.py's pieces: the same
    queries (data stream seed), rollouts (generator seed) and weights, for a variant of flags."""
    student, _ = load_checkpoint(str(init))
    # at step 0 the EMA teacher, the frozen base and the student are the same weights
    teacher = load_checkpoint(str(teacher_ckpt))[0] if teacher_ckpt else student
    students, _, teachers = skill_examples(random.Random(seed), "jab", batch_size, "expert")
    if variant.get("--teacher-sees") == "query":
        teachers = students
    s_ids, s_mask = encode_prompts(TOK, students)
    t_ids, t_mask = encode_prompts(TOK, teachers)
    with torch.no_grad():
        sampler = ((teacher, t_ids, t_mask) if variant.get("--rollout") == "teacher"
                   else (student, s_ids, s_mask))
        completion, completion_mask = rollout(*sampler, 8, EOT, torch.Generator().manual_seed(seed))
        student_logits, teacher_logits = score(student, teacher, s_ids, s_mask, t_ids, t_mask,
                                               completion, completion_mask)
    if variant.get("--loss") == "ce":
        per_token = sampled_cross_entropy(student_logits, completion)
    else:
        per_token = per_token_divergence(student_logits, teacher_logits,
                                         float(variant.get("--alpha", 0)))
    mask = loss_mask(completion_mask, int(variant.get("--skip", 0)))
    if "--agreed-prefix" in variant:
        mask = mask * agreed_prefix(completion, teacher_logits, completion_mask)
    return masked_mean(per_token, mask).item()


LOSS_VARIANTS = [  # each flag set must make the run compute what first_step_loss computes
    {},  # SDFT: the student samples, forward KL to the demonstration-conditioned teacher
    {"--rollout": "teacher", "--teacher": "base"},  # offline distillation: the teacher's samples
    {"--rollout": "teacher", "--teacher": "base", "--loss": "ce"},  # SFT on the teacher's samples
    {"--alpha": "0.5", "--skip": "1"},
    {"--teacher": "base", "--teacher-sees": "query", "--teacher-ckpt": "{other}"},  # re-invoke
    {"--agreed-prefix": None},  # only the tokens up to the first one the teacher would not write
]


LAB_FLAGS = {"--rollout", "--loss", "--teacher-sees", "--teacher-ckpt", "--agreed-prefix"}


def test_variants_compute_what_they_say(tiny_base, tmp_path):
    """Who samples (--rollout), the loss (--loss), what the teacher sees (--teacher-sees) and
    whose weights it has (--teacher-ckpt): the first logged loss of each run equals the loss
    computed independently here. The re-invoke teacher is another model (the shipped base,
    another size: only the vocabulary must match)."""
    other = ROOT / "results" / "base" / "ckpt.pt"
    runs = []
    for i, variant in enumerate(LOSS_VARIANTS):
        flags = [str(v).format(other=other) for kv in variant.items() for v in kv if v is not None]
        out = tmp_path / f"variant{i}"
        lab = set(variant) & LAB_FLAGS  # the paper's own knobs run the script itself
        script = ["lab/variants.py", "train_sdft.py"] if lab else ["train_sdft.py"]
        runs.append((variant, out, popen(
            *script, "--init", tiny_base, "--skills", "jab", "--steps", "1", "--eval-n", "2",
            "--batch-size", "4", "--max-new-tokens", "8", "--seed", "3", "--device", "cpu",
            *flags, "--out", out)))
    losses = []
    for variant, out, proc in runs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, (variant, stderr)
        logged = [r["loss"] for r in read_metrics(out) if "loss" in r][0]
        expected = first_step_loss(tiny_base, variant,
                                   teacher_ckpt=other if "--teacher-ckpt" in variant else None)
        assert logged == pytest.approx(expected, rel=1e-5, abs=1e-6), variant
        losses.append(logged)
    assert len(set(losses)) == len(losses)  # and the variants do differ


def test_variant_flags_are_checked_on_resume(tiny_base, tmp_path):
    """A run of a variant is resumed only as that variant: its flags are in the checkpoint, and
    resuming with the plain script stops with one error line."""
    out = tmp_path / "agreed"
    tiny = ["--init", tiny_base, "--skills", "jab", "--eval-n", "2", "--batch-size", "2",
            "--max-new-tokens", "4", "--device", "cpu", "--out", out]
    first = popen("lab/variants.py", "train_sdft.py", "--agreed-prefix", "--steps", "1", *tiny)
    assert first.wait(timeout=120) == 0, first.stderr.read()
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["args"]["agreed_prefix"] is True and "rollout" not in ckpt["args"]  # only set flags
    again = popen("train_sdft.py", "--steps", "1", "--resume", *tiny)
    _, stderr = again.communicate(timeout=120)
    lines = stderr.strip().splitlines()
    assert again.returncode != 0 and len(lines) == 1, stderr
    assert "--agreed-prefix True, not None" in lines[0], lines[0]
