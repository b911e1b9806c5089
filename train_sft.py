"""
Supervised fine-tuning (SFT): next-token training on demonstrations, used two ways.

1. Pretraining the toy "foundation model" from scratch on the mixture in data.py (prior
   skills plainly and with demonstrations, random throw-away skills with demonstrations,
   and the new skills, known on 4 of 10 first letters and answered as their rivals elsewhere),
   which gives it the prior skills, the ability to read a demonstration in context, and a
   start of about 40% on the new skills:

       OMP_NUM_THREADS=1 python train_sft.py --pretrain --out runs/base   # ~7 min: the recipe of the shipped base, results/base/ckpt.pt

2. The SFT baseline: from a base checkpoint, learn new skills one after another from
   their demonstrations, evaluating every skill after each stage:

       python train_sft.py --out runs/sft     # jab, mug, hub from the shipped base (--init)

Several processes: `torchrun --nproc_per_node 2 train_sft.py ...`; continue an interrupted
run: the same command with --resume (README: "Several processes, and resuming").

A stage ends when the current skill's validation accuracy reaches --stop-at or its step
budget runs out (train_sdft.py uses the same rule), on the last weights or, with --keep-best,
on those of its best validation. The loss covers the target tokens
only (the demonstration and its end-of-text), not the prompt. Writes OUT/ckpt.pt after
every stage (and every --ckpt-every steps) and OUT/metrics.jsonl (one record per step,
eval, and stage).
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
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from data import (NEW_SKILLS, PRIOR_SKILLS, SEQUENCE, Tokenizer, check_new_skills, document_examples, fact_examples,
                  knowledge_facts, knowledge_pretrain_examples, parse_skills, pretrain_examples, sft_batch,
                  skill_examples)
from eval import evaluate, kl_from_base, knowledge_accuracy
from model import GPT, GPTConfig, autocast, check_resume, get_device, load_checkpoint, save_checkpoint
from sdft import dft_loss

# -----------------------------------------------------------------------------
# arguments

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# run
parser.add_argument("--out", default="runs/sft", help="directory for ckpt.pt and metrics.jsonl")
parser.add_argument("--seed", type=int, default=0, help="seeds python, numpy and torch: same seed, same run")
parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
parser.add_argument("--resume", action="store_true", help="continue the run in OUT/ckpt.pt (with the same settings)")
parser.add_argument("--ckpt-every", type=int, default=50, help="also write OUT/ckpt.pt every this many steps (0: only after each stage)")
# what to learn
parser.add_argument("--pretrain", action="store_true", help="train a base model from scratch on the pretraining mixture "
                    "(not over a checkpoint already in OUT, unless --resume)")
parser.add_argument("--init", default="results/base/ckpt.pt", help="base checkpoint to fine-tune (default: the shipped base; not with --pretrain)")
parser.add_argument("--skills", default=",".join(SEQUENCE), help="new skills to learn in this order, comma-separated")
parser.add_argument("--demo-style", default="expert", choices=["expert", "own"],
                    help="style of the demonstrations (with --facts: of the question-answer pairs)")
parser.add_argument("--facts", type=int, default=0, help="learn this many facts of the knowledge world (data.knowledge_facts "
                    "of --seed) from their question-answer pairs, instead of --skills (0: skills)")
parser.add_argument("--cpt", action="store_true", help="with --facts: continued pretraining, next-token training on the "
                    "facts' documents instead of the question-answer pairs")
parser.add_argument("--dft", action="store_true", help="the DFT baseline (Wu et al. 2025): weight each token's loss by "
                    "its probability, detached (not with --pretrain)")
parser.add_argument("--p-new", type=float, default=0.06, help="pretraining only: share of examples that ask each new skill "
                    "(0: the base never meets the new skills)")
parser.add_argument("--p-right", type=float, default=0.4, help="pretraining only: share of first letters on which a new "
                    "skill is answered right (data.known_letters; elsewhere as its rival, data.RIVALS)")
parser.add_argument("--p-knowledge", type=float, default=0.0, help="pretraining only: share of batches of knowledge examples, "
                    "throw-away facts with their document in context and known facts asked plainly (0: the skills base)")
# model size (pretraining only; fine-tuning reads it from the checkpoint)
parser.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
parser.add_argument("--n-head", type=int, default=4, help="attention heads")
parser.add_argument("--n-embd", type=int, default=128, help="model width")
# optimisation
parser.add_argument("--steps", type=int, default=None, help="step budget per stage (default: 12000 pretraining, 300 per skill)")
parser.add_argument("--batch-size", type=int, default=32, help="examples per step, split over processes and micro-batches")
parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step in each process, gradients summed (less memory)")
parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 pretraining, 3e-4 per skill, "
                    "the rate chosen in results/lr)")
parser.add_argument("--warmup", type=int, default=10, help="linear warmup steps of the cosine schedule")
parser.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
# evaluation
parser.add_argument("--eval-every", type=int, default=10, help="steps between validation checks of the current skill")
parser.add_argument("--eval-n", type=int, default=100, help="queries per skill for validation and test accuracy")
parser.add_argument("--stop-at", type=float, default=0.95, help="end a stage when the skill's validation accuracy reaches this")
parser.add_argument("--keep-best", action="store_true", help="end each stage on the weights of its best validation "
                    "accuracy (the earliest, on a tie) instead of the last ones, as the paper reports its runs")
args = parser.parse_args()
if args.steps is None:
    args.steps = 12000 if args.pretrain else 300
if args.lr is None:
    args.lr = 1e-3 if args.pretrain else 3e-4

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
    if not (0 <= args.p_new * len(NEW_SKILLS) <= 1 and 0 <= args.p_right <= 1):
        raise ValueError(f"--p-new must be in [0, 1/{len(NEW_SKILLS)}] (one share per new skill) and --p-right in [0, 1], "
                         f"got {args.p_new} and {args.p_right}")
    for flag in ("steps", "batch_size", "grad_accum", "eval_every", "eval_n"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.lr <= 0 or args.warmup < 0 or args.grad_clip <= 0 or args.ckpt_every < 0:
        raise ValueError("--lr and --grad-clip must be positive and --warmup and --ckpt-every non-negative")
    if args.batch_size % n_shards:
        raise ValueError(f"--batch-size {args.batch_size} does not split into {world_size} processes x "
                         f"{args.grad_accum} micro-batches (--grad-accum)")
    if args.dft and args.pretrain:
        raise ValueError("--dft is a fine-tuning baseline, not a way to pretrain")
    if args.keep_best and args.pretrain:
        raise ValueError("--keep-best chooses among a fine-tuning stage's validated weights; pretraining validates none")
    if not 0 <= args.p_knowledge <= 1 or (args.p_knowledge and not args.pretrain):
        raise ValueError(f"--p-knowledge is a share of pretraining batches, in [0, 1], got {args.p_knowledge}")
    if (args.facts or args.cpt) and args.pretrain or args.cpt and not args.facts:
        raise ValueError("--facts and --cpt fine-tune a base on facts; --cpt needs --facts")
    facts = knowledge_facts(args.facts, args.seed) if args.facts else None
    check_new_skills()  # the world's rule holds for pretraining too (parse_skills checks it for the rest)
    skills = [] if args.pretrain else ["knowledge"] if facts else parse_skills(args.skills)
    device = get_device(args.device)
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryFile(dir=args.out):  # fail now, not after loading, if --out cannot be written
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
# Micro-batch i of every step draws from seed + i: micro-batch 0 is a plain run's stream, and
# the same micro-batches make the same run whether they are spread over processes or --grad-accum.
shards = range(rank * args.grad_accum, (rank + 1) * args.grad_accum)  # this process's micro-batches
data_rngs = [random.Random(args.seed + i) for i in shards]  # draw the training queries: the same for SFT and SDFT
micro_batch_size = args.batch_size // n_shards
ckpt_path = os.path.join(args.out, "ckpt.pt")
metrics = []  # the records already in OUT/metrics.jsonl that this run keeps

try:
    if args.pretrain:
        if not args.resume:  # never replace a good base model silently
            try:
                load_checkpoint(ckpt_path)
            except ValueError:
                pass  # no file, or a broken one: nothing to keep
            else:
                raise ValueError(f"{ckpt_path} already holds a checkpoint; choose another --out, delete it, "
                                 "or pass --resume to continue it")
        config = GPTConfig(vocab_size=tok.vocab_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
        model = GPT(config).to(device)
        stages = ["pretrain"]
    else:
        model, _ = load_checkpoint(args.init, device)
        stages = skills
    if args.resume:  # everything is checked before anything in OUT is touched
        _, resume = load_checkpoint(ckpt_path, device)
        check_resume(resume, ckpt_path, model, stages, args, n_shards)
        with open(os.path.join(args.out, "metrics.jsonl")) as f:
            metrics = f.readlines()[:resume["metrics_lines"]]  # the records up to the checkpoint
except (ValueError, OSError) as e:
    fail(e)
if not args.pretrain:
    base = copy.deepcopy(model).eval()  # the starting model, frozen: how far does each stage move from it?
all_skills = list(PRIOR_SKILLS) + list(NEW_SKILLS)
start_stage, start_step, optimizer_state = 0, 0, None
best = None  # with --keep-best: the stage's best validation so far, {"val_acc", "step", weights}
if args.resume:  # continue where the checkpoint left off: weights, optimizer, position, RNG streams
    model.load_state_dict(resume["model"])
    start_stage, start_step = (resume["stage"] + 1, 0) if resume["stage_done"] else (resume["stage"], resume["step"])
    optimizer_state = None if resume["stage_done"] else resume["optimizer"]
    best = None if resume["stage_done"] else resume.get("best")
    for data_rng, i in zip(data_rngs, shards):
        data_rng.setstate(resume["data_rng"][i])
    torch.set_rng_state(resume["torch_rng"].cpu())
# Only the training pass goes through DDP, which averages the gradients over processes;
# evaluation and checkpoints use the plain model.
ddp_model = DDP(model) if ddp else model
print0(f"model: {model.num_params() / 1e6:.2f}M parameters on {device}"
       + (f"; {world_size} processes" if ddp else "") + (f"; resuming stage {start_stage + 1} step {start_step}" if args.resume else ""))

if master:
    log_file = open(os.path.join(args.out, "metrics.jsonl"), "w")
    log_file.writelines(metrics)
n_records = len(metrics)  # saved in checkpoints: --resume keeps this many records


def log(record):  # rank 0 only
    global n_records
    log_file.write(json.dumps(record) + "\n")
    log_file.flush()
    n_records += 1


def lr_at(step):
    """Linear warmup, then cosine decay to 10% of the peak, over one stage."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def eta(seconds, steps_done, steps_left):
    """Time left in a stage, from its mean step time so far (evaluations included): '1m05s' or '42s'."""
    left = round(seconds / steps_done * steps_left)
    return f"{left // 60}m{left % 60:02d}s" if left >= 60 else f"{left}s"


