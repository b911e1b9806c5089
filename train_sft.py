"""
Supervised fine-tuning (SFT), the baseline: next-token training on demonstrations.

From a base checkpoint, learn new skills one after another, evaluating every skill after each
stage:

    python train_sft.py --out runs/sft              # jab, mug, hub from the shipped base (--init)
    torchrun --nproc_per_node 2 train_sft.py --out runs/sft       # two processes
    python train_sft.py --out runs/sft --resume     # continue OUT/ckpt.pt

Each step: the loss is the cross-entropy of the demonstration's tokens (and its end-of-text)
after the query; the prompt is not in the loss.

A stage ends when the skill's validation accuracy reaches --stop-at or its step budget runs
out (train_sft.py and train_sdft.py share the rule), on the last weights or, with --keep-best,
on those of its best validation. Writes OUT/ckpt.pt after every stage (and every --ckpt-every
steps) and OUT/metrics.jsonl (one record per step, validation and stage).
"""

import argparse
import copy
import json
import math
import os
import random
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import (NEW_SKILLS, PRIOR_SKILLS, SEQUENCE, Tokenizer, fact_examples, knowledge_facts,
                  parse_skills, skill_examples)
import torch.nn.functional as F
from data import document_examples, sft_batch
from eval import evaluate, kl_from_base, knowledge_accuracy
from model import autocast, check_resume, cosine_lr, get_device, load_checkpoint, save_checkpoint
from sdft import dft_loss

# -----------------------------------------------------------------------------
# arguments

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
add = parser.add_argument
# run
add("--out", default="runs/sft", help="directory for ckpt.pt and metrics.jsonl")
add("--seed", type=int, default=0, help="seeds python, numpy and torch: same seed, same run")
add("--device", default=None, help="cuda, mps or cpu (default: the best available)")
add("--resume", action="store_true", help="continue the run in OUT/ckpt.pt (same settings)")
add("--ckpt-every", type=int, default=50,
    help="also write OUT/ckpt.pt every this many steps (0: only after each stage)")
# what to learn
add("--init", default="results/base/ckpt.pt", help="base checkpoint (default: the shipped base)")
add("--skills", default=",".join(SEQUENCE),
    help="new skills to learn in this order, comma-separated")
add("--demo-style", default="expert", choices=["expert", "own"],
    help="style of the demonstrations (with --facts: of the question-answer pairs)")
add("--facts", type=int, default=0, help="learn this many facts of the knowledge world "
    "(data.knowledge_facts of --seed) instead of --skills (0: skills)")
# SFT
add("--cpt", action="store_true", help="with --facts: continued pretraining, next-token training "
    "on the facts' documents instead of the question-answer pairs")
add("--dft", action="store_true", help="the DFT baseline (Wu et al. 2025): weight each token's "
    "loss by its probability, detached")
# optimisation
add("--steps", type=int, default=300, help="step budget per stage")
add("--batch-size", type=int, default=32,
    help="queries per step, split over processes and micro-batches")
add("--grad-accum", type=int, default=1,
    help="micro-batches per step in each process, gradients summed (less memory)")
