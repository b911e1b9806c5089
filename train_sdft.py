"""
Self-Distillation Fine-Tuning (SDFT): learn new skills from demonstrations, on-policy.

From a base checkpoint, learn new skills one after another, evaluating every skill after
each stage:

    python train_sdft.py --out runs/sdft                                      # jab, mug, hub from the shipped base (--init)
    torchrun --nproc_per_node 2 train_sdft.py --out runs/sdft                 # 2 processes
    python train_sdft.py --out runs/sdft --resume                             # continue OUT/ckpt.pt

Each step: the student samples one answer per query (temperature 1); the teacher, an
EMA of the student shown a demonstration for the same query, scores that answer; the
loss is the per-token forward KL(teacher || student) over the full vocabulary (sdft.py has
the method, the README the recipe). Simplified for the toy: no completion tokens are skipped
by default (the paper skips 3, but a toy answer is only 3 to 6 tokens long). A stage
ends when the current skill's validation accuracy reaches --stop-at or its step budget
runs out (the same rule as train_sft.py), on the last weights or, with --keep-best, on those
of its best validation. Writes OUT/ckpt.pt after every stage (and every
--ckpt-every steps) and OUT/metrics.jsonl (one record per step, eval, and stage).
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

from data import (CONTEXTS, LETTERS, MAX_LEN, NEW_SKILLS, PRIOR_SKILLS, SEQUENCE, SKILLS, Tokenizer, demonstration,
                  encode_prompts, fact_examples, fact_prompts, knowledge_facts, parse_skills, skill_examples,
                  teacher_prompt)
from eval import evaluate, kl_from_base, knowledge_accuracy
from model import autocast, check_resume, get_device, load_checkpoint, save_checkpoint
from sdft import (agreed_prefix, ema_update, loss_mask, make_teacher, masked_mean, per_token_divergence, rollout,
                  sampled_cross_entropy, score)

# -----------------------------------------------------------------------------
# arguments

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# run
parser.add_argument("--out", default="runs/sdft", help="directory for ckpt.pt and metrics.jsonl")
parser.add_argument("--seed", type=int, default=0, help="seeds python, numpy and torch: same seed, same run")
parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
parser.add_argument("--resume", action="store_true", help="continue the run in OUT/ckpt.pt (with the same settings)")
parser.add_argument("--ckpt-every", type=int, default=50, help="also write OUT/ckpt.pt every this many steps (0: only after each stage)")
# what to learn
parser.add_argument("--init", default="results/base/ckpt.pt", help="base checkpoint to fine-tune (default: the shipped base)")
parser.add_argument("--skills", default=",".join(SEQUENCE), help="new skills to learn in this order, comma-separated")
parser.add_argument("--demo-style", default="expert", choices=["expert", "own"],
                    help="style of the demonstrations (with --facts: of the question-answer pairs)")
parser.add_argument("--facts", type=int, default=0, help="learn this many facts of the knowledge world (data.knowledge_facts "
                    "of --seed) asked directly, instead of --skills (0: skills)")
parser.add_argument("--context", default="doc+answer", help="with --facts: what the teacher sees before the question, "
                    "doc+answer, doc or answer (the paper's App. A.2 ablation)")
# SDFT
parser.add_argument("--alpha", type=float, default=0.0, help="divergence: 0 forward KL(teacher||student), 1 reverse KL, between: generalized JSD")
parser.add_argument("--teacher", default="ema", choices=["ema", "base", "live"], help="teacher weights: EMA of the student, frozen base, or the student itself")
parser.add_argument("--teacher-ckpt", default=None, help="with --teacher base: the frozen teacher's weights from this checkpoint "
                    "instead of --init (SFT + re-invoke: the base teaches the fine-tuned model)")
parser.add_argument("--teacher-sees", default="demo", choices=["demo", "query"], help="the teacher's prompt: the query with a "
                    "demonstration (SDFT), or the query alone, as the student sees it (re-invoke; with --teacher base)")
parser.add_argument("--rollout", default="student", choices=["student", "teacher"], help="who samples the answers: the "
                    "student (on-policy, SDFT) or the teacher from its prompt (offline: the paper's ablations)")
parser.add_argument("--loss", default="kl", choices=["kl", "ce"], help="kl: the divergence of --alpha to the teacher over the "
                    "full vocabulary; ce: cross-entropy on the sampled tokens (with --rollout teacher: SFT on the teacher's samples)")
parser.add_argument("--ema-rate", type=float, default=0.01, help="EMA teacher update: teacher <- (1-rate) teacher + rate student")
parser.add_argument("--skip", type=int, default=0, help="leave the first SKIP completion tokens out of the loss "
                    "(the paper: 3, against teacher-only openings; a toy answer is 3-6 tokens and has none)")
parser.add_argument("--agreed-prefix", action="store_true", help="count only the tokens up to and including the first one "
                    "that is not the teacher's most likely (not in the paper; sdft.agreed_prefix)")
parser.add_argument("--max-new-tokens", type=int, default=32, help="longest student rollout")
# optimisation
parser.add_argument("--steps", type=int, default=300, help="step budget per stage")
parser.add_argument("--batch-size", type=int, default=32, help="queries per step (one rollout each), split over processes and micro-batches")
parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step in each process, gradients summed (less memory)")
parser.add_argument("--lr", type=float, default=3e-5, help="peak learning rate (the rate chosen in results/lr)")
parser.add_argument("--warmup", type=int, default=10, help="linear warmup steps of the cosine schedule")
parser.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
# evaluation
parser.add_argument("--eval-every", type=int, default=10, help="steps between validation checks of the current skill")
parser.add_argument("--eval-n", type=int, default=100, help="queries per skill for validation and test accuracy")
parser.add_argument("--stop-at", type=float, default=0.95, help="end a stage when the skill's validation accuracy reaches this")
parser.add_argument("--keep-best", action="store_true", help="end each stage on the weights of its best validation "
                    "accuracy (the earliest, on a tie) instead of the last ones, as the paper reports its runs")
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
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.lr <= 0 or args.warmup < 0 or args.grad_clip <= 0 or args.ckpt_every < 0:
        raise ValueError("--lr and --grad-clip must be positive and --warmup and --ckpt-every non-negative")
    if args.batch_size % n_shards:
        raise ValueError(f"--batch-size {args.batch_size} does not split into {world_size} processes x "
                         f"{args.grad_accum} micro-batches (--grad-accum)")
    if not 0 <= args.alpha <= 1:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
    if not 0 < args.ema_rate <= 1:
        raise ValueError(f"--ema-rate must be in (0, 1], got {args.ema_rate}")
    if args.skip < 0:
        raise ValueError(f"--skip must be non-negative, got {args.skip}")
    # flag combinations without a meaning
    if args.loss == "ce" and args.rollout == "student":
        raise ValueError("--loss ce with --rollout student has no teacher in it: the student would imitate its own samples")
    if args.loss == "ce" and args.alpha != 0:
        raise ValueError("--alpha chooses the divergence of --loss kl; --loss ce has none")
    if (args.teacher_ckpt or args.teacher_sees == "query") and args.teacher != "base":
        raise ValueError("--teacher-ckpt and --teacher-sees query need --teacher base (a teacher that sees the query "
                         "alone teaches nothing unless its weights are another model's)")
    if args.context not in CONTEXTS:  # checked here, not by argparse: one error line
        raise ValueError(f"unknown --context '{args.context}' ({', '.join(CONTEXTS)})")
    facts = knowledge_facts(args.facts, args.seed) if args.facts else None
    skills = ["knowledge"] if facts else parse_skills(args.skills)
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
generators = [torch.Generator(device).manual_seed(args.seed + i) for i in shards]  # draw the student's rollouts
micro_batch_size = args.batch_size // n_shards
ckpt_path = os.path.join(args.out, "ckpt.pt")
metrics = []  # the records already in OUT/metrics.jsonl that this run keeps

try:
    model, _ = load_checkpoint(args.init, device)
    teacher_model = load_checkpoint(args.teacher_ckpt, device)[0] if args.teacher_ckpt else model
    query = LETTERS[:MAX_LEN]  # a longest query: the teacher scores [teacher prompt | rollout]
    teachers = ([t for _, _, t in fact_prompts(facts, args.context, args.demo_style)] if facts else
                [teacher_prompt(s, query, demonstration(SKILLS[s](query), args.demo_style)) for s in skills])
    if teacher_model.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"--teacher-ckpt {args.teacher_ckpt} has {teacher_model.config.vocab_size} tokens, --init "
                         f"{model.config.vocab_size}: the teacher must score the student's tokens")
    longest = max(len(tok.encode(t)) for t in teachers)
    block_size = min(model.config.block_size, teacher_model.config.block_size)
    if longest + args.max_new_tokens > block_size:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} does not fit: the teacher prompt takes up to "
                         f"{longest} of the model's {block_size} positions")
    if args.resume:  # everything is checked before anything in OUT is touched
        _, resume = load_checkpoint(ckpt_path, device)
        check_resume(resume, ckpt_path, model, skills, args, n_shards)
        with open(os.path.join(args.out, "metrics.jsonl")) as f:
            metrics = f.readlines()[:resume["metrics_lines"]]  # the records up to the checkpoint
except (ValueError, OSError) as e:
    fail(e)
teacher = make_teacher(teacher_model, args.teacher)  # one teacher across all stages
base = copy.deepcopy(model).eval()  # the starting model, frozen: how far does each stage move from it?
stages = skills
all_skills = list(PRIOR_SKILLS) + list(NEW_SKILLS)
start_stage, start_step, optimizer_state = 0, 0, None
best = None  # with --keep-best: the stage's best validation so far, {"val_acc", "step", weights}
if args.resume:  # continue where the checkpoint left off: weights, optimizer, position, RNG streams
    model.load_state_dict(resume["model"])
    if args.teacher != "live":
        teacher.load_state_dict(resume["teacher"])
    start_stage, start_step = (resume["stage"] + 1, 0) if resume["stage_done"] else (resume["stage"], resume["step"])
    optimizer_state = None if resume["stage_done"] else resume["optimizer"]
    best = None if resume["stage_done"] else resume.get("best")
    for data_rng, generator, i in zip(data_rngs, generators, shards):
        data_rng.setstate(resume["data_rng"][i])
        generator.set_state(resume["rollout_rng"][i].cpu())
    torch.set_rng_state(resume["torch_rng"].cpu())
# Only the student pass goes through DDP, which averages the gradients over processes;
# rollouts, evaluation and checkpoints use the plain model.
ddp_model = DDP(model) if ddp else model
print0(f"model: {model.num_params() / 1e6:.2f}M parameters on {device}; teacher: {args.teacher}"
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
    if skill == "knowledge":  # the facts asked directly; the teacher sees --context before the question
        students, _, teachers = fact_examples(data_rng, facts, micro_batch_size, args.context, args.demo_style)
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
        save_checkpoint(ckpt_path, model, args, step, stage=stage, skills=stages, stage_done=stage_done,
                        teacher=None if args.teacher == "live" else teacher.state_dict(),
                        optimizer=optimizer.state_dict(), data_rng=[r for r, _ in rng],
                        rollout_rng=[g for _, g in rng], torch_rng=torch.get_rng_state(), metrics_lines=n_records, best=best)


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
        # evaluate: stop the stage once the skill is learned (rank 0 measures, every process stops)
        if step % args.eval_every == 0:
            val_acc = validate(stage, skill, step)
            if args.keep_best and (best is None or val_acc > best["val_acc"]):
                best = {"val_acc": val_acc, "step": step, "model": copy.deepcopy(model.state_dict()),
                        "teacher": copy.deepcopy(teacher.state_dict()) if args.teacher == "ema" else None}
            if val_acc >= args.stop_at:
                break

        t0, gen_ms = time.time(), 0.0
        stats = torch.zeros(4, device=device)  # loss, kl, length, ended, summed over this process's micro-batches
        for k, (data_rng, generator) in enumerate(zip(data_rngs, generators)):
            # batch: the student samples its own answer to each query (on-policy)
            t_micro = time.time()
            if ddp:  # set before the forward: DDP averages the gradients once, after the last micro-batch
                ddp_model.require_backward_grad_sync = k == args.grad_accum - 1
            student_ids, student_mask, teacher_ids, teacher_mask = get_batch(skill, data_rng)
            sampler = (model, student_ids, student_mask) if args.rollout == "student" else (teacher, teacher_ids, teacher_mask)
            with autocast(device):
                completion, completion_mask = rollout(*sampler, args.max_new_tokens, tok.eot_id, generator)  # (B, C) each
            gen_ms += (time.time() - t_micro) * 1000
            # loss: the teacher, shown the demonstration, scores the student's tokens
            with autocast(device):
                student_logits, teacher_logits = score(ddp_model, teacher, student_ids, student_mask, teacher_ids,
                                                       teacher_mask, completion, completion_mask)  # (B, C, V) each
            if args.loss == "kl":
                per_token = per_token_divergence(student_logits, teacher_logits, args.alpha)  # (B, C)
            else:  # the teacher's logits are not used: only its sampled tokens are
                per_token = sampled_cross_entropy(student_logits, completion)  # (B, C)
            mask = loss_mask(completion_mask, args.skip)  # padding, after end-of-text, first tokens: out
            if args.agreed_prefix:
                mask = mask * agreed_prefix(completion, teacher_logits, completion_mask)
            loss = masked_mean(per_token, mask)  # mean over this micro-batch's valid tokens
            # Divided by the micro-batches here and by the processes in DDP: the step's loss is the
            # mean of the micro-batches' token means (with one of them, the token mean of the batch).
            (loss / args.grad_accum).backward()
            stats += torch.stack([loss.detach(), masked_mean(per_token.detach(), completion_mask),  # kl: every completion token
                                  completion_mask.sum(1).float().mean(),  # length, up to and including end-of-text
                                  (completion == tok.eot_id).any(1).float().mean()])  # rollouts that finished
        if ddp:
            dist.all_reduce(stats)  # summed over processes, so every process sees the same values
        loss, kl, length, ended = (stats / n_shards).tolist()

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
        if args.teacher == "ema":
            # after every optimizer step; DDP keeps the student identical everywhere, so is the teacher
            ema_update(teacher, model, args.ema_rate)

        # log
        ms = (time.time() - t0) * 1000
        update_ms = ms - gen_ms
        if master:
            log({"stage": stage, "skill": skill, "step": step, "loss": loss, "kl": kl, "length": length,
                 "ended": ended, "lr": lr, "ms": ms, "gen_ms": gen_ms, "update_ms": update_ms})
        # time left in the stage's budget (less if it stops at --stop-at), from the steps since it (or --resume) began
        left = eta(time.time() - t_stage, step + 1 - start_step, args.steps - step - 1)
        print0(f"stage {stage + 1}/{len(stages)} {skill} | step {step + 1}/{args.steps} | loss {loss:.4f} | kl {kl:.4f} "
               f"| len {length:.1f} | ended {ended:.2f} | lr {lr:.2e} | {ms:.0f}ms (gen {gen_ms:.0f}, update {update_ms:.0f}) | eta {left}")
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < args.steps:
            checkpoint(stage, step + 1, False, optimizer)  # in the middle of the stage, for --resume
    else:
        step = args.steps  # the whole budget ran
        if args.keep_best and validate(stage, skill, step) <= best["val_acc"]:
            model.load_state_dict(best["model"])  # an earlier evaluation was as good or better: its weights end the stage
            if best["teacher"] is not None:
                teacher.load_state_dict(best["teacher"])
            step = best["step"]
            print0(f"stage {stage + 1}/{len(stages)} {skill}: kept the weights of step {step} (val_acc {best['val_acc']:.2f})")
    start_step, optimizer_state, best = 0, None, None  # later stages start afresh

    # end of stage: test and validation accuracy on every skill (rank 0), then checkpoint
    if master:
        accuracy = evaluate(model, tok, all_skills, device, split="test", n=args.eval_n)
        val_accuracy = evaluate(model, tok, all_skills, device, split="val", n=args.eval_n)  # for choosing rates
        if facts:  # the facts learned, asked as trained and through a prior skill (not trained: the OOD column)
            accuracy |= {kind: knowledge_accuracy(model, tok, facts, device, kind) for kind in ("direct", "indirect")}
        kl = None if facts else kl_from_base(model, base, tok, skill, device, n=args.eval_n)
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