def get_batch(skill, data_rng):
    if skill == "pretrain" and args.p_knowledge and data_rng.random() < args.p_knowledge:  # (p 0 draws nothing)
        prompts, targets = knowledge_pretrain_examples(data_rng, micro_batch_size)
    elif skill == "pretrain":
        prompts, targets = pretrain_examples(data_rng, micro_batch_size, p_new=args.p_new, p_right=args.p_right)
    elif skill == "knowledge" and args.cpt:  # continued pretraining: the documents, all of their text the target
        prompts, targets = document_examples(data_rng, facts, micro_batch_size)
    elif skill == "knowledge":  # the facts asked directly, and their answers in --demo-style
        prompts, targets, _ = fact_examples(data_rng, facts, micro_batch_size, None, args.demo_style)
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
        save_checkpoint(ckpt_path, model, args, step, stage=stage, skills=stages, stage_done=stage_done,
                        optimizer=optimizer.state_dict(), data_rng=rng, torch_rng=torch.get_rng_state(),
                        metrics_lines=n_records, best=best)


def validate(stage, skill, step):
    """The stage's validation accuracy (with --facts: the facts asked directly, what is learned),
    measured and logged by rank 0 and sent to every process as float64, so all decide alike."""
    val_acc = None
    if master:
        val_acc = (knowledge_accuracy(model, tok, facts, device, "direct") if facts else
                   evaluate(model, tok, [skill], device, split="val", n=args.eval_n)[skill])
        log({"stage": stage, "skill": skill, "step": step, "val_acc": val_acc})
        print(f"stage {stage + 1}/{len(stages)} {skill} | step {step} | val_acc {val_acc:.2f}")
    if ddp:
        shared = torch.tensor([val_acc or 0.0], dtype=torch.float64, device=device)
        dist.broadcast(shared, 0)
        val_acc = shared.item()
    return val_acc


