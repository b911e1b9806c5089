"""
Supervised fine-tuning (SFT): next-token training on demonstrations, used two ways.

1. Pretraining the toy "foundation model" from scratch on the mixture in data.py (prior
   skills plainly and with demonstrations, random throw-away skills with demonstrations),
   which gives it the prior skills and the ability to read a demonstration in context:

       python train_sft.py --pretrain --out runs/base          # ~6 min on 2 CPU cores

2. The SFT baseline: from a base checkpoint, learn new skills one after another from
   their demonstrations, evaluating every skill after each stage:

       python train_sft.py --init runs/base/ckpt.pt --skills rotl,swap,odds --out runs/sft

A stage ends when the current skill's validation accuracy reaches --stop-at or its step
budget runs out (train_sdft.py uses the same rule). The loss covers the target tokens
only (the demonstration and its end-of-text), not the prompt. Writes OUT/ckpt.pt after
every stage and OUT/metrics.jsonl (one record per step, eval, and stage).
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
import torch.nn.functional as F

from data import (NEW_SKILLS, PRIOR_SKILLS, Tokenizer, parse_skills, pretrain_examples,
                  sft_batch, skill_examples)
from eval import evaluate, kl_from_base
from model import GPT, GPTConfig, autocast, get_device, load_checkpoint, save_checkpoint

# -----------------------------------------------------------------------------
# arguments

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# run
parser.add_argument("--out", default="runs/sft", help="directory for ckpt.pt and metrics.jsonl")
parser.add_argument("--seed", type=int, default=0, help="seeds python, numpy and torch: same seed, same run")
parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
# what to learn
parser.add_argument("--pretrain", action="store_true", help="train a base model from scratch on the pretraining mixture")
parser.add_argument("--init", default="runs/base/ckpt.pt", help="base checkpoint to fine-tune (not with --pretrain)")
parser.add_argument("--skills", default=",".join(NEW_SKILLS), help="new skills to learn in this order, comma-separated")
parser.add_argument("--demo-style", default="expert", choices=["expert", "own"], help="style of the demonstrations")
# model size (pretraining only; fine-tuning reads it from the checkpoint)
parser.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
parser.add_argument("--n-head", type=int, default=4, help="attention heads")
parser.add_argument("--n-embd", type=int, default=128, help="model width")
# optimisation
parser.add_argument("--steps", type=int, default=None, help="step budget per stage (default: 5000 pretraining, 300 per skill)")
parser.add_argument("--batch-size", type=int, default=32, help="examples per step")
parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 pretraining, 1e-4 per skill)")
parser.add_argument("--warmup", type=int, default=10, help="linear warmup steps of the cosine schedule")
parser.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
# evaluation
parser.add_argument("--eval-every", type=int, default=10, help="steps between validation checks of the current skill")
parser.add_argument("--eval-n", type=int, default=100, help="queries per skill for validation and test accuracy")
parser.add_argument("--stop-at", type=float, default=0.95, help="end a stage when the skill's validation accuracy reaches this")
args = parser.parse_args()
if args.steps is None:
    args.steps = 5000 if args.pretrain else 300
if args.lr is None:
    args.lr = 1e-3 if args.pretrain else 1e-4

try:
    if not 0 < args.stop_at <= 1:
        raise ValueError(f"--stop-at must be in (0, 1], got {args.stop_at}")
    for flag in ("steps", "batch_size", "eval_every", "eval_n"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.lr <= 0 or args.warmup < 0 or args.grad_clip <= 0:
        raise ValueError("--lr and --grad-clip must be positive and --warmup non-negative")
    skills = [] if args.pretrain else parse_skills(args.skills)
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

if args.pretrain:
    config = GPTConfig(vocab_size=tok.vocab_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(config).to(device)
    stages = ["pretrain"]
else:
    try:
        model, _ = load_checkpoint(args.init, device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    base = copy.deepcopy(model).eval()  # the starting model, frozen: how far does each stage move from it?
    stages = skills
all_skills = list(PRIOR_SKILLS) + list(NEW_SKILLS)
print(f"model: {model.num_params() / 1e6:.2f}M parameters on {device}")

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
    if skill == "pretrain":
        prompts, targets = pretrain_examples(data_rng, args.batch_size)
    else:
        prompts, targets, _ = skill_examples(data_rng, skill, args.batch_size, args.demo_style)
    return [t.to(device) for t in sft_batch(tok, prompts, targets)]


# -----------------------------------------------------------------------------
# training: one stage per skill

t_start = time.time()
for stage, skill in enumerate(stages):
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    t_stage = time.time()
    model.train()
    for step in range(args.steps):
        # evaluate: stop the stage once the skill is learned (pretraining runs its full budget)
        if skill != "pretrain" and step % args.eval_every == 0:
            val_acc = evaluate(model, tok, [skill], device, split="val", n=args.eval_n)[skill]
            log({"stage": stage, "skill": skill, "step": step, "val_acc": val_acc})
            print(f"stage {stage + 1}/{len(stages)} {skill} | step {step} | val_acc {val_acc:.2f}")
            if val_acc >= args.stop_at:
                break

        # batch: prompt + demonstration, loss on the demonstration tokens only
        t0 = time.time()
        ids, mask, loss_mask = get_batch(skill)
        with autocast(device):
            logits = model(ids[:, :-1], mask[:, :-1])  # (B, T-1, V): predicts ids[:, 1:]
        token_loss = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
        weights = loss_mask[:, 1:].float()
        loss = (token_loss * weights).sum() / weights.sum()  # mean over target tokens

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

        # log
        ms = (time.time() - t0) * 1000
        log({"stage": stage, "skill": skill, "step": step, "loss": loss.item(), "lr": lr, "ms": ms})
        print(f"stage {stage + 1}/{len(stages)} {skill} | step {step + 1}/{args.steps} | loss {loss.item():.4f} | lr {lr:.2e} | {ms:.0f}ms")
    else:
        step = args.steps  # the whole budget ran

    # end of stage: test accuracy on every skill, then checkpoint
    accuracy = evaluate(model, tok, all_skills, device, split="test", n=args.eval_n)
    kl = None if skill == "pretrain" else kl_from_base(model, base, tok, skill, device, n=args.eval_n)
    seconds = time.time() - t_stage
    log({"stage": stage, "skill": skill, "steps": step, "seconds": seconds, "accuracy": accuracy, "kl_from_base": kl})
    print(f"stage {stage + 1}/{len(stages)} {skill} done: {step} steps, {seconds:.0f}s"
          + ("" if kl is None else f", kl_from_base {kl:.3f}"))
    print("  " + " ".join(f"{s} {a:.2f}" for s, a in accuracy.items()))
    save_checkpoint(ckpt_path, model, args, step, stage=stage, skills=stages)

print(f"total time {time.time() - t_start:.0f}s; checkpoint {ckpt_path}")
