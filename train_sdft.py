"""
Self-Distillation Fine-Tuning (SDFT): learn new skills from demonstrations, on-policy.

From a base checkpoint, learn new skills one after another, evaluating every skill after
each stage:

    python train_sdft.py --init runs/base/ckpt.pt --skills rotl,swap,odds --out runs/sdft

Each step: the student samples one answer per query (temperature 1); the teacher, an
EMA of the student shown a demonstration for the same query, scores that answer; the
loss is the per-token forward KL(teacher || student) over the full vocabulary (sdft.py has
the method, the README the recipe). Simplified for the toy: no completion tokens are skipped
by default (the paper skips 3, but a toy answer is only 3 to 6 tokens long). A stage
ends when the current skill's validation accuracy reaches --stop-at or its step budget
runs out (the same rule as train_sft.py). Writes OUT/ckpt.pt after every stage and
OUT/metrics.jsonl (one record per step, eval, and stage).
"""

import argparse
import copy
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch

from data import (LETTERS, MAX_LEN, NEW_SKILLS, PRIOR_SKILLS, SKILLS, Tokenizer, demonstration, encode_prompts,
                  parse_skills, skill_examples, teacher_prompt)
from eval import evaluate, kl_from_base
from model import autocast, get_device, load_checkpoint, save_checkpoint
from sdft import ema_update, loss_mask, make_teacher, masked_mean, per_token_divergence, rollout, score

# -----------------------------------------------------------------------------
# arguments

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# run
parser.add_argument("--out", default="runs/sdft", help="directory for ckpt.pt and metrics.jsonl")
parser.add_argument("--seed", type=int, default=0, help="seeds python, numpy and torch: same seed, same run")
parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
# what to learn
parser.add_argument("--init", default="runs/base/ckpt.pt", help="base checkpoint to fine-tune")
parser.add_argument("--skills", default=",".join(NEW_SKILLS), help="new skills to learn in this order, comma-separated")
parser.add_argument("--demo-style", default="expert", choices=["expert", "own"], help="style of the demonstrations")
# SDFT
parser.add_argument("--alpha", type=float, default=0.0, help="divergence: 0 forward KL(teacher||student), 1 reverse KL, between: generalized JSD")
parser.add_argument("--teacher", default="ema", choices=["ema", "base", "live"], help="teacher weights: EMA of the student, frozen base, or the student itself")
parser.add_argument("--ema-rate", type=float, default=0.01, help="EMA teacher update: teacher <- (1-rate) teacher + rate student")
parser.add_argument("--skip", type=int, default=0, help="leave the first SKIP completion tokens out of the loss "
                    "(the paper: 3, against teacher-only openings; a toy answer is 3-6 tokens and has none)")
parser.add_argument("--max-new-tokens", type=int, default=32, help="longest student rollout")
# optimisation
parser.add_argument("--steps", type=int, default=300, help="step budget per stage")
parser.add_argument("--batch-size", type=int, default=32, help="queries per step (one rollout each)")
parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
parser.add_argument("--warmup", type=int, default=10, help="linear warmup steps of the cosine schedule")
parser.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
# evaluation
parser.add_argument("--eval-every", type=int, default=10, help="steps between validation checks of the current skill")
parser.add_argument("--eval-n", type=int, default=100, help="queries per skill for validation and test accuracy")
parser.add_argument("--stop-at", type=float, default=0.95, help="end a stage when the skill's validation accuracy reaches this")
args = parser.parse_args()

try:
    if not 0 < args.stop_at <= 1:
        raise ValueError(f"--stop-at must be in (0, 1], got {args.stop_at}")
    for flag in ("steps", "batch_size", "eval_every", "eval_n", "max_new_tokens"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.lr <= 0 or args.warmup < 0 or args.grad_clip <= 0:
        raise ValueError("--lr and --grad-clip must be positive and --warmup non-negative")
    if not 0 <= args.alpha <= 1:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
    if not 0 < args.ema_rate <= 1:
        raise ValueError(f"--ema-rate must be in (0, 1], got {args.ema_rate}")
    if args.skip < 0:
        raise ValueError(f"--skip must be non-negative, got {args.skip}")
    skills = parse_skills(args.skills)
    device = get_device(args.device)
except ValueError as e:
    sys.exit(f"error: {e}")

# -----------------------------------------------------------------------------
# setup

random.seed(args.seed)
np.random.seed(args.seed)
torch.manual_seed(args.seed)
tok = Tokenizer()
data_rng = random.Random(args.seed)  # draws the training queries: the same for SFT and SDFT
generator = torch.Generator(device).manual_seed(args.seed)  # draws the student's rollouts

try:
    model, _ = load_checkpoint(args.init, device)
    query = LETTERS[:MAX_LEN]  # a longest query: the teacher scores [teacher prompt | rollout]
    longest = max(len(tok.encode(teacher_prompt(s, query, demonstration(SKILLS[s](query), args.demo_style))))
                  for s in skills)
    if longest + args.max_new_tokens > model.config.block_size:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} does not fit: the teacher prompt takes up to "
                         f"{longest} of the model's {model.config.block_size} positions")
