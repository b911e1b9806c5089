"""
Self-Distillation Fine-Tuning (SDFT): learn new skills from demonstrations, on-policy.

From a base checkpoint, learn new skills one after another, evaluating every skill after each
stage:

    python train_sdft.py --out runs/sdft            # jab, mug, hub from the shipped base (--init)
    torchrun --nproc_per_node 2 train_sdft.py --out runs/sdft     # two processes
    python train_sdft.py --out runs/sdft --resume   # continue OUT/ckpt.pt

Each step: the student samples one answer per query (temperature 1); the teacher, an EMA of
the student shown a demonstration for the same query, scores that answer; the loss is the
per-token forward KL(teacher || student) over the full vocabulary (sdft.py has the method).
Simplified for the toy: no completion tokens are skipped by default (the paper skips 3, but a
toy answer is only 2 to 6 tokens long).

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
from data import CONTEXTS, encode_prompts, longest_teacher_prompt
from eval import evaluate, kl_from_base, knowledge_accuracy
from model import autocast, check_resume, cosine_lr, get_device, load_checkpoint, save_checkpoint
from sdft import (agreed_prefix, ema_update, loss_mask, make_teacher, masked_mean,
                  per_token_divergence, rollout, sampled_cross_entropy, score)

# -----------------------------------------------------------------------------
# arguments

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
add = parser.add_argument
# run
add("--out", default="runs/sdft", help="directory for ckpt.pt and metrics.jsonl")
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
# SDFT
add("--context", default="doc+answer", help="with --facts: what the teacher sees before the "
    "question, doc+answer, doc or answer (the paper's App. A.2 ablation)")
add("--alpha", type=float, default=0.0,
    help="divergence: 0 forward KL(teacher||student), 1 reverse KL, between: generalized JSD")
add("--teacher", default="ema", choices=["ema", "base", "live"],
    help="teacher weights: EMA of the student, frozen base, or the student itself")
add("--teacher-ckpt", default=None, help="with --teacher base: the teacher's weights from this "
    "checkpoint instead of --init (SFT + re-invoke: the base teaches the fine-tuned model)")
add("--teacher-sees", default="demo", choices=["demo", "query"], help="the teacher's prompt: the "
    "query with a demonstration (SDFT), or the query alone (re-invoke; with --teacher base)")
add("--rollout", default="student", choices=["student", "teacher"], help="who samples the "
    "answers: the student (on-policy, SDFT) or the teacher (offline: the paper's ablations)")
add("--loss", default="kl", choices=["kl", "ce"], help="kl: the divergence of --alpha over the "
    "full vocabulary; ce: cross-entropy on the sampled tokens (--rollout teacher: SFT on them)")
add("--ema-rate", type=float, default=0.01,
    help="EMA teacher update: teacher <- (1-rate) teacher + rate student")
add("--skip", type=int, default=0, help="leave the first SKIP completion tokens out of the loss "
    "(the paper: 3, against teacher-only openings; a toy answer is 2-6 tokens and has none)")
add("--agreed-prefix", action="store_true", help="count only the tokens up to and including the "
    "first one that is not the teacher's most likely (not in the paper; sdft.agreed_prefix)")
add("--max-new-tokens", type=int, default=32, help="longest student rollout")
# optimisation
add("--steps", type=int, default=300, help="step budget per stage")
add("--batch-size", type=int, default=32,
    help="queries per step, split over processes and micro-batches")
add("--grad-accum", type=int, default=1,
    help="micro-batches per step in each process, gradients summed (less memory)")
add("--lr", type=float, default=3e-5, help="peak learning rate (the rate chosen in results/lr)")
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
    for flag in ("steps", "batch_size", "grad_accum", "eval_every", "eval_n", "max_new_tokens"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, "
                             f"got {getattr(args, flag)}")
    if args.lr <= 0 or args.warmup < 0 or args.grad_clip <= 0 or args.ckpt_every < 0:
        raise ValueError("--lr and --grad-clip must be positive, "
                         "--warmup and --ckpt-every not negative")
    if args.batch_size % n_shards:
        raise ValueError(f"--batch-size {args.batch_size} does not split into {world_size} "
                         f"processes x {args.grad_accum} micro-batches (--grad-accum)")
    if not (0 <= args.alpha <= 1 and 0 < args.ema_rate <= 1 and args.skip >= 0):
        raise ValueError(f"--alpha must be in [0, 1], --ema-rate in (0, 1] and --skip not "
                         f"negative, got {args.alpha}, {args.ema_rate} and {args.skip}")
    if args.loss == "ce" and (args.rollout == "student" or args.alpha != 0):
        raise ValueError("--loss ce needs --rollout teacher, not --rollout student (the student "
                         "would imitate its own samples), and has no --alpha (no divergence)")
    if (args.teacher_ckpt or args.teacher_sees == "query") and args.teacher != "base":
        raise ValueError("--teacher-ckpt and --teacher-sees query need --teacher base")
    if args.context not in CONTEXTS:  # checked here, not by argparse: one error line
        raise ValueError(f"unknown --context '{args.context}' ({', '.join(CONTEXTS)})")
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
generators = [torch.Generator(device).manual_seed(args.seed + i) for i in shards]  # the rollouts
micro_batch_size = args.batch_size // n_shards
ckpt_path = os.path.join(args.out, "ckpt.pt")
metrics = []  # the records already in OUT/metrics.jsonl that this run keeps

try:
    model, _ = load_checkpoint(args.init, device)
    teacher_model = load_checkpoint(args.teacher_ckpt, device)[0] if args.teacher_ckpt else model
    if teacher_model.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"--teacher-ckpt {args.teacher_ckpt} has another vocabulary than "
                         "--init: the teacher must score the student's tokens")
    # the teacher scores [teacher prompt | rollout]: the longest must fit in its context
    longest = longest_teacher_prompt(tok, skills, args.demo_style, facts, args.context)
    block_size = min(model.config.block_size, teacher_model.config.block_size)
    if longest + args.max_new_tokens > block_size:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} does not fit: the teacher prompt "
                         f"takes up to {longest} of the model's {block_size} positions")
    if args.resume:  # everything is checked before anything in OUT is touched
        _, resume = load_checkpoint(ckpt_path, device)
        check_resume(resume, ckpt_path, model, skills, args, n_shards)
        with open(os.path.join(args.out, "metrics.jsonl")) as f:
            metrics = f.readlines()[:resume["metrics_lines"]]  # the records up to the checkpoint
except (ValueError, OSError) as e:
    fail(e)
teacher = make_teacher(teacher_model, args.teacher)  # one teacher across all stages
base = copy.deepcopy(model).eval()  # the starting model, frozen: how far does each stage move?
all_skills = list(PRIOR_SKILLS) + list(NEW_SKILLS)
start_stage, start_step, optimizer_state = 0, 0, None
best = None  # with --keep-best: the stage's best validation so far, {"val_acc", "step", weights}
if args.resume:  # continue where the checkpoint left off: weights, optimizer, position, RNGs
    model.load_state_dict(resume["model"])
    if args.teacher != "live":
        teacher.load_state_dict(resume["teacher"])
    done = resume["stage_done"]
    start_stage = resume["stage"] + 1 if done else resume["stage"]
    start_step = 0 if done else resume["step"]
    optimizer_state, best = (None, None) if done else (resume["optimizer"], resume.get("best"))
    for data_rng, generator, i in zip(data_rngs, generators, shards):
        data_rng.setstate(resume["data_rng"][i])
        generator.set_state(resume["rollout_rng"][i].cpu())
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
    """The student's prompts (the query) and the teacher's (the query with its demonstration)."""
    if skill == "knowledge":  # the facts asked directly; the teacher sees --context first
        students, _, teachers = fact_examples(data_rng, facts, micro_batch_size, args.context,
                                              args.demo_style)
    else:
        students, _, teachers = skill_examples(data_rng, skill, micro_batch_size, args.demo_style)
    if args.teacher_sees == "query":
        teachers = students  # re-invoke: the teacher is asked exactly as the student is
    return [t.to(device) for t in (*encode_prompts(tok, students), *encode_prompts(tok, teachers))]


def checkpoint(stage, step, stage_done, optimizer):
    """Write OUT/ckpt.pt with everything --resume needs. Every process sends its RNG states;
    rank 0 writes (to a temporary file, then renamed)."""
    rng = [(r.getstate(), g.get_state()) for r, g in zip(data_rngs, generators)]
    if ddp:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, rng)
        rng = [state for states in gathered for state in states]  # in micro-batch order
    if master:
        save_checkpoint(ckpt_path, model, args, step, stage=stage, skills=skills,
                        stage_done=stage_done, optimizer=optimizer.state_dict(),
                        data_rng=[r for r, _ in rng], torch_rng=torch.get_rng_state(),
                        metrics_lines=n_records, best=best, rollout_rng=[g for _, g in rng],
                        teacher=None if args.teacher == "live" else teacher.state_dict())


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
                        "model": copy.deepcopy(model.state_dict()),
                        "teacher": (copy.deepcopy(teacher.state_dict()) if args.teacher == "ema"
                                    else None)}
            if val_acc >= args.stop_at:
                break

        t0, gen_ms = time.time(), 0.0
        stats = torch.zeros(4, device=device)  # loss, kl, length, ended, summed over micro-batches
        for k, (data_rng, generator) in enumerate(zip(data_rngs, generators)):
            if ddp:  # set before the forward: DDP averages the gradients once, after the last one
                ddp_model.require_backward_grad_sync = k == args.grad_accum - 1
            # batch: the student samples its own answer to each query (on-policy)
            t_micro = time.time()
            student_ids, student_mask, teacher_ids, teacher_mask = get_batch(skill, data_rng)
            sampler = ((model, student_ids, student_mask) if args.rollout == "student" else
                       (teacher, teacher_ids, teacher_mask))
            with autocast(device):  # the completion and its mask, (B, C) each
                completion, completion_mask = rollout(*sampler, args.max_new_tokens, tok.eot_id,
                                                      generator)
            gen_ms += (time.time() - t_micro) * 1000
            # loss: the teacher, shown the demonstration, scores the student's tokens
            with autocast(device):  # (B, C, V) each
                student_logits, teacher_logits = score(ddp_model, teacher, student_ids,
                                                       student_mask, teacher_ids, teacher_mask,
                                                       completion, completion_mask)
            if args.loss == "kl":  # per token, (B, C)
                per_token = per_token_divergence(student_logits, teacher_logits, args.alpha)
            else:  # the teacher's logits are not used: only its sampled tokens are
                per_token = sampled_cross_entropy(student_logits, completion)
            mask = loss_mask(completion_mask, args.skip)  # padding, after end-of-text, first tokens
            if args.agreed_prefix:
                mask = mask * agreed_prefix(completion, teacher_logits, completion_mask)
            loss = masked_mean(per_token, mask)  # mean over this micro-batch's tokens in the loss
            # Divided by the micro-batches here and by the processes in DDP: the step's loss is the
            # mean of the micro-batches' token means (with one of them, the batch's token mean).
            (loss / args.grad_accum).backward()
            stats += torch.stack([loss.detach(),
                                  masked_mean(per_token.detach(), completion_mask),  # kl, all
                                  completion_mask.sum(1).float().mean(),  # length, with end-of-text
                                  (completion == tok.eot_id).any(1).float().mean()])  # finished
        if ddp:
            dist.all_reduce(stats)  # summed over processes, so every process sees the same values
        loss, kl, length, ended = (stats / n_shards).tolist()

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
        if args.teacher == "ema":  # after every step; DDP keeps students, so teachers, in sync
            ema_update(teacher, model, args.ema_rate)

        # log, with the time left in the stage's budget (less if it stops at --stop-at)
        ms = (time.time() - t0) * 1000
        if master:
            log({"stage": stage, "skill": skill, "step": step, "loss": loss, "kl": kl,
                 "length": length, "ended": ended, "lr": lr, "ms": ms, "gen_ms": gen_ms,
                 "update_ms": ms - gen_ms})
        left = eta(time.time() - t_stage, step + 1 - start_step, args.steps - step - 1)
        print0(f"stage {stage + 1}/{len(skills)} {skill} | step {step + 1}/{args.steps} "
               f"| loss {loss:.4f} | kl {kl:.4f} | len {length:.1f} | ended {ended:.2f} "
               f"| lr {lr:.2e} | {ms:.0f}ms (gen {gen_ms:.0f}, update {ms - gen_ms:.0f}) "
               f"| eta {left}")
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < args.steps:
            checkpoint(stage, step + 1, False, optimizer)  # in the middle of a stage, for --resume
    else:
        step = args.steps  # the whole budget ran
        if args.keep_best and validate(stage, skill, step) <= best["val_acc"]:
            model.load_state_dict(best["model"])  # an earlier validation was as good or better
            if best["teacher"] is not None:
                teacher.load_state_dict(best["teacher"])
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
