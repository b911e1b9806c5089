"""
Tests of the SDFT algorithm (sdft.py) and its training script (train_sdft.py); the lab's
variants of it are tested in test_variants.py.

    python -m pytest -q tests/test_sdft.py

Divergences are checked against values computed independently in numpy / plain python;
the model-level tests use a tiny GPT on CPU; the script is run through subprocess with a
tiny budget. Together well under a minute on 2 CPU cores.
"""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from data import (NEW_SKILLS, PRIOR_SKILLS, Tokenizer, demonstration, encode_prompts,  # noqa: E402
                  eval_queries, skill_examples, student_prompt, teacher_prompt)
from eval import kl_from_base  # noqa: E402
from model import GPT, GPTConfig, load_checkpoint  # noqa: E402
from conftest import run_each  # noqa: E402
from sdft import (completion_logits, ema_update, loss_mask, make_teacher, masked_mean,  # noqa: E402
                  per_token_divergence, rollout, score, sdft_loss)

TOK = Tokenizer()
EOT = TOK.eot_id


def tiny_model(seed=0, sharp=True):
    """A 2-layer GPT over the toy vocabulary. sharp: larger weights than the GPT-2 init, so
    the next-token distributions depend clearly on the context (the default init's are
    nearly uniform, and differences between prompts sit near fp32 noise)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=TOK.vocab_size, n_layer=2, n_head=2, n_embd=32))
    if sharp:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:  # embeddings and linear layers, not the LayerNorms
                    p.normal_(0.0, 0.3 if name in ("wte.weight", "wpe.weight") else 0.2)
    return model


# -----------------------------------------------------------------------------
# reference math, independent of sdft.py: numpy float64 and plain loops

def np_softmax(logits):
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def np_kl(p, q):
    """KL(p || q) = sum_i p_i (log p_i - log q_i), with 0 log 0 = 0."""
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def np_divergence(student_logits, teacher_logits, alpha):
    s, t = np_softmax(student_logits), np_softmax(teacher_logits)
    if alpha == 0:
        return np_kl(t, s)
    if alpha == 1:
        return np_kl(s, t)
    m = (1 - alpha) * s + alpha * t
    return alpha * np_kl(t, m) + (1 - alpha) * np_kl(s, m)


CASES = [  # (student logits, teacher logits) over 2, 3 and 4 tokens
    ([0.0, 1.0], [2.0, -1.0]),
    ([1.0, 0.0, -1.0], [0.5, 0.2, -0.3]),
    ([0.3, -2.0, 1.5, 0.0], [-1.0, 0.7, 0.1, 2.2]),
    ([4.0, 0.0, 0.0, -3.0], [0.0, 0.0, 0.0, 0.0]),
]


def div(student_logits, teacher_logits, alpha):
    return per_token_divergence(torch.tensor(student_logits), torch.tensor(teacher_logits),
                                alpha).item()


# -----------------------------------------------------------------------------
# per_token_divergence

@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_divergence_matches_numpy(case, alpha):
    s, t = CASES[case]
    expected = np_divergence(s, t, alpha)
    assert div(s, t, alpha) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_divergence_by_hand():
    """S = (0.5, 0.5), T = (0.9, 0.1), given as log-probabilities, worked out by hand."""
    s, t = [math.log(0.5), math.log(0.5)], [math.log(0.9), math.log(0.1)]
    forward = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(T || S) = 0.368064
    reverse = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(S || T) = 0.510826
    m = (0.7, 0.3)  # M = 0.5 S + 0.5 T
    jsd = 0.5 * (0.9 * math.log(0.9 / m[0]) + 0.1 * math.log(0.1 / m[1])) \
        + 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    m3 = (0.7 * 0.5 + 0.3 * 0.9, 0.7 * 0.5 + 0.3 * 0.1)  # M = 0.7 S + 0.3 T
    gjsd = 0.3 * (0.9 * math.log(0.9 / m3[0]) + 0.1 * math.log(0.1 / m3[1])) \
        + 0.7 * (0.5 * math.log(0.5 / m3[0]) + 0.5 * math.log(0.5 / m3[1]))
    assert (forward == pytest.approx(0.368064, abs=1e-6)
            and reverse == pytest.approx(0.510826, abs=1e-6))
    assert div(s, t, 0.0) == pytest.approx(forward, abs=1e-6)
    assert div(s, t, 1.0) == pytest.approx(reverse, abs=1e-6)
    assert div(s, t, 0.5) == pytest.approx(jsd, abs=1e-6)
    assert div(s, t, 0.3) == pytest.approx(gjsd, abs=1e-6)
    assert forward != pytest.approx(reverse, abs=0.1)  # the direction matters


@pytest.mark.parametrize("alpha", [0.5, 0.3, 0.9])
def test_jsd_of_disjoint_distributions_is_binary_entropy(alpha):
    """S = (1, 0), T = (0, 1): M = (1 - a, a), so a KL(T||M) + (1 - a) KL(S||M) = H(a)
    (ln 2 for the symmetric JSD). Also exercises logits of -1e9."""
    expected = -alpha * math.log(alpha) - (1 - alpha) * math.log(1 - alpha)
    assert div([0.0, -1e9], [-1e9, 0.0], alpha) == pytest.approx(expected, abs=1e-6)
    if alpha == 0.5:
        assert expected == pytest.approx(math.log(2))


def test_ends_are_the_kls_not_the_vanishing_jsd():
    """At alpha 0 and 1 the interior formula tends to 0; the ends must be the two KLs."""
    s, t = CASES[2]
    forward, reverse = np_kl(np_softmax(t), np_softmax(s)), np_kl(np_softmax(s), np_softmax(t))
    assert forward > 0.5 and reverse > 0.5
    assert div(s, t, 0.0) == pytest.approx(forward, rel=1e-5)
    assert div(s, t, 1.0) == pytest.approx(reverse, rel=1e-5)
    assert div(s, t, 0) == pytest.approx(forward, rel=1e-5)  # an int alpha takes the same branch
    assert div(s, t, 1) == pytest.approx(reverse, rel=1e-5)
    # the generalized JSD itself vanishes at the ends: that is why they are special-cased
    assert abs(div(s, t, 1e-6)) < 1e-3 and abs(div(s, t, 1 - 1e-6)) < 1e-3


def test_symmetric_jsd_is_symmetric():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7, 11) * 2, torch.randn(5, 7, 11) * 2
    torch.testing.assert_close(per_token_divergence(s, t, 0.5), per_token_divergence(t, s, 0.5),
                               atol=1e-6, rtol=1e-5)
    # while the KLs are not
    assert not torch.allclose(per_token_divergence(s, t, 0.0), per_token_divergence(t, s, 0.0),
                              atol=1e-3)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_divergence_nonnegative_and_zero_on_equal(alpha):
    torch.manual_seed(1)
    s, t = torch.randn(4, 6, 13) * 3, torch.randn(4, 6, 13) * 3
    d = per_token_divergence(s, t, alpha)
    assert d.shape == (4, 6)
    assert (d >= -1e-6).all() and (d > 1e-3).all()
    # zero when the distributions agree, also when the logits differ by a constant per row
    shift = torch.randn(4, 6, 1) * 5
    assert per_token_divergence(s, s.clone(), alpha).abs().max() < 1e-6
    assert per_token_divergence(s, s + shift, alpha).abs().max() < 1e-5


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_divergence_finite_with_huge_negative_logits(alpha):
    s = torch.tensor([[0.0, -1e9, 1.0, -1e9], [-1e9, 2.0, -1e9, 0.5]], requires_grad=True)
    t = torch.tensor([[-1e9, -1e9, 0.5, 0.0], [-1e9, 0.0, 1.0, -1e9]], requires_grad=True)
    d = per_token_divergence(s, t, alpha)
    assert torch.isfinite(d).all() and (d >= -1e-6).all()
    d.sum().backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    # same support, different shape: the value is the ordinary one on the support
    row_s, row_t = [0.0, 1.0], [0.5, 0.0]
    same = per_token_divergence(torch.tensor([0.0, -1e9, 1.0, -1e9]),
                                torch.tensor([0.5, -1e9, 0.0, -1e9]), alpha)
    assert same.item() == pytest.approx(np_divergence(row_s, row_t, alpha), rel=1e-5, abs=1e-6)


def test_output_shape():
    B, C, V = 3, 5, 9
    assert per_token_divergence(torch.randn(B, C, V), torch.randn(B, C, V), 0.5).shape == (B, C)


def test_forward_kl_gradient_is_softmax_difference():
    """d KL(T || S) / d student_logits = softmax(student) - softmax(teacher), at every position."""
    torch.manual_seed(2)
    s = (torch.randn(2, 3, 6) * 2).requires_grad_(True)
    t = torch.randn(2, 3, 6) * 2
    per_token_divergence(s, t, alpha=0.0).sum().backward()
    s_np, t_np = s.detach().numpy(), t.numpy()
    expected = np.stack([np.stack([np_softmax(s_np[b, c]) - np_softmax(t_np[b, c])
                                   for c in range(3)])
                         for b in range(2)])
    np.testing.assert_allclose(s.grad.numpy(), expected, atol=1e-6)


# -----------------------------------------------------------------------------
# rollout

class FixedStudent:
    """Stands in for a model: generate returns a fixed completion."""

    def __init__(self, completion):
        self.completion = completion

    def generate(self, *args, **kwargs):
        return self.completion.clone()


def reference_completion_mask(completion):
    mask = torch.zeros_like(completion)
    for i, row in enumerate(completion.tolist()):
        for j, token in enumerate(row):
            mask[i, j] = 1
            if token == EOT:
                break
    return mask


def test_rollout_mask_fixed_completions():
    completion = torch.tensor([
        [5, 6, 7, 8, 9],  # never ends
        [EOT, EOT, EOT, EOT, EOT],  # ends at once
        [5, 6, EOT, EOT, EOT],  # ends in the middle
        [5, EOT, 7, EOT, 9],  # tokens after the first end-of-text never count
        [5, 6, 7, 8, EOT],  # ends on the last token
    ])
    ids, mask = encode_prompts(TOK, ["jab abc>"] * 5)
    out, completion_mask = rollout(FixedStudent(completion), ids, mask, 5, EOT)
    assert torch.equal(out, completion)
    assert torch.equal(completion_mask, torch.tensor([
        [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]))


def test_rollout_real_model_mask_and_backward():
    model = tiny_model(0, sharp=False)  # near-uniform: some rows end early, some never
    prompts = [student_prompt("jab", q) for q in ["abc", "abcdefg", "cab", "jihgf"] * 4]
    ids, mask = encode_prompts(TOK, prompts)
    generator = torch.Generator().manual_seed(0)
    completion, completion_mask = rollout(model, ids, mask, 24, EOT, generator)
    assert completion.shape == completion_mask.shape and completion.shape[0] == len(prompts)
    assert torch.equal(completion_mask, reference_completion_mask(completion))
    ends = completion_mask.sum(1)
    # both kinds of rows present
    assert (ends < completion.shape[1]).any() and (ends == completion.shape[1]).any()
    # finished rows hold end-of-text after their end
    for row, n in zip(completion.tolist(), ends.tolist()):
        assert all(tok == EOT for tok in row[n:])
    # the completion is an ordinary tensor: it can be an input of a differentiated pass
    assert not completion.is_inference()
    logits = completion_logits(model, ids, mask, completion, completion_mask)
    masked_mean(logits.logsumexp(-1), completion_mask).backward()
    assert model.wte.weight.grad is not None and torch.isfinite(model.wte.weight.grad).all()


# -----------------------------------------------------------------------------
# alignment of student and teacher over the shared completion

def padded_completions(texts_and_ends, C):
    """[(text, ended)] -> completion (B, C) right-filled with end-of-text, completion_mask,
    lengths."""
    rows, lengths = [], []
    for text, ended in texts_and_ends:
        tokens = TOK.encode(text) + ([EOT] if ended else [])
        lengths.append(len(tokens))
        rows.append(tokens + [EOT] * (C - len(tokens)))
    completion = torch.tensor(rows)
    completion_mask = (torch.arange(C)[None] < torch.tensor(lengths)[:, None]).long()
    return completion, completion_mask, lengths


def test_score_rows_match_rows_scored_alone():
    student, teacher = tiny_model(0), tiny_model(1)
    queries, styles = ["abc", "abcdefg", "dcbae"], ["expert", "own", "expert"]
    students = [student_prompt("jab", q) for q in queries]
    teachers = [teacher_prompt("jab", q, demonstration(NEW_SKILLS["jab"](q), st))
                for q, st in zip(queries, styles)]
    student_ids, student_mask = encode_prompts(TOK, students)
    teacher_ids, teacher_mask = encode_prompts(TOK, teachers)
    assert (student_mask == 0).any() and (teacher_mask == 0).any()  # both batches are padded
    assert student_ids.shape[1] != teacher_ids.shape[1]
    C = 8
    completion, completion_mask, lengths = padded_completions(
        [("bca", True), ("bcdefgab", False), ("z", True)], C)
    assert lengths == [4, 8, 2]
    student_logits, teacher_logits = score(student, teacher, student_ids, student_mask, teacher_ids,
                                           teacher_mask, completion, completion_mask)
    assert student_logits.shape == teacher_logits.shape == (3, C, TOK.vocab_size)
    assert student_logits.requires_grad and not teacher_logits.requires_grad
    for i, n in enumerate(lengths):
        s_ids, s_mask = encode_prompts(TOK, [students[i]])
        t_ids, t_mask = encode_prompts(TOK, [teachers[i]])
        assert s_mask.all() and t_mask.all()  # alone: no padding
        alone = score(student, teacher, s_ids, s_mask, t_ids, t_mask, completion[i:i + 1, :n],
                      torch.ones(1, n, dtype=torch.long))
        torch.testing.assert_close(student_logits[i, :n], alone[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(teacher_logits[i, :n], alone[1][0], atol=1e-5, rtol=1e-5)
    # the two roles really differ: different prompts and weights give different logits
    assert (student_logits - teacher_logits).abs().max() > 1e-2


def test_completion_logits_positions():
    """Position j of completion_logits predicts completion token j: it is the full
    sequence's logits at index len(prompt) - 1 + j."""
    model = tiny_model(0)
    ids, mask = encode_prompts(TOK, ["mug abcde>"])
    completion = torch.tensor([TOK.encode("43210") + [EOT]])
    logits = completion_logits(model, ids, mask, completion, torch.ones_like(completion))
    full = model(torch.cat([ids, completion], dim=1))  # plain causal path, no mask
    P, C = ids.shape[1], completion.shape[1]
    assert logits.shape == (1, C, TOK.vocab_size)
    for j in range(C):
        torch.testing.assert_close(logits[0, j], full[0, P - 1 + j], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[0, 0], full[0, P], atol=1e-3)  # an off-by-one would show