add("--lr", type=float, default=3e-4, help="peak learning rate (the rate chosen in results/lr)")
add("--warmup", type=int, default=10, help="linear warmup steps of the cosine schedule")
add("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
# evaluation
add("--eval-every", type=int, default=10, help="steps between validations of the current skill")
add("--eval-n", type=int, default=100, help="queries per skill for validation and test accuracy")
add("--stop-at", type=float, default=0.95,
    help="end a stage when the skill's validation accuracy reaches this")
add("--keep-best", action="store_true", help="end each stage on the weights of its best "
    "validation (the earliest, on a tie), as the paper reports its runs")
args = parser.parse_args()

# distributed: torchrun sets RANK and WORLD_SIZE; a plain run is rank 0 of 1
ddp = int(os.environ.get("RANK", -1)) != -1
rank, world_size = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
master = rank == 0  # the one process that prints, logs and writes checkpoints
n_shards = world_size * args.grad_accum  # micro-batches per step, over all processes


def print0(*a):
    if master:
        print(*a)


def fail(message):
    """Stop with one 'error:' line (from rank 0 only) and a non-zero exit."""
    sys.exit(f"error: {message}" if master else 1)


try:
    if not 0 < args.stop_at <= 1:
        raise ValueError(f"--stop-at must be in (0, 1], got {args.stop_at}")
    for flag in ("steps", "batch_size", "grad_accum", "eval_every", "eval_n"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, "
                             f"got {getattr(args, flag)}")
    if args.lr <= 0 or args.warmup < 0 or args.grad_clip <= 0 or args.ckpt_every < 0:
        raise ValueError("--lr and --grad-clip must be positive, "
                         "--warmup and --ckpt-every not negative")
    if args.batch_size % n_shards:
        raise ValueError(f"--batch-size {args.batch_size} does not split into {world_size} "
                         f"processes x {args.grad_accum} micro-batches (--grad-accum)")
    if args.cpt and not args.facts:
        raise ValueError("--cpt trains on the facts' documents: --cpt needs --facts")
    facts = knowledge_facts(args.facts, args.seed) if args.facts else None
    skills = ["knowledge"] if facts else parse_skills(args.skills, reasoning=True)
    device = get_device(args.device)
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryFile(dir=args.out):  # fail now, not after loading, if OUT is read-only
        pass
except ValueError as e:
    fail(e)
except OSError as e:
    fail(f"cannot write to --out {args.out} ({e.strerror})")
if ddp:  # one process per device: nccl between GPUs, gloo between CPU processes
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

# -----------------------------------------------------------------------------
# setup

random.seed(args.seed)
np.random.seed(args.seed)
torch.manual_seed(args.seed)
tok = Tokenizer()
# Micro-batch i of every step draws from seed + i: micro-batch 0 is a plain run's stream, and the
# same micro-batches make the same run whether spread over processes or --grad-accum.
shards = range(rank * args.grad_accum, (rank + 1) * args.grad_accum)  # this process's micro-batches
data_rngs = [random.Random(args.seed + i) for i in shards]  # the queries: the same for SFT and SDFT
micro_batch_size = args.batch_size // n_shards
ckpt_path = os.path.join(args.out, "ckpt.pt")
metrics = []  # the records already in OUT/metrics.jsonl that this run keeps

try:
    model, _ = load_checkpoint(args.init, device)
    if args.resume:  # everything is checked before anything in OUT is touched
        _, resume = load_checkpoint(ckpt_path, device)
        check_resume(resume, ckpt_path, model, skills, args, n_shards)
        with open(os.path.join(args.out, "metrics.jsonl")) as f:
            metrics = f.readlines()[:resume["metrics_lines"]]  # the records up to the checkpoint
except (ValueError, OSError) as e:
    fail(e)
base = copy.deepcopy(model).eval()  # the starting model, frozen: how far does each stage move?
all_skills = list(PRIOR_SKILLS) + list(NEW_SKILLS)
start_stage, start_step, optimizer_state = 0, 0, None
best = None  # with --keep-best: the stage's best validation so far, {"val_acc", "step", weights}
if args.resume:  # continue where the checkpoint left off: weights, optimizer, position, RNGs
    model.load_state_dict(resume["model"])
    done = resume["stage_done"]
    start_stage = resume["stage"] + 1 if done else resume["stage"]
    start_step = 0 if done else resume["step"]
    optimizer_state, best = (None, None) if done else (resume["optimizer"], resume.get("best"))
    for data_rng, i in zip(data_rngs, shards):
        data_rng.setstate(resume["data_rng"][i])
    torch.set_rng_state(resume["torch_rng"].cpu())
# Only the training pass goes through DDP, which averages the gradients over processes;
# sampling, evaluation and checkpoints use the plain model.
ddp_model = DDP(model) if ddp else model
print0(f"model: {model.num_params() / 1e6:.2f}M parameters on {device}"
       + (f"; {world_size} processes" if ddp else "")
       + (f"; resuming stage {start_stage + 1} step {start_step}" if args.resume else ""))

if master:
    log_file = open(os.path.join(args.out, "metrics.jsonl"), "w")
    log_file.writelines(metrics)
n_records = len(metrics)  # saved in checkpoints: --resume keeps this many records


def log(record):  # rank 0 only
    global n_records
    log_file.write(json.dumps(record) + "\n")
    log_file.flush()
    n_records += 1


def eta(seconds, steps_done, steps_left):
    """Time left in a stage, from its mean step time so far (validations included): '1m05s'."""
    left = round(seconds / steps_done * steps_left)
    return f"{left // 60}m{left % 60:02d}s" if left >= 60 else f"{left}s"


def get_batch(skill, data_rng):
    """Prompt + target (the demonstration, or with --cpt a document), and the target's mask."""
    if skill == "knowledge" and args.cpt:  # continued pretraining: all of the documents' text
        prompts, targets = document_examples(data_rng, facts, micro_batch_size)
    elif skill == "knowledge":  # the facts asked directly, and their answers in --demo-style
        prompts, targets, _ = fact_examples(data_rng, facts, micro_batch_size, None,
                                            args.demo_style)
    else:
        prompts, targets, _ = skill_examples(data_rng, skill, micro_batch_size, args.demo_style)
    return [t.to(device) for t in sft_batch(tok, prompts, targets)]


def checkpoint(stage, step, stage_done, optimizer):
    """Write OUT/ckpt.pt with everything --resume needs. Every process sends its RNG states;
    rank 0 writes (to a temporary file, then renamed)."""
    rng = [r.getstate() for r in data_rngs]
    if ddp:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, rng)
        rng = [state for states in gathered for state in states]  # in micro-batch order
    if master:
        save_checkpoint(ckpt_path, model, args, step, stage=stage, skills=skills,
                        stage_done=stage_done, optimizer=optimizer.state_dict(),
                        data_rng=rng, torch_rng=torch.get_rng_state(),
                        metrics_lines=n_records, best=best)