except ValueError as e:
    sys.exit(f"error: {e}")
teacher = make_teacher(model, args.teacher)  # one teacher across all stages
base = copy.deepcopy(model).eval()  # the starting model, frozen: how far does each stage move from it?
stages = skills
all_skills = list(PRIOR_SKILLS) + list(NEW_SKILLS)
print(f"model: {model.num_params() / 1e6:.2f}M parameters on {device}; teacher: {args.teacher}")

os.makedirs(args.out, exist_ok=True)
ckpt_path = os.path.join(args.out, "ckpt.pt")
log_file = open(os.path.join(args.out, "metrics.jsonl"), "w")


def log(record):
    log_file.write(json.dumps(record) + "\n")
    log_file.flush()


def lr_at(step):
    """Linear warmup, then cosine decay to 10% of the peak, over one stage."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def get_batch(skill):
    students, _, teachers = skill_examples(data_rng, skill, args.batch_size, args.demo_style)
    return [t.to(device) for t in (*encode_prompts(tok, students), *encode_prompts(tok, teachers))]


# -----------------------------------------------------------------------------
# training: one stage per skill

t_start = time.time()
for stage, skill in enumerate(stages):
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    t_stage = time.time()
    model.train()
    for step in range(args.steps):
        # evaluate: stop the stage once the skill is learned
        if step % args.eval_every == 0:
            val_acc = evaluate(model, tok, [skill], device, split="val", n=args.eval_n)[skill]
            log({"stage": stage, "skill": skill, "step": step, "val_acc": val_acc})
            print(f"stage {stage + 1}/{len(stages)} {skill} | step {step} | val_acc {val_acc:.2f}")
            if val_acc >= args.stop_at:
                break

        # batch: the student samples its own answer to each query (on-policy)
        t0 = time.time()
        student_ids, student_mask, teacher_ids, teacher_mask = get_batch(skill)
        with autocast(device):
            completion, completion_mask = rollout(model, student_ids, student_mask, args.max_new_tokens,
                                                  tok.eot_id, generator)  # (B, C) each
        t_gen = time.time()
        # loss: the teacher, shown the demonstration, scores the student's tokens
        with autocast(device):
            student_logits, teacher_logits = score(model, teacher, student_ids, student_mask, teacher_ids,
                                                   teacher_mask, completion, completion_mask)  # (B, C, V) each
        per_token = per_token_divergence(student_logits, teacher_logits, args.alpha)  # (B, C)
        mask = loss_mask(completion_mask, args.skip)  # padding, after end-of-text, first tokens: out
        loss = masked_mean(per_token, mask)  # mean over valid tokens of the batch

        # step
        if not torch.isfinite(loss):  # stop before the update: nothing is saved, ckpt.pt stays as it was
            sys.exit(f"error: non-finite loss at stage {stage + 1} step {step}; stopped without saving this stage")
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        if args.teacher == "ema":
            ema_update(teacher, model, args.ema_rate)  # after every optimizer step

        # log
        ms, gen_ms, update_ms = (time.time() - t0) * 1000, (t_gen - t0) * 1000, (time.time() - t_gen) * 1000
        kl = masked_mean(per_token.detach(), completion_mask).item()  # over every completion token
        length = completion_mask.sum(1).float().mean().item()  # tokens up to and including end-of-text
        ended = (completion == tok.eot_id).any(1).float().mean().item()  # rollouts that finished
        log({"stage": stage, "skill": skill, "step": step, "loss": loss.item(), "kl": kl, "length": length,
             "ended": ended, "lr": lr, "ms": ms, "gen_ms": gen_ms, "update_ms": update_ms})
        print(f"stage {stage + 1}/{len(stages)} {skill} | step {step + 1}/{args.steps} | loss {loss.item():.4f} | kl {kl:.4f} "
              f"| len {length:.1f} | ended {ended:.2f} | lr {lr:.2e} | {ms:.0f}ms (gen {gen_ms:.0f}, update {update_ms:.0f})")
    else:
        step = args.steps  # the whole budget ran

    # end of stage: test accuracy on every skill, then checkpoint
    accuracy = evaluate(model, tok, all_skills, device, split="test", n=args.eval_n)
    kl = kl_from_base(model, base, tok, skill, device, n=args.eval_n)
    seconds = time.time() - t_stage
    log({"stage": stage, "skill": skill, "steps": step, "seconds": seconds, "accuracy": accuracy, "kl_from_base": kl})
    print(f"stage {stage + 1}/{len(stages)} {skill} done: {step} steps, {seconds:.0f}s, kl_from_base {kl:.3f}")
    print("  " + " ".join(f"{s} {a:.2f}" for s, a in accuracy.items()))
    save_checkpoint(ckpt_path, model, args, step, stage=stage, skills=stages)

print(f"total time {time.time() - t_start:.0f}s; checkpoint {ckpt_path}")