def test_zero_loss_and_gradient_when_teacher_sees_the_student_prompt():
    student = tiny_model(0)
    teacher = make_teacher(student, "ema")
    students, _, teachers = skill_examples(random.Random(0), "mug", 4, "expert")
    student_ids, student_mask = encode_prompts(TOK, students)
    completion, completion_mask = rollout(student, student_ids, student_mask, 10, EOT,
                                          torch.Generator().manual_seed(0))
    mask = loss_mask(completion_mask, skip=0)
    for alpha in (0.0, 0.5, 1.0):
        student.zero_grad(set_to_none=True)
        student_logits, teacher_logits = score(student, teacher, student_ids, student_mask,
                                               student_ids.clone(), student_mask.clone(),
                                               completion, completion_mask)
        loss = masked_mean(per_token_divergence(student_logits, teacher_logits, alpha), mask)
        assert abs(loss.item()) < 1e-6, alpha
        loss.backward()
        for name, p in student.named_parameters():
            assert p.grad is not None and p.grad.abs().max() < 1e-6, (alpha, name)
    # contrast: the demonstration-conditioned prompt gives a real loss and real gradients
    teacher_ids, teacher_mask = encode_prompts(TOK, teachers)
    student.zero_grad(set_to_none=True)
    student_logits, teacher_logits = score(student, teacher, student_ids, student_mask, teacher_ids,
                                           teacher_mask, completion, completion_mask)
    loss = masked_mean(per_token_divergence(student_logits, teacher_logits, 0.0), mask)
    loss.backward()
    assert loss.item() > 1e-3 and student.wte.weight.grad.abs().max() > 1e-4


