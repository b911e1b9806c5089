"""
Self-Distillation Fine-Tuning (SDFT), Shenfeld et al. 2026, as short pure functions.

One network plays two roles. The *student* sees only the query and samples its own
answer (on-policy). The *teacher* is the same network (an EMA of its weights) shown the
query *and an expert demonstration* for it. At every position of the student's own
sample, the student is trained to match the teacher's next-token distribution. One step,
numbered as the README numbers it:

    loss, step = sdft_loss(student, teacher, student_ids, student_mask,  # 1. rollout
                           teacher_ids, teacher_mask, max_new_tokens,    # 2. score
                           eot_id, alpha=0.0, skip=0)                    # 3.-4. divergence,
    loss.backward(); optimizer.step()                                    #       mask and mean
    ema_update(teacher, student, rate=0.01)                              # 5. update

sdft_loss calls the pieces below, one per step. Simplified relative to the paper: one toy
model instead of a 7B LLM, a toy teacher template, and no top-p/top-k in sampling (the
paper used none either). The paper's ablations and this project's own variants (offline
rollouts, cross-entropy on samples, the agreed prefix, ...) are in lab/variants.py.
"""

import copy
import math
import time

import torch
import torch.nn.functional as F


def rollout(student, prompt_ids, prompt_mask, max_new_tokens, eot_id, generator=None,
            temperature=1.0, top_k=None):
    """Sample one completion per (left-padded) student prompt: temperature 1, no top-k, as in
    the paper. Returns completion ids (B, C) and completion_mask (B, C): 1 up to and including
    the first end-of-text token, 0 after it (generate fills finished rows with end-of-text)."""
    completion = student.generate(prompt_ids, prompt_mask, max_new_tokens, temperature=temperature,
                                  top_k=top_k, generator=generator, eot_id=eot_id)  # (B, C)
    completion = completion.clone()  # out of inference mode, so autograd may save it as an input
    is_eot = (completion == eot_id).long()
    eot_before = is_eot.cumsum(dim=1) - is_eot  # end-of-text tokens strictly before each position
    return completion, (eot_before == 0).long()


def completion_logits(model, prompt_ids, prompt_mask, completion, completion_mask):
    """The logits that predict each completion token, (B, C, V), from one forward pass over
    [left-padded prompt | completion]. Position ids come from the mask, so each row is
    scored as if it were alone, and the last C+1 positions line up across rows."""
    C = completion.shape[1]
    ids = torch.cat([prompt_ids, completion], dim=1)  # (B, P + C)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    logits = model(ids[:, :-1], mask[:, :-1])  # (B, P + C - 1, V): the last token predicts nothing
    return logits[:, -C:]  # position P - 1 + j predicts completion token j


def score(student, teacher, student_ids, student_mask, teacher_ids, teacher_mask,
          completion, completion_mask):
    """Student and teacher logits over the *same* completion tokens, aligned row by row,
    both (B, C, V). The student sees only its prompt (with gradients); the teacher sees the
    demonstration-conditioned prompt, without gradients: its logits are fixed targets."""
    student_logits = completion_logits(student, student_ids, student_mask,
                                       completion, completion_mask)
    with torch.no_grad():  # teacher targets are detached (also if the teacher is the live student)
        teacher_logits = completion_logits(teacher, teacher_ids, teacher_mask,
                                           completion, completion_mask)
    return student_logits, teacher_logits


def per_token_divergence(student_logits, teacher_logits, alpha=0.0):
    """Divergence between the two next-token distributions over the full vocabulary, per
    position: (..., V) -> (...). With S = softmax(student), T = softmax(teacher):

        alpha = 0:      forward KL(T || S) = sum T (log T - log S)
                        (what all the paper's results used, per the authors, and their default)
        alpha = 1:      reverse KL(S || T) = sum S (log S - log T)   (the paper's equations)
        0 < alpha < 1:  generalized JSD, M = (1 - alpha) S + alpha T,
                        alpha KL(T || M) + (1 - alpha) KL(S || M)    (alpha = 0.5: symmetric JSD)

    The ends are special-cased: the JSD formula itself tends to 0 at alpha = 0 and 1.
    Computed from log-probabilities in fp32, so very negative logits stay finite."""
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    if alpha == 0:
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if alpha == 1:
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    log_m = torch.logsumexp(torch.stack([log_s + math.log(1 - alpha), log_t + math.log(alpha)]),
                            dim=0)  # log M
    kl_t_m = (log_t.exp() * (log_t - log_m)).sum(-1)
    kl_s_m = (log_s.exp() * (log_s - log_m)).sum(-1)
    return alpha * kl_t_m + (1 - alpha) * kl_s_m


