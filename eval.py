"""
Per-skill evaluation: greedy decoding, exact match of the final answer, on held-out queries.

    python eval.py                                            # the shipped base, results/base/ckpt.pt
    python eval.py --ckpt runs/sdft/ckpt.pt
    python eval.py --temperature 1                            # sampled, as SDFT's rollouts are

prints, for every skill, the accuracy of the plain student prompt and, as the teacher
sees it, with an `own` and an `expert` demonstration for the same query in context,
then a few mistakes. The training scripts import `evaluate` from here.
"""

import argparse
import sys

import torch

from data import (NEW_SKILLS, PRIOR_SKILLS, SKILLS, Tokenizer, demonstration, encode_prompts,
                  eval_queries, final_answer, parse_skills, student_prompt, teacher_prompt)
from model import autocast, get_device, load_checkpoint
from sdft import completion_logits, masked_mean, per_token_divergence, rollout

MAX_NEW_TOKENS = 48  # enough for the longest expert-style answer and its end-of-text


@torch.no_grad()
def answer(model, tok, prompts, device, batch_size=256, temperature=0.0):
    """Completions of the prompts (greedy at temperature 0), decoded up to end-of-text."""
    texts = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = encode_prompts(tok, prompts[i:i + batch_size])
        with autocast(device):
            out = model.generate(ids.to(device), mask.to(device), MAX_NEW_TOKENS, temperature=temperature, eot_id=tok.eot_id)
        texts += [tok.decode(row) for row in out.tolist()]
    return texts


def accuracy(model, tok, skill, queries, device, demo_style=None, temperature=0.0):
    """Fraction of queries whose final answer is exactly right, and the wrong ones as
    (prompt, output, expected). demo_style None asks the student prompt; 'own' or
    'expert' puts a demonstration for the same query in context (the teacher's view)."""
    fn = SKILLS[skill]
    if demo_style is None:
        prompts = [student_prompt(skill, q) for q in queries]
    else:
        prompts = [teacher_prompt(skill, q, demonstration(fn(q), demo_style)) for q in queries]
    outputs = answer(model, tok, prompts, device, temperature=temperature)
    mistakes = [(p, o, fn(q)) for p, o, q in zip(prompts, outputs, queries) if final_answer(o) != fn(q)]
    return 1 - len(mistakes) / len(queries), mistakes


def evaluate(model, tok, skills, device, split="test", n=100, demo_style=None, seed=0):
    """{skill: accuracy} on n queries of the split (the same queries for every call)."""
    was_training = model.training
    model.eval()
    queries = eval_queries(split, n, seed)
    result = {s: accuracy(model, tok, s, queries, device, demo_style)[0] for s in skills}
    model.train(was_training)
    return result


@torch.no_grad()
def kl_from_base(model, base, tok, skill, device, split="test", n=100, seed=0):
    """Mean per-token KL(model || base) over the model's own greedy answers to n queries of
    the skill: how far training moved the model on that task. The paper's forgetting
    diagnostic (after learning a new task, KL from the base: SFT 1.26 nats, SDFT 0.68), and
    the x-axis of the forgetting law (RL's Razor: forgetting grows with this KL).
    Full vocabulary at every answer position up to and including end-of-text."""
    was_training = model.training
    model.eval()
    ids, mask = encode_prompts(tok, [student_prompt(skill, q) for q in eval_queries(split, n, seed)])
    ids, mask = ids.to(device), mask.to(device)
    with autocast(device):
        completion, completion_mask = rollout(model, ids, mask, MAX_NEW_TOKENS, tok.eot_id, temperature=0.0)
        model_logits = completion_logits(model, ids, mask, completion, completion_mask)  # (B, C, V)
        base_logits = completion_logits(base, ids, mask, completion, completion_mask)  # (B, C, V)
    model.train(was_training)
    return masked_mean(per_token_divergence(model_logits, base_logits, alpha=1.0), completion_mask).item()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="results/base/ckpt.pt", help="checkpoint to evaluate (default: the shipped base)")
    parser.add_argument("--skills", default=",".join(SKILLS), help="comma-separated skills (default: all)")
    parser.add_argument("--split", default="test", choices=["test", "val"], help="which held-out queries")
    parser.add_argument("--n", type=int, default=200, help="queries per skill")
    parser.add_argument("--mistakes", type=int, default=3, help="wrong answers to print per column")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; 1: sample (seeded by --seed)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling at --temperature above 0")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    args = parser.parse_args()
    try:
        skills = parse_skills(args.skills)
        if args.n <= 0 or args.temperature < 0:
            raise ValueError("--n must be positive and --temperature non-negative")
        device = get_device(args.device)
        model, _ = load_checkpoint(args.ckpt, device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    model.eval()
    torch.manual_seed(args.seed)
    tok = Tokenizer()
    queries = eval_queries(args.split, args.n)

    decoding = "greedy" if args.temperature == 0 else f"sampled (temperature {args.temperature:g})"
    print(f"{args.ckpt}: {decoding} exact match on {args.n} {args.split} queries per skill")
    print(f"{'skill':<8} {'kind':<6} {'plain':>6} {'own demo':>9} {'expert demo':>12}")
    shown = []
    for skill in skills:
        row = []
        for style in (None, "own", "expert"):
            acc, mistakes = accuracy(model, tok, skill, queries, device, style, args.temperature)
            row.append(acc)
            shown += mistakes[:args.mistakes]
        kind = "prior" if skill in PRIOR_SKILLS else "new" if skill in NEW_SKILLS else "?"
        print(f"{skill:<8} {kind:<6} {row[0]:>6.2f} {row[1]:>9.2f} {row[2]:>12.2f}")
    if shown:
        print("\nsome mistakes (prompt -> output, expected):")
        for prompt, output, expected in shown:
            print(f"  {prompt!r} -> {output!r}, expected {expected!r}")