def test_live_teacher_logits_are_detached():
    """With the live student as teacher, gradients come from the student pass only: they
    equal those with a frozen copy of the same weights as teacher."""
    student = tiny_model(0)
    copy_teacher = make_teacher(student, "base")
    students, _, teachers = skill_examples(random.Random(1), "jab", 3, "expert")
    s_ids, s_mask = encode_prompts(TOK, students)
    t_ids, t_mask = encode_prompts(TOK, teachers)
    completion, completion_mask = padded_completions(
        [("bca", True), ("abcdef", False), ("ddd", True)], 6)[:2]
    grads = []
    for teacher in (make_teacher(student, "live"), copy_teacher):
        student.zero_grad(set_to_none=True)
        logits = score(student, teacher, s_ids, s_mask, t_ids, t_mask, completion, completion_mask)
        masked_mean(per_token_divergence(*logits, 0.0), completion_mask).backward()
        grads.append([p.grad.clone() for p in student.parameters()])
    for g_live, g_copy in zip(*grads):
        torch.testing.assert_close(g_live, g_copy, atol=1e-7, rtol=1e-5)


# -----------------------------------------------------------------------------
# masks

def test_loss_mask():
    completion_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0],
                                    [1, 1, 1, 1, 1, 0]])
    for skip in (0, 1, 2, 3, 6, 9):
        expected = [[int(m == 1 and j >= skip) for j, m in enumerate(row)]
                    for row in completion_mask.tolist()]
        assert loss_mask(completion_mask, skip).tolist() == expected, skip
    assert loss_mask(completion_mask).tolist()[0] == [0, 0, 0, 1, 1, 1]  # default: the authors' 3


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_masked_positions_change_nothing(alpha):
    torch.manual_seed(5)
    B, C, V = 3, 6, 7
    completion_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    mask = loss_mask(completion_mask, skip=1)
    s0, t0 = torch.randn(B, C, V), torch.randn(B, C, V)
    off = (mask == 0)[..., None]  # (B, C, 1): masked positions
    s1 = torch.where(off, torch.randn(B, C, V) * 20, s0)
    t1 = torch.where(off, torch.randn(B, C, V) * 20, t0)
    results = []
    for s, t in ((s0, t0), (s1, t1)):
        s = s.clone().requires_grad_(True)
        loss = masked_mean(per_token_divergence(s, t, alpha), mask)
        loss.backward()
        results.append((loss.detach(), s.grad))
    (loss0, g0), (loss1, g1) = results
    assert loss0 > 1e-3
    torch.testing.assert_close(loss0, loss1, atol=0, rtol=0)
    on = ~off.expand_as(g0)
    torch.testing.assert_close(g0[on], g1[on], atol=0, rtol=0)
    assert (g0[~on] == 0).all() and (g1[~on] == 0).all()
    assert (g0[on] != 0).any()
    # masked_mean divides by the number of valid tokens of the whole batch
    values = per_token_divergence(s0, t0, alpha)
    manual = (sum(values[b, c].item() for b in range(B) for c in range(C) if mask[b, c])
              / mask.sum().item())
    assert loss0.item() == pytest.approx(manual, rel=1e-5)


