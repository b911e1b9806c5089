"""
Pretraining the toy "foundation model" from scratch: next-token training on data.py's
mixture (the prior skills plainly and with demonstrations, random throw-away skills with
demonstrations, and each new skill known on 4 of 10 first letters, answered as its rival
elsewhere). It gives the model the prior skills, the ability to read a demonstration in
context, and a start of about 40% on each new skill.

    # the shipped base's recipe (~7 min on one core); a base that never meets the new skills
    python lab/pretrain.py --out runs/mybase/ckpt.pt
    python lab/pretrain.py --p-new 0 --out runs/unseen/ckpt.pt
    # the knowledge base
    python lab/pretrain.py --p-knowledge 0.4 --steps 20000 --out runs/kb/ckpt.pt
    # the thinking base (lab/reasoning.py): every batch of the reasoning world's mixture
    python lab/pretrain.py --p-think 1 --steps 15000 --out runs/think/ckpt.pt
    # the slips base (lab/map.py): the teacher mends a begun answer that went wrong
    python lab/pretrain.py --p-mend 0.3 --out runs/slips/ckpt.pt

benchmark.py --pretrain and the studies run it with runner.BASE_SETTINGS. The loss is
train_sft.py's: cross-entropy on the target tokens. Writes one file, at the end: the weights,
the settings and the toy world they were made for (data.world_signature()), a few MB; it never
replaces a checkpoint. `python eval.py --ckpt OUT` shows what the base can do.
"""

import argparse
import os
import random
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from data import NEW_SKILLS, Tokenizer, check_new_skills, pretrain_examples, sft_batch
from data import world_signature
from lab.knowledge_world import knowledge_pretrain_examples, knowledge_signature
from lab.reasoning_world import reasoning_pretrain_examples, reasoning_signature
from lab.slips_world import mend_examples, slips_signature
from model import GPT, GPTConfig, autocast, cosine_lr, get_device

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", required=True,
                    help="the base checkpoint to write (never over an existing file)")
parser.add_argument("--seed", type=int, default=0,
                    help="seeds python, numpy and torch: same seed, same base")
parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
parser.add_argument("--p-new", type=float, default=0.06, help="share of examples that ask each "
                    "new skill (0: the base never meets the new skills)")
parser.add_argument("--p-right", type=float, default=0.4, help="share of first letters on which a "
                    "new skill is answered right (data.known_letters; elsewhere as data.RIVALS)")
parser.add_argument("--p-knowledge", type=float, default=0.0, help="share of batches of knowledge "
                    "examples (throw-away facts with their document, known facts asked plainly)")
parser.add_argument("--p-think", type=float, default=0.0, help="share of batches of the reasoning "
                    "world's mixture (data.reasoning_pretrain_examples: the prior skills, skills "
                    "answered with a trace; its new skills asked as --p-new and --p-right say)")
parser.add_argument("--p-mend", type=float, default=0.0, help="the slips world "
                    "(lab/slips_world.py): every begun answer that departs from its "
                    "demonstration is mended, and this share of the others with a "
                    "demonstration begins with a slip and is mended (0: the skills world)")
parser.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
parser.add_argument("--n-head", type=int, default=4, help="attention heads")
parser.add_argument("--n-embd", type=int, default=128, help="model width")
parser.add_argument("--steps", type=int, default=12000, help="optimizer steps")
parser.add_argument("--batch-size", type=int, default=32, help="examples per step")
parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
parser.add_argument("--warmup", type=int, default=10, help="linear warmup steps (cosine schedule)")
parser.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
args = parser.parse_args()
try:
    if not (0 <= args.p_new * len(NEW_SKILLS) <= 1 and 0 <= args.p_right <= 1
            and 0 <= args.p_knowledge <= 1 and 0 <= args.p_think <= 1
            and 0 <= args.p_mend <= 1):
        raise ValueError(f"--p-new must be in [0, 1/{len(NEW_SKILLS)}] (one share per new skill), "
                         f"--p-right, --p-knowledge, --p-think and --p-mend in [0, 1], got "
                         f"{args.p_new}, {args.p_right}, {args.p_knowledge}, {args.p_think} and "
                         f"{args.p_mend}")
    if min(args.steps, args.batch_size, args.lr, args.grad_clip) <= 0 or args.warmup < 0:
        raise ValueError("--steps, --batch-size, --lr and --grad-clip must be positive, "
                         "--warmup non-negative")
    if os.path.exists(args.out):
        raise ValueError(f"{args.out} already exists; a base is never replaced: choose another "
                         "--out or delete it")
    check_new_skills()  # the world's rule, as every script checks it
    device = get_device(args.device)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
except ValueError as e:
    sys.exit(f"error: {e}")
except OSError as e:
    sys.exit(f"error: cannot write to --out {args.out} ({e.strerror})")

random.seed(args.seed)
np.random.seed(args.seed)
torch.manual_seed(args.seed)
tok = Tokenizer()
data_rng = random.Random(args.seed)  # the examples: the same stream as train_sft.py's micro-batch 0
model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                      n_embd=args.n_embd))
model.to(device).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
print(f"model: {model.num_params() / 1e6:.2f}M parameters on {device}")
t_start = time.time()
for step in range(args.steps):
    if args.p_knowledge and data_rng.random() < args.p_knowledge:  # (p 0 draws nothing)
        prompts, targets = knowledge_pretrain_examples(data_rng, args.batch_size)
    elif args.p_think and data_rng.random() < args.p_think:  # (p 0 draws nothing)
        prompts, targets = reasoning_pretrain_examples(data_rng, args.batch_size, p_new=args.p_new,
                                                       p_right=args.p_right)
    elif args.p_mend:  # the slips world: the skills world's mixture, its wrong starts mended
        prompts, targets = mend_examples(data_rng, args.batch_size, args.p_mend,
                                         p_new=args.p_new, p_right=args.p_right)
    else:
        prompts, targets = pretrain_examples(data_rng, args.batch_size, p_new=args.p_new,
                                             p_right=args.p_right)
    ids, mask, loss_mask = [t.to(device) for t in sft_batch(tok, prompts, targets)]
    with autocast(device):
        logits = model(ids[:, :-1], mask[:, :-1])  # (B, T-1, V): predicts ids[:, 1:]
    token_loss = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:],
                                 reduction="none")  # (B, T-1)
    weights = loss_mask[:, 1:].float()
    loss = (token_loss * weights).sum() / weights.sum()  # mean over the batch's target tokens
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
        sys.exit(f"error: non-finite loss or gradient at step {step}; nothing written")
    lr = cosine_lr(step, args.lr, args.warmup, args.steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if step % 100 == 0 or step == args.steps - 1:
        left = (time.time() - t_start) / (step + 1) * (args.steps - step - 1)
        print(f"pretrain | step {step + 1}/{args.steps} | loss {loss.item():.4f} | lr {lr:.2e} "
              f"| eta {left:.0f}s", flush=True)

# the base: weights, settings and world, written to a temporary file and renamed
ckpt = {"model": model.state_dict(), "model_config": asdict(model.config), "args": vars(args),
        "world": world_signature(),
        "knowledge_world": knowledge_signature() if args.p_knowledge else None,
        "reasoning_world": reasoning_signature() if args.p_think else None,
        "slips_world": slips_signature(args.p_mend) if args.p_mend else None}
torch.save(ckpt, args.out + ".tmp")
os.replace(args.out + ".tmp", args.out)
print(f"total time {time.time() - t_start:.0f}s; base {args.out}")
