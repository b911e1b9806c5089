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
out, on the last weights or, with --keep-best, on those of its best validation. Writes
OUT/ckpt.pt after every stage (and every --ckpt-every steps) and OUT/metrics.jsonl (one record
per step, validation and stage). What both scripts share is in training.py; lab/variants.py
runs either one with the paper's ablations, the lab's variants and its other worlds.
"""

import argparse
import time

import torch
import torch.nn.functional as F

import training
from data import sft_batch
from model import autocast, cosine_lr

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
training.add_arguments(parser, out="runs/sft", lr=3e-4)
parser.add_argument("--dft", action="store_true", help="the DFT baseline (Wu et al. 2025): "
                    "weight each token's loss by its probability, detached")
args = parser.parse_args()


def dft_loss(token_loss):
    """DFT (Wu et al. 2025), a baseline: each token's SFT loss -log p(y) weighted by p(y) itself,
    detached, so the weight scales the gradient but is not trained: p(y) * -log p(y)."""
    return torch.exp(-token_loss.detach()) * token_loss


run = training.Run(args)  # processes, seeds, the base (--init), --resume's checks
model, tok, device = run.model, run.tok, run.device
ddp_model = run.start()  # restores --resume's state, opens the log


def get_batch(skill, data_rng):
    """Prompt + demonstration, padded: ids, mask, and the demonstration's mask."""
    students, demos, teachers = training.examples(data_rng, skill, run.micro_batch_size,
                                                  args.demo_style)
    return [t.to(device) for t in sft_batch(tok, students, demos)]


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

        t0 = time.time()
        stats = torch.zeros(1, device=device)  # the loss, summed over micro-batches
        for k, data_rng in enumerate(run.data_rngs):
            if run.ddp:  # DDP averages the gradients once, after the last micro-batch
                ddp_model.require_backward_grad_sync = k == args.grad_accum - 1
            ids, mask, target_mask = get_batch(skill, data_rng)
            # the loss: cross-entropy on the demonstration's tokens only
            with autocast(device):
                logits = ddp_model(ids[:, :-1], mask[:, :-1])  # (B, T-1, V): predicts ids[:, 1:]
            token_loss = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:],
                                         reduction="none")  # (B, T-1)
            if args.dft:  # the DFT baseline: each token weighted by its probability
                token_loss = dft_loss(token_loss)
            weights = target_mask[:, 1:].float()
            loss = (token_loss * weights).sum() / weights.sum()  # mean over the target tokens
            # Divided by the micro-batches here and by the processes in DDP: the step's loss is
            # the mean of the micro-batches' token means (with one, the batch's token mean).
            (loss / args.grad_accum).backward()
            stats += loss.detach()
        loss, = run.mean(stats)

        # update the student (not on a non-finite loss or gradient)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        run.check_finite(stage, step, loss, grad_norm)
        lr = cosine_lr(step, args.lr, args.warmup, args.steps)  # over one stage
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # log, with the time left in the stage's budget (less if it stops at --stop-at)
        ms = (time.time() - t0) * 1000
        if run.master:
            run.log({"stage": stage, "skill": skill, "step": step, "loss": loss,
                     "lr": lr, "ms": ms})
        run.print0(f"stage {stage + 1}/{len(run.skills)} {skill} | step {step + 1}/{args.steps} "
                   f"| loss {loss:.4f} | lr {lr:.2e} | {ms:.0f}ms "
                   f"| eta {run.eta(t_stage, step)}")
        run.every(stage, step, optimizer)  # a checkpoint every --ckpt-every steps
    else:
        step = run.budget_spent(stage, skill)  # the whole budget ran (--keep-best: best step)
    run.end_stage(stage, skill, step, t_stage, optimizer)  # every skill's accuracy, checkpoint
run.finish()