def test_masked_mean_of_empty_mask_is_zero():
    values = torch.randn(2, 4, requires_grad=True)
    out = masked_mean(values, torch.zeros(2, 4, dtype=torch.long))
    assert out.item() == 0.0 and not torch.isnan(out)
    out.backward()
    assert (values.grad == 0).all()


def test_kl_from_base():
    """eval.kl_from_base: zero for the base itself, positive for a moved model, and equal to
    a per-row reference: KL(model || base) averaged over each greedy answer's tokens."""
    cpu = torch.device("cpu")
    base = tiny_model(0).eval()
    assert kl_from_base(base, base, TOK, "jab", cpu, n=8) == 0.0
    moved = tiny_model(1).eval()
    kl = kl_from_base(moved, base, TOK, "jab", cpu, n=8)
    total, count = 0.0, 0
    for q in eval_queries("test", 8):
        ids = torch.tensor([TOK.encode(student_prompt("jab", q))])
        answer = moved.generate(ids, None, 48, temperature=0.0, eot_id=EOT)[0].tolist()
        answer = answer[:answer.index(EOT) + 1] if EOT in answer else answer
        full = torch.tensor([ids[0].tolist() + answer])
        with torch.no_grad():
            log_m = torch.log_softmax(moved(full[:, :-1])[0, -len(answer):].double(), -1)
            log_b = torch.log_softmax(base(full[:, :-1])[0, -len(answer):].double(), -1)
        total += (log_m.exp() * (log_m - log_b)).sum().item()
        count += len(answer)
    assert kl > 0.01
    assert abs(kl - total / count) < 1e-4


