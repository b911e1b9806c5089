"""
Self-Distillation Fine-Tuning (SDFT): learn new skills from demonstrations, on-policy.

From a base checkpoint, learn new skills one after another, evaluating every skill after each
stage:

    python train_sdft.py --out runs/sdft            # jab, mug, hub from the shipped base (--init)
    torchrun --nproc_per_node 2 train_sdft.py --out runs/sdft     # two processes
    python train_sdft.py --out runs/sdft --resume   # continue OUT/ckpt.pt

Each step: the student samples one answer per query; the teacher, an EMA of the student shown
a demonstration, scores it; the loss is the per-token forward KL(teacher || student) over the
full vocabulary (sdft.py). The toy skips no first tokens (--skip; the paper: 3).

A stage ends when the skill's validation accuracy reaches --stop-at or its step budget runs
out, on the last weights or, with --keep-best, on those of its best validation. Writes
OUT/ckpt.pt after every stage (and every --ckpt-every steps) and OUT/metrics.jsonl (one record
per step, validation and stage). What both scripts share is in training.py; lab/variants.py
runs either one with the paper's ablations, the lab's variants and its other worlds.
"""

import argparse
import time

import torch

import training
from data import encode_prompts
from model import autocast, cosine_lr
from sdft import ema_update, make_teacher, sdft_loss

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
training.add_arguments(parser, out="runs/sdft", lr=3e-5)
add = parser.add_argument  # SDFT's own settings
add("--alpha", type=float, default=0.0,
    help="divergence: 0 forward KL(teacher||student), 1 reverse KL, between: generalized JSD")
add("--teacher", default="ema", choices=["ema", "base", "live"],
    help="teacher weights: EMA of the student, frozen base, or the student itself")
add("--ema-rate", type=float, default=0.01,
    help="EMA teacher update: teacher <- (1-rate) teacher + rate student")
add("--skip", type=int, default=0, help="leave the first SKIP completion tokens out of the loss "
    "(the paper: 3, against teacher-only openings; a toy answer is 2-6 tokens and has none)")
add("--max-new-tokens", type=int, default=32, help="longest student rollout")
args = parser.parse_args()


def check(args):
    if not (0 <= args.alpha <= 1 and 0 < args.ema_rate <= 1 and args.skip >= 0):
        raise ValueError(f"--alpha must be in [0, 1], --ema-rate in (0, 1] and --skip not "
                         f"negative, got {args.alpha}, {args.ema_rate} and {args.skip}")


run = training.Run(args, check)  # processes, seeds, the base (--init), --resume's checks
model, tok, device = run.model, run.tok, run.device
teacher = make_teacher(model, args.teacher)  # one teacher across all stages
ddp_model = run.start(teacher)  # restores --resume's state, opens the log


def get_batch(skill, data_rng):
    """The student's prompts (the query) and the teacher's (with a demonstration), padded."""
    students, demos, teachers = training.examples(data_rng, skill, run.micro_batch_size,
                                                  args.demo_style)
    return [t.to(device) for t in (*encode_prompts(tok, students), *encode_prompts(tok, teachers))]


# -----------------------------------------------------------------------------
# training: one stage per skill, one step per batch

for stage, skill in enumerate(run.skills):
    if stage < run.start_stage:
        continue  # finished before --resume
    optimizer = run.optimizer()
    t_stage = time.time()
    model.train()
    for step in range(run.start_step, args.steps):
        # validate: stop the stage once the skill is learned (rank 0 measures, all stop)
        if step % args.eval_every == 0:
            val_acc = run.validate(stage, skill, step)
            run.remember(val_acc, step)  # --keep-best
            if val_acc >= args.stop_at:
                break

        t0, gen_ms = time.time(), 0.0
        stats = torch.zeros(4, device=device)  # loss, kl, length, ended: summed over micro-batches
        for k, (data_rng, generator) in enumerate(zip(run.data_rngs, run.generators)):
            if run.ddp:  # DDP averages the gradients once, after the last micro-batch
                ddp_model.require_backward_grad_sync = k == args.grad_accum - 1
            student_ids, student_mask, teacher_ids, teacher_mask = get_batch(skill, data_rng)
            # steps 1-4: rollout, score, per-token divergence, mask and mean (sdft.py)
            with autocast(device):
                loss, out = sdft_loss(ddp_model, teacher, student_ids, student_mask, teacher_ids,
                                      teacher_mask, args.max_new_tokens, tok.eot_id, args.alpha,
                                      args.skip, generator)
            # Divided by the micro-batches here and by the processes in DDP: the step's loss is
            # the mean of the micro-batches' token means (with one, the batch's token mean).
            (loss / args.grad_accum).backward()
            stats += torch.stack([loss.detach(), out["kl"], out["length"], out["ended"]])
            gen_ms += out["rollout_s"] * 1000
        loss, kl, length, ended = run.mean(stats)

        # step 5: update the student (not on a non-finite loss or gradient)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        run.check_finite(stage, step, loss, grad_norm)
        lr = cosine_lr(step, args.lr, args.warmup, args.steps)  # over one stage
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.teacher == "ema":  # then the teacher (DDP keeps the students in sync)
            ema_update(teacher, model, args.ema_rate)

        # log, with the time left in the stage's budget (less if it stops at --stop-at)
        ms = (time.time() - t0) * 1000
        if run.master:
            run.log({"stage": stage, "skill": skill, "step": step, "loss": loss,
                     "kl": kl, "length": length, "ended": ended,
                     "lr": lr, "ms": ms, "gen_ms": gen_ms, "update_ms": ms - gen_ms})
        run.print0(f"stage {stage + 1}/{len(run.skills)} {skill} | step {step + 1}/{args.steps} "
                   f"| loss {loss:.4f} | kl {kl:.4f} | len {length:.1f} | ended {ended:.2f} "
                   f"| lr {lr:.2e} | {ms:.0f}ms (gen {gen_ms:.0f}, update {ms - gen_ms:.0f}) "
                   f"| eta {run.eta(t_stage, step)}")
        run.every(stage, step, optimizer)  # a checkpoint every --ckpt-every steps
    else:
        step = run.budget_spent(stage, skill)  # the whole budget ran (--keep-best: best step)
    run.end_stage(stage, skill, step, t_stage, optimizer)  # every skill's accuracy, checkpoint
run.finish()