def validate(stage, skill, step):
    """The stage's validation accuracy (with --facts: the facts asked directly, what is learned),
    measured and logged by rank 0 and sent to every process as float64, so all decide alike."""
    val_acc = None
    if master:
        val_acc = (knowledge_accuracy(model, tok, facts, device, "direct") if facts else
                   evaluate(model, tok, [skill], device, split="val", n=args.eval_n)[skill])
        log({"stage": stage, "skill": skill, "step": step, "val_acc": val_acc})
        print(f"stage {stage + 1}/{len(skills)} {skill} | step {step} | val_acc {val_acc:.2f}")
    if ddp:
        shared = torch.tensor([val_acc or 0.0], dtype=torch.float64, device=device)
        dist.broadcast(shared, 0)
        val_acc = shared.item()
    return val_acc


# -----------------------------------------------------------------------------
# training: one stage per skill

t_start = time.time()
for stage, skill in enumerate(skills):
    if stage < start_stage:
        continue  # finished before --resume
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=0.0)
    if optimizer_state is not None:  # --resume in the middle of this stage
        optimizer.load_state_dict(optimizer_state)
    t_stage = time.time()
    model.train()
    for step in range(start_step, args.steps):
        # validate: stop the stage once the skill is learned (rank 0 measures, every process stops)
        if step % args.eval_every == 0:
            val_acc = validate(stage, skill, step)
            if args.keep_best and (best is None or val_acc > best["val_acc"]):
                best = {"val_acc": val_acc, "step": step,
                        "model": copy.deepcopy(model.state_dict())}
            if val_acc >= args.stop_at:
                break

        t0 = time.time()
        stats = torch.zeros(1, device=device)  # the loss, summed over micro-batches
        for k, data_rng in enumerate(data_rngs):
            if ddp:  # set before the forward: DDP averages the gradients once, after the last one
                ddp_model.require_backward_grad_sync = k == args.grad_accum - 1
            # batch: prompt + demonstration, loss on the demonstration tokens only
            ids, mask, loss_mask = get_batch(skill, data_rng)
            with autocast(device):
                logits = ddp_model(ids[:, :-1], mask[:, :-1])  # (B, T-1, V): predicts ids[:, 1:]
            token_loss = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:],
                                         reduction="none")  # (B, T-1)
            if args.dft:  # the DFT baseline: each token weighted by its probability
                token_loss = dft_loss(token_loss)
            weights = loss_mask[:, 1:].float()
            loss = (token_loss * weights).sum() / weights.sum()  # mean over the target tokens
            # Divided by the micro-batches here and by the processes in DDP: the step's loss is the
            # mean of the micro-batches' token means (with one of them, the batch's token mean).
            (loss / args.grad_accum).backward()
            stats += loss.detach()
        if ddp:
            dist.all_reduce(stats)  # summed over processes, so every process sees the same values
        loss = (stats / n_shards).item()

        # step: not when the loss or the gradient is non-finite; ckpt.pt stays the last good one
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        for what, value in (("loss", loss), ("gradient", grad_norm.item())):
            if not math.isfinite(value):
                fail(f"non-finite {what} at stage {stage + 1} step {step}; stopped before the "
                     f"update, {ckpt_path} (if any) is the last good checkpoint")
        lr = cosine_lr(step, args.lr, args.warmup, args.steps)  # over one stage
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # log, with the time left in the stage's budget (less if it stops at --stop-at)
        ms = (time.time() - t0) * 1000
        if master:
            log({"stage": stage, "skill": skill, "step": step, "loss": loss, "lr": lr, "ms": ms})
        left = eta(time.time() - t_stage, step + 1 - start_step, args.steps - step - 1)
        print0(f"stage {stage + 1}/{len(skills)} {skill} | step {step + 1}/{args.steps} "
               f"| loss {loss:.4f} | lr {lr:.2e} | {ms:.0f}ms | eta {left}")
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < args.steps:
            checkpoint(stage, step + 1, False, optimizer)  # in the middle of a stage, for --resume
    else:
        step = args.steps  # the whole budget ran
        if args.keep_best and validate(stage, skill, step) <= best["val_acc"]:
            model.load_state_dict(best["model"])  # an earlier validation was as good or better
            step = best["step"]
            print0(f"stage {stage + 1}/{len(skills)} {skill}: kept the weights of step {step} "
                   f"(val_acc {best['val_acc']:.2f})")
    start_step, optimizer_state, best = 0, None, None  # later stages start afresh

    # end of stage: test and validation accuracy on every skill (rank 0), then checkpoint
    if master:
        accuracy = evaluate(model, tok, all_skills, device, split="test", n=args.eval_n)
        val_accuracy = evaluate(model, tok, all_skills, device, split="val", n=args.eval_n)
        if facts:  # the facts, asked as trained and through a prior skill (untrained: OOD)
            accuracy |= {kind: knowledge_accuracy(model, tok, facts, device, kind)
                         for kind in ("direct", "indirect")}
        kl = None if facts else kl_from_base(model, base, tok, skill, device, n=args.eval_n)
        seconds = time.time() - t_stage
        log({"stage": stage, "skill": skill, "steps": step, "seconds": seconds,
             "accuracy": accuracy, "val_accuracy": val_accuracy, "kl_from_base": kl})
        print(f"stage {stage + 1}/{len(skills)} {skill} done: {step} steps, {seconds:.0f}s"
              + ("" if kl is None else f", kl_from_base {kl:.3f}"))
        print("  " + " ".join(f"{s} {a:.2f}" for s, a in accuracy.items()))
    checkpoint(stage, step, True, optimizer)

print0(f"total time {time.time() - t_start:.0f}s; checkpoint {ckpt_path}")
if ddp:
    dist.barrier()  # wait for rank 0's last validation and checkpoint before shutting down
    dist.destroy_process_group()