# -----------------------------------------------------------------------------
# sdft_loss: one step's loss, the README's steps 1-4

def test_sdft_loss_is_its_steps():
    """sdft_loss = masked_mean(per_token_divergence(score(rollout))), with loss_mask's skip, on
    the same rollout (the same generator seed); what it returns is what the script logs."""
    student, teacher = tiny_model(0), tiny_model(1)  # another model: the teacher's logits matter
    students, _, teachers = skill_examples(random.Random(0), "mug", 6, "expert")
    s_ids, s_mask = encode_prompts(TOK, students)
    t_ids, t_mask = encode_prompts(TOK, teachers)
    for alpha, skip in ((0.0, 0), (1.0, 2), (0.5, 1)):
        loss, step = sdft_loss(student, teacher, s_ids, s_mask, t_ids, t_mask, 10, EOT, alpha,
                               skip, torch.Generator().manual_seed(4))
        completion, completion_mask = rollout(student, s_ids, s_mask, 10, EOT,
                                              torch.Generator().manual_seed(4))
        assert torch.equal(step["completion"], completion)
        assert torch.equal(step["completion_mask"], completion_mask)
        s_logits, t_logits = score(student, teacher, s_ids, s_mask, t_ids, t_mask, completion,
                                   completion_mask)
        per_token = per_token_divergence(s_logits, t_logits, alpha)
        expected = masked_mean(per_token, loss_mask(completion_mask, skip))
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        assert step["kl"].item() == pytest.approx(masked_mean(per_token, completion_mask).item())
        assert step["length"].item() == completion_mask.sum(1).float().mean().item()
        assert step["ended"].item() == (completion == EOT).any(1).float().mean().item()
        assert torch.equal(step["mask"], loss_mask(completion_mask, skip))
        assert step["rollout_s"] > 0