def loss_mask(completion_mask, skip=3):
    """Which completion tokens count: not padding, nothing after the first end-of-text, and
    not the first `skip` tokens (the authors' setting, 3: it keeps the student from learning
    openings that only make sense for a teacher that has seen a demonstration)."""
    positions = torch.arange(completion_mask.shape[1], device=completion_mask.device)
    return completion_mask * (positions >= skip)  # (B, C)


def masked_mean(values, mask):
    """Mean over the valid tokens of the whole batch (a token-level mean, like the usual
    SFT loss: longer completions weigh more). An all-masked batch gives 0, not NaN."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def sdft_loss(student, teacher, student_ids, student_mask, teacher_ids, teacher_mask,
              max_new_tokens, eot_id, alpha=0.0, skip=0, generator=None):
    """One SDFT step's loss on a batch of queries: the README's steps 1 to 4 (step 5, the
    update, is the caller's). The prompts are left-padded (data.encode_prompts): the student's
    is the query, the teacher's the query after its demonstration. Returns the loss (a scalar,
    with gradients into the student) and `step`, what the step computed: the completion and
    its mask, both models' logits, the per-token divergence, the loss mask, and what is logged
    (kl over every answer token, length, ended, rollout_s)."""
    t0 = time.time()
    # 1. rollout: the student samples its own answer to each query, at temperature 1
    sampler = getattr(student, "module", student)  # under DDP, sample with the plain model
    completion, completion_mask = rollout(sampler, student_ids, student_mask, max_new_tokens,
                                          eot_id, generator)  # (B, C) each
    rollout_s = time.time() - t0
    # 2. score: the teacher, shown the demonstration, and the student, shown only the query,
    #    score the same tokens; the teacher's logits are fixed targets (no gradients)
    student_logits, teacher_logits = score(student, teacher, student_ids, student_mask,
                                           teacher_ids, teacher_mask,
                                           completion, completion_mask)  # (B, C, V) each
    # 3. divergence at every answer position, over the whole vocabulary (alpha 0: forward KL)
    per_token = per_token_divergence(student_logits, teacher_logits, alpha)  # (B, C)
    # 4. mask and mean: not padding, nothing after end-of-text, not the first `skip` tokens
    mask = loss_mask(completion_mask, skip)
    loss = masked_mean(per_token, mask)
    return loss, step_record(completion, completion_mask, mask, student_logits, teacher_logits,
                             per_token, rollout_s, eot_id)


def step_record(completion, completion_mask, mask, student_logits, teacher_logits, per_token,
                rollout_s, eot_id):
    """What a step computed, for the log and for inspection, with what is logged: kl over every
    answer token, the mean length (end-of-text included) and the share of rows that ended."""
    return {"completion": completion, "completion_mask": completion_mask, "mask": mask,
            "student_logits": student_logits, "teacher_logits": teacher_logits,
            "per_token": per_token, "rollout_s": rollout_s,
            "kl": masked_mean(per_token.detach(), completion_mask),
            "length": completion_mask.sum(1).float().mean(),
            "ended": (completion == eot_id).any(1).float().mean()}


def make_teacher(student, kind):
    """The teacher's weights. 'ema' (default): a copy of the student that follows it slowly
    (ema_update after every step). 'base': a frozen copy of the starting model. 'live': the
    student itself, used under no_grad (the authors found this unstable)."""
    if kind == "live":
        return student
    if kind not in ("ema", "base"):
        raise ValueError(f"unknown teacher kind '{kind}' (ema, base, live)")
    teacher = copy.deepcopy(student).eval()
    teacher.requires_grad_(False)  # the teacher never receives gradients
    return teacher


@torch.no_grad()
def ema_update(teacher, student, rate):
    """teacher <- (1 - rate) * teacher + rate * student, parameters only (no optimizer state),
    in place. rate 0.01 is the authors' setting (0.01 to 0.05 swept)."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s, rate)  # t + rate * (s - t)