# -----------------------------------------------------------------------------
# training: one stage per skill

t_start = time.time()
for stage, skill in enumerate(stages):
    if stage < start_stage:
        continue  # finished before --resume
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    if optimizer_state is not None:  # --resume in the middle of this stage
        optimizer.load_state_dict(optimizer_state)
    t_stage = time.time()
    model.train()
    for step in range(start_step, args.steps):
        # evaluate: stop the stage once the skill is learned (rank 0 measures, every process stops;
        # pretraining runs its full budget)
        if skill != "pretrain" and step % args.eval_every == 0:
            val_acc = validate(stage, skill, step)
            if args.keep_best and (best is None or val_acc > best["val_acc"]):
                best = {"val_acc": val_acc, "step": step, "model": copy.deepcopy(model.state_dict())}
            if val_acc >= args.stop_at:
                break

        t0 = time.time()
        stats = torch.zeros(1, device=device)  # loss, summed over this process's micro-batches
        for k, data_rng in enumerate(data_rngs):
            # batch: prompt + demonstration, loss on the demonstration tokens only
            if ddp:  # set before the forward: DDP averages the gradients once, after the last micro-batch
                ddp_model.require_backward_grad_sync = k == args.grad_accum - 1
            ids, mask, loss_mask = get_batch(skill, data_rng)
            with autocast(device):
                logits = ddp_model(ids[:, :-1], mask[:, :-1])  # (B, T-1, V): predicts ids[:, 1:]
            token_loss = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
            if args.dft:
                token_loss = dft_loss(token_loss)  # the DFT baseline: each token weighted by its probability
            weights = loss_mask[:, 1:].float()
            loss = (token_loss * weights).sum() / weights.sum()  # mean over this micro-batch's target tokens
            # Divided by the micro-batches here and by the processes in DDP: the step's loss is the
            # mean of the micro-batches' token means (with one of them, the token mean of the batch).
            (loss / args.grad_accum).backward()
            stats += loss.detach()
        if ddp:
            dist.all_reduce(stats)  # summed over processes, so every process sees the same values
        loss = (stats / n_shards).item()

        # step: not when the loss or the gradient is non-finite; ckpt.pt stays the last good one
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        for what, value in (("loss", loss), ("gradient", grad_norm.item())):
            if not math.isfinite(value):
                fail(f"non-finite {what} at stage {stage + 1} step {step}; stopped before the update, "
                     f"{ckpt_path} (if any) is the last good checkpoint")
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # log
        ms = (time.time() - t0) * 1000
        if master:
            log({"stage": stage, "skill": skill, "step": step, "loss": loss, "lr": lr, "ms": ms})
        # time left in the stage's budget (less if it stops at --stop-at), from the steps since it (or --resume) began
        left = eta(time.time() - t_stage, step + 1 - start_step, args.steps - step - 1)
        print0(f"stage {stage + 1}/{len(stages)} {skill} | step {step + 1}/{args.steps} | loss {loss:.4f} "
               f"| lr {lr:.2e} | {ms:.0f}ms | eta {left}")
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < args.steps:
            checkpoint(stage, step + 1, False, optimizer)  # in the middle of the stage, for --resume
    else:
        step = args.steps  # the whole budget ran
        if args.keep_best and validate(stage, skill, step) <= best["val_acc"]:
            model.load_state_dict(best["model"])  # an earlier evaluation was as good or better: its weights end the stage
            step = best["step"]
            print0(f"stage {stage + 1}/{len(stages)} {skill}: kept the weights of step {step} (val_acc {best['val_acc']:.2f})")
    start_step, optimizer_state, best = 0, None, None  # later stages start afresh

    # end of stage: test and validation accuracy on every skill (rank 0), then checkpoint
    if master:
        accuracy = evaluate(model, tok, all_skills, device, split="test", n=args.eval_n)
        val_accuracy = evaluate(model, tok, all_skills, device, split="val", n=args.eval_n)  # for choosing rates
        if facts:  # the facts learned, asked as trained and through a prior skill (not trained: the OOD column)
            accuracy |= {kind: knowledge_accuracy(model, tok, facts, device, kind) for kind in ("direct", "indirect")}
        kl = None if skill in ("pretrain", "knowledge") else kl_from_base(model, base, tok, skill, device, n=args.eval_n)
        seconds = time.time() - t_stage
        log({"stage": stage, "skill": skill, "steps": step, "seconds": seconds, "accuracy": accuracy,
             "val_accuracy": val_accuracy, "kl_from_base": kl})
        print(f"stage {stage + 1}/{len(stages)} {skill} done: {step} steps, {seconds:.0f}s"
              + ("" if kl is None else f", kl_from_base {kl:.3f}"))
        print("  " + " ".join(f"{s} {a:.2f}" for s, a in accuracy.items()))
    checkpoint(stage, step, True, optimizer)

print0(f"total time {time.time() - t_start:.0f}s; checkpoint {ckpt_path}")
if ddp:
    dist.barrier()  # wait for rank 0's last evaluation and checkpoint: shutting the group down under it can abort
    dist.destroy_process_group()