def test_sdft_loss_trains_the_student_only():
    student, teacher = tiny_model(0), make_teacher(tiny_model(1), "ema")
    students, _, teachers = skill_examples(random.Random(1), "jab", 4, "expert")
    loss, _ = sdft_loss(student, teacher, *encode_prompts(TOK, students),
                        *encode_prompts(TOK, teachers), 8, EOT,
                        generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert student.wte.weight.grad.abs().max() > 0
    assert all(p.grad is None for p in teacher.parameters())


# -----------------------------------------------------------------------------
# teachers and EMA

def test_make_teacher_kinds():
    student = tiny_model(0)
    student.train()
    assert make_teacher(student, "live") is student
    for kind in ("base", "ema"):
        teacher = make_teacher(student, kind)
        assert teacher is not student and not teacher.training
        assert student.training and all(p.requires_grad for p in student.parameters())
        for t, s in zip(teacher.parameters(), student.parameters()):
            assert not t.requires_grad and torch.equal(t, s) and t.data_ptr() != s.data_ptr()
        assert teacher.lm_head.weight is teacher.wte.weight  # the copy keeps the tied head
    with pytest.raises(ValueError, match="unknown teacher kind"):
        make_teacher(student, "frozen")


@pytest.mark.parametrize("rate", [0.01, 0.25, 1.0])
def test_ema_update_arithmetic(rate):
    student = tiny_model(0)
    teacher = make_teacher(student, "ema")
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))  # student moves away from the teacher
    t0 = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    s0 = {n: p.detach().clone() for n, p in student.named_parameters()}
    ema_update(teacher, student, rate)
    for n, p in teacher.named_parameters():
        expected = (1 - rate) * t0[n].double() + rate * s0[n].double()
        torch.testing.assert_close(p.double(), expected, atol=1e-6, rtol=1e-6)
        assert p.grad is None and not p.requires_grad
        if rate == 1.0:
            assert torch.equal(p, s0[n])  # rate 1 copies the student
        else:
            assert not torch.equal(p, s0[n]) and not torch.equal(p, t0[n])
    for n, p in student.named_parameters():
        assert torch.equal(p, s0[n])  # the student is untouched
    assert teacher.lm_head.weight is teacher.wte.weight
    sd = teacher.state_dict()
    assert torch.equal(sd["lm_head.weight"], sd["wte.weight"])


@pytest.mark.parametrize("kind", ["ema", "base", "live"])
def test_teacher_during_training(kind):
    """Three SDFT steps in process: the base teacher never changes, the EMA teacher follows
    the student's trajectory exactly, the live teacher is the student; the student moves."""
    rate = 0.5
    student = tiny_model(0)
    teacher = make_teacher(student, kind)
    init = {n: p.detach().clone() for n, p in student.named_parameters()}
    expected_teacher = {n: p.double() for n, p in init.items()}  # the EMA, tracked here by hand
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.0)
    generator, data_rng = torch.Generator().manual_seed(0), random.Random(0)
    for _ in range(3):
        students, _, teachers = skill_examples(data_rng, "jab", 4, "expert")
        s_ids, s_mask = encode_prompts(TOK, students)
        t_ids, t_mask = encode_prompts(TOK, teachers)
        completion, completion_mask = rollout(student, s_ids, s_mask, 6, EOT, generator)
        student_logits, teacher_logits = score(student, teacher, s_ids, s_mask, t_ids, t_mask,
                                               completion, completion_mask)
        loss = masked_mean(per_token_divergence(student_logits, teacher_logits, 0.0),
                           loss_mask(completion_mask, 0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if kind == "ema":
            ema_update(teacher, student, rate)
            for n, p in student.named_parameters():
                expected_teacher[n] = (1 - rate) * expected_teacher[n] + rate * p.detach().double()
    moved = [n for n, p in student.named_parameters() if not torch.equal(p, init[n])]
    assert "wte.weight" in moved and "blocks.0.attn.qkv.weight" in moved
    teacher_params = dict(teacher.named_parameters())
    if kind == "live":
        assert teacher is student
    elif kind == "base":
        for n, p in teacher_params.items():
            assert torch.equal(p, init[n]) and p.grad is None, n
    else:
        for n in moved:
            assert not torch.equal(teacher_params[n], init[n]), n
            torch.testing.assert_close(teacher_params[n].double(), expected_teacher[n], atol=1e-6,
                                       rtol=1e-6)
            assert teacher_params[n].grad is None
        assert teacher.lm_head.weight is teacher.wte.weight


# -----------------------------------------------------------------------------
# train_sdft.py through subprocess

def script_env():
    # one intra-op thread each: on 2 shared cores, more threads make these runs 10x slower
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_script(*args, timeout=120):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def base_ckpt(tiny_base):
    return tiny_base


SDFT_ARGS = ["--skills", "jab,mug", "--steps", 2, "--eval-every", 1, "--eval-n", 4,
             "--max-new-tokens", 8, "--batch-size", 8, "--device", "cpu", "--seed", 3]


@pytest.fixture(scope="module")
def sdft_runs(base_ckpt, tmp_path_factory):
    """The same command twice, run side by side: (out dir, completed process) for each."""
    outs = [tmp_path_factory.mktemp("sdft") / f"sdft{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "train_sdft.py", "--init", str(base_ckpt),
                               *map(str, SDFT_ARGS), "--out", str(out)],
                              cwd=ROOT, env=script_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for out in outs]
    results = []
    for out, proc in zip(outs, procs):
        stdout, stderr = proc.communicate(timeout=180)
        results.append((out, proc.returncode, stdout, stderr))
    return results


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_sdft_smoke(sdft_runs):
    out, rc, stdout, stderr = sdft_runs[0]
    assert rc == 0, stderr
    assert "Traceback" not in stderr
    records = read_metrics(out)
    steps = [r for r in records if "loss" in r]
    stages = [r for r in records if "accuracy" in r]
    assert steps, records
    for r in steps:
        for key in ("loss", "kl", "length", "ended", "gen_ms", "update_ms"):
            assert key in r and math.isfinite(r[key]), (key, r)
        assert r["loss"] >= 0 and r["kl"] >= 0
        assert 1 <= r["length"] <= 8 and 0 <= r["ended"] <= 1
        assert r["gen_ms"] > 0 and r["update_ms"] > 0
    assert [(r["stage"], r["skill"]) for r in stages] == [(0, "jab"), (1, "mug")]
    all_skills = set(PRIOR_SKILLS) | set(NEW_SKILLS)
    for r in stages:
        assert set(r["accuracy"]) == all_skills
        assert all(0 <= a <= 1 for a in r["accuracy"].values())
    assert {r["skill"] for r in steps} <= {"jab", "mug"} and all(r["step"] in (0, 1) for r in steps)
    model, ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["stage"] == 1 and ckpt["skills"] == ["jab", "mug"]
    # size read from the base checkpoint
    assert model.config.n_layer == 1 and model.config.n_embd == 32


def test_train_sdft_reproducible(sdft_runs):
    (out_a, rc_a, _, err_a), (out_b, rc_b, _, err_b) = sdft_runs
    assert rc_a == 0 and rc_b == 0, (err_a, err_b)
    losses_a = [r["loss"] for r in read_metrics(out_a) if "loss" in r]
    losses_b = [r["loss"] for r in read_metrics(out_b) if "loss" in r]
    assert losses_a and losses_a == losses_b
    a, b = (torch.load(out_a / "ckpt.pt", weights_only=True),
            torch.load(out_b / "ckpt.pt", weights_only=True))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


LAB = ["lab/variants.py"]  # the lab's variants: flags of lab/variants.py, before the script's
BAD_INPUTS = [  # (the command before the script, flags after --init BASE, text of the error)
    ([], ["--alpha", "-0.1"], "--alpha"),
    ([], ["--alpha", "1.5"], "--alpha"),
    ([], ["--ema-rate", "0"], "--ema-rate"),
    ([], ["--ema-rate", "1.5"], "--ema-rate"),
    ([], ["--skip", "-1"], "--skip"),
    ([], ["--skills", "jab,nope"], "nope"),
    ([], ["--init", "{missing}"], "no checkpoint"),  # a later --init overrides the first
    (LAB, ["--loss", "ce"], "--rollout student"),  # the student imitating its own samples
    (LAB, ["--loss", "ce", "--rollout", "teacher", "--teacher", "base", "--alpha", "1"],
     "--alpha"),
    (LAB, ["--teacher-sees", "query"], "--teacher base"),
    (LAB, ["--teacher-ckpt", "{missing}"], "--teacher base"),
    (LAB, ["--teacher", "base", "--teacher-ckpt", "{missing}"], "no checkpoint"),
    (LAB, ["--teacher", "base", "--teacher-ckpt", "{other_vocab}"],
     "the teacher must score the student's tokens"),
    (LAB, ["--agreed-prefix", "--cpt"], "--cpt needs --facts"),
    (LAB, ["--context", "docs"], "unknown --context 'docs'"),
    (LAB, ["--skills", "bux"], "unknown skill 'bux'"),  # a reasoning skill needs --reasoning
]


def test_train_sdft_bad_input(base_ckpt, tmp_path):
    """Each bad input, to the script or to its lab variants: non-zero exit, one line on stderr
    starting with 'error:', no traceback, no checkpoint written."""
    missing, other_vocab = str(tmp_path / "missing.pt"), str(tmp_path / "other-vocab.pt")
    full = torch.load(base_ckpt, weights_only=False)  # a checkpoint of another vocabulary
    config = {**full["model_config"], "vocab_size": full["model_config"]["vocab_size"] + 8}
    torch.save({**full, "model": GPT(GPTConfig(**config)).state_dict(), "model_config": config},
               other_vocab)
    tiny = ["--skills", "jab", "--steps", "1", "--eval-n", "2", "--batch-size", "2",
            "--max-new-tokens", "4"]
    # the tiny budget comes first, so the bad flag overrides it; a missing check makes a clean run
    results = run_each([[*lab, "train_sdft.py", "--init", base_ckpt, *tiny,
                         *[a.format(missing=missing, other_vocab=other_vocab) for a in flags],
                         "--device", "cpu", "--out", tmp_path / "bad"]
                        for lab, flags, _ in BAD_INPUTS])  # in one process: torch imported once
    for (lab, flags, needle), (returncode, _, stderr) in zip(BAD_INPUTS, results):
        lines = stderr.strip().splitlines()
        assert returncode != 0, flags
        assert "Traceback" not in stderr, (flags, stderr)
        assert len(lines) == 1 and lines[0].startswith("error:"), (flags, stderr)
        assert needle in lines[0], (flags, lines[0])
    assert not (tmp_path / "bad" / "ckpt.pt").exists()


def test_train_sdft_too_long_rollout_is_a_clean_error(base_ckpt, tmp_path):
    """--max-new-tokens beyond what block_size (128) leaves after the teacher prompt (up to
    50 tokens here): the run must either cope or stop with one 'error:' line, never crash
    with a traceback from model.forward in the middle of training."""
    r = run_script("train_sdft.py", "--init", base_ckpt, "--skills", "jab", "--steps", 1,
                   "--eval-n", 4, "--max-new-tokens", 100, "--device", "cpu",
                   "--out", tmp_path / "long")
    assert "Traceback" not in r.stderr, (
        "BUG: train_sdft.py does not check --max-new-tokens against the model's block_size; "
        "the teacher pass over [teacher prompt | completion] exceeds it and crashes:\n"
        + r.stderr[-300:])
    if r.returncode != 0:
        assert (r.stderr.strip().startswith("error:")
                and len(r.stderr.strip().splitlines()) == 1), r.stderr
