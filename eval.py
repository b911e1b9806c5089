"""
Per-skill evaluation: greedy decoding, exact match of the final answer, on held-out queries.

    python eval.py                                         # the shipped base, results/base/ckpt.pt
    python eval.py --ckpt runs/sdft/ckpt.pt
    python eval.py --temperature 1                         # sampled, as SDFT's rollouts are
    python eval.py --inspect jab --n 4 --plot inspect.png  # inside one SDFT step, token by token

prints, for every skill, the accuracy of the plain student prompt and, as the teacher
sees it, with an `own` and an `expert` demonstration for the same query in context,
then a few mistakes. The training scripts import `evaluate` from here; `pass_at_k` gives
the paper's pass@k (Fig. 5, right). With --inspect, it shows instead what SDFT's training
signal looks like for a few rollouts of one skill: per completion token, the student's and
the teacher's top-1 token, the probability each gives the sampled token, and the divergence
that the loss averages. The checkpoint is both student and teacher, as at step 0 (the EMA
teacher starts as a copy of the student), unless --teacher-ckpt names another teacher.
"""

import argparse
import math
import sys

import torch

from data import (EOT, LAB_SKILLS, NEW_SKILLS, PRIOR_SKILLS, SKILLS, Tokenizer, demonstration,
                  encode_prompts, eval_queries, final_answer, parse_skills, student_prompt,
                  teacher_prompt)
from data import skill_answer
from model import autocast, get_device, load_checkpoint
from sdft import completion_logits, masked_mean, per_token_divergence, rollout, sdft_loss

MAX_NEW_TOKENS = 48  # enough for the longest expert-style answer and its end-of-text


@torch.no_grad()
def answer(model, tok, prompts, device, batch_size=256, temperature=0.0, generator=None):
    """Completions of the prompts (greedy at temperature 0, else sampled from `generator`),
    decoded up to end-of-text."""
    texts = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = encode_prompts(tok, prompts[i:i + batch_size])
        with autocast(device):
            out = model.generate(ids.to(device), mask.to(device), MAX_NEW_TOKENS,
                                 temperature=temperature, generator=generator, eot_id=tok.eot_id)
        texts += [tok.decode(row) for row in out.tolist()]
    return texts


def accuracy(model, tok, skill, queries, device, demo_style=None, temperature=0.0):
    """Fraction of queries whose final answer is exactly right, and the wrong ones as
    (prompt, output, expected). demo_style None asks the student prompt; 'own' or
    'expert' puts a demonstration for the same query in context (the teacher's view)."""
    fn = lambda q: skill_answer(skill, q)  # a lab world's skill too (data.LAB_SKILLS)
    if demo_style is None:
        prompts = [student_prompt(skill, q) for q in queries]
    else:
        prompts = [teacher_prompt(skill, q, demonstration(fn(q), demo_style)) for q in queries]
    outputs = answer(model, tok, prompts, device, temperature=temperature)
    mistakes = [(p, o, fn(q)) for p, o, q in zip(prompts, outputs, queries)
                if final_answer(o) != fn(q)]
    return 1 - len(mistakes) / len(queries), mistakes


def evaluate(model, tok, skills, device, split="test", n=100, demo_style=None, seed=0,
             temperature=0.0):
    """{skill: accuracy} on n queries of the split (the same queries for every call)."""
    was_training = model.training
    model.eval()
    queries = eval_queries(split, n, seed)
    result = {s: accuracy(model, tok, s, queries, device, demo_style, temperature)[0]
              for s in skills}
    model.train(was_training)
    return result


def pass_at_k_estimate(n, c, k):
    """Chance that k of n samples, c of them right, drawn without replacement, hold a right one:
    1 - C(n - c, k) / C(n, k), the unbiased pass@k estimator (Chen et al. 2021)."""
    return 1 - math.comb(n - c, k) / math.comb(n, k)  # comb is 0 when k > n - c: pass@k is 1


def pass_at_k(model, tok, skill, queries, device, n_samples=16, ks=(1, 2, 4, 8, 16),
              temperature=1.0, seed=0):
    """{k: pass@k} on the plain student prompt, as in the paper's Fig. 5 (right): n_samples
    completions per query at the temperature, drawn from a generator seeded with seed (the
    same seed gives the same result), averaged over the queries."""
    if not all(1 <= k <= n_samples for k in ks):
        raise ValueError(f"every k must be in 1..n_samples ({n_samples}), got {list(ks)}")
    fn = SKILLS[skill]
    # each prompt n_samples times, in one batch
    prompts = [student_prompt(skill, q) for q in queries for _ in range(n_samples)]
    generator = torch.Generator(device).manual_seed(seed)
    outputs = answer(model, tok, prompts, device, temperature=temperature, generator=generator)
    correct = [sum(final_answer(o) == fn(q) for o in outputs[i * n_samples:(i + 1) * n_samples])
               for i, q in enumerate(queries)]  # c, right samples per query
    return {k: sum(pass_at_k_estimate(n_samples, c, k) for c in correct) / len(queries) for k in ks}


@torch.no_grad()
def kl_from_base(model, base, tok, skill, device, split="test", n=100, seed=0):
    """Mean per-token KL(model || base) over the model's own greedy answers to n queries of
    the skill: how far training moved the model on that task. The paper's forgetting
    diagnostic (after learning a new task, KL from the base: SFT 1.26 nats, SDFT 0.68), and
    the x-axis of the forgetting law (RL's Razor: forgetting grows with this KL).
    Full vocabulary at every answer position up to and including end-of-text."""
    was_training = model.training
    model.eval()
    ids, mask = encode_prompts(tok, [student_prompt(skill, q)
                                     for q in eval_queries(split, n, seed)])
    ids, mask = ids.to(device), mask.to(device)
    with autocast(device):
        completion, completion_mask = rollout(model, ids, mask, MAX_NEW_TOKENS, tok.eot_id,
                                              temperature=0.0)
        model_logits = completion_logits(model, ids, mask, completion, completion_mask)  # (B, C, V)
        base_logits = completion_logits(base, ids, mask, completion, completion_mask)  # (B, C, V)
    model.train(was_training)
    return masked_mean(per_token_divergence(model_logits, base_logits, alpha=1.0),
                       completion_mask).item()


@torch.no_grad()
def inspect_step(student, teacher, tok, skill, queries, device, demo_style="expert", alpha=0.0,
                 skip=0, seed=0):
    """Inside one SDFT step: one rollout per query and, at each of its tokens up to and
    including end-of-text, what the loss sees. The call is train_sdft.py's (sdft.sdft_loss, its
    rollout at temperature 1 from a generator seeded with seed), so `divergence` is exactly
    what masked_mean averages into the loss, over the tokens with `in_loss`. Returns [{prompt,
    teacher_prompt, expected, sample, right, tokens: [{token, student_top, student_p,
    teacher_top, teacher_p, student_p_sampled, teacher_p_sampled, divergence, in_loss}]}]."""
    fn = SKILLS[skill]
    students = [student_prompt(skill, q) for q in queries]
    teachers = [teacher_prompt(skill, q, demonstration(fn(q), demo_style)) for q in queries]
    student_ids, student_mask = (t.to(device) for t in encode_prompts(tok, students))
    teacher_ids, teacher_mask = (t.to(device) for t in encode_prompts(tok, teachers))
    generator = torch.Generator(device).manual_seed(seed)
    with autocast(device):  # one SDFT step's loss, as train_sdft.py computes it
        _, step = sdft_loss(student, teacher, student_ids, student_mask, teacher_ids,
                            teacher_mask, MAX_NEW_TOKENS, tok.eot_id, alpha, skip, generator)
    completion, completion_mask = step["completion"], step["completion_mask"]
    student_logits, teacher_logits = step["student_logits"], step["teacher_logits"]  # (B, C, V)
    divergence, in_loss = step["per_token"], step["mask"]  # (B, C): in_loss 0 after end-of-text
    student_p, teacher_p = (student_logits.float().softmax(-1),
                            teacher_logits.float().softmax(-1))  # (B, C, V)
    (student_top_p, student_top), (teacher_top_p, teacher_top) = (student_p.max(-1),
                                                                  teacher_p.max(-1))  # (B, C)
    student_p_sampled = student_p.gather(-1, completion[..., None]).squeeze(-1)  # (B, C)
    teacher_p_sampled = teacher_p.gather(-1, completion[..., None]).squeeze(-1)
    text = lambda i: tok.enc.decode([i])  # one token, end-of-text included
    rollouts = []
    for b, query in enumerate(queries):
        n = int(completion_mask[b].sum())  # tokens up to and including the first end-of-text
        tokens = [{"token": text(completion[b, j].item()),
                   "student_top": text(student_top[b, j].item()),
                   "student_p": student_top_p[b, j].item(),
                   "teacher_top": text(teacher_top[b, j].item()),
                   "teacher_p": teacher_top_p[b, j].item(),
                   "student_p_sampled": student_p_sampled[b, j].item(),
                   "teacher_p_sampled": teacher_p_sampled[b, j].item(),
                   "divergence": divergence[b, j].item(),
                   "in_loss": bool(in_loss[b, j])} for j in range(n)]
        sample = tok.decode(completion[b].tolist())
        rollouts.append({"prompt": students[b], "teacher_prompt": teachers[b],
                         "expected": fn(query), "sample": sample,
                         "right": final_answer(sample) == fn(query), "tokens": tokens})
    return rollouts


def after_first_wrong(rollouts, eot=EOT):
    """What the teacher does with a student's wrong start, over the wrong rollouts of inspect_step:
    the mean divergence at the first wrong token (where the teacher's target is the skill's), and
    at the tokens after it, with the share of those where the teacher's top-1 token is the one the
    student went on with (1: the teacher reads the student's start; 0: it copies the
    demonstration over it). None where no rollout is wrong."""
    first, after, agree = [], [], []
    for r in rollouts:
        right = list(r["expected"]) + [eot]
        sampled = [t["token"] for t in r["tokens"]]
        wrong = next((j for j, t in enumerate(sampled) if j >= len(right) or t != right[j]), None)
        if r["right"] or wrong is None:
            continue
        first.append(r["tokens"][wrong]["divergence"])
        for t in r["tokens"][wrong + 1:]:
            after.append(t["divergence"])
            agree.append(t["teacher_top"] == t["token"])
    if not first:
        return None
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    return {"wrong_rollouts": len(first), "divergence_first_wrong": mean(first),
            "tokens_after": len(after), "divergence_after": mean(after),
            "teacher_follows": mean(agree)}


def plot_inspect(rollouts, path):
    """One panel per rollout: the per-token divergence as bars under the sampled tokens, the
    teacher's top-1 token written above a bar where it differs from the sample, and the tokens
    left out of the loss in grey."""
    import matplotlib  # imported late: only the plot needs it

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rollouts), 1, figsize=(7, 2.2 * len(rollouts)), squeeze=False)
    for ax, r in zip(axes[:, 0], rollouts):
        tokens, x = r["tokens"], range(len(r["tokens"]))
        heights = [t["divergence"] for t in tokens]
        ax.bar(x, heights, color=["tab:blue" if t["in_loss"] else "lightgrey" for t in tokens])
        for i, t in enumerate(tokens):
            if t["teacher_top"] != t["token"]:
                ax.annotate(f"T: {printable(t['teacher_top'])}", (i, heights[i]), ha="center",
                            va="bottom", color="tab:red")
        ax.set_xticks(list(x), [printable(t["token"]) for t in tokens])
        ax.set_ylim(0, 1.25 * max(heights + [1e-3]))  # room for the annotations
        ax.set_ylabel("divergence")
        ax.set_title(f"{r['prompt']}  ->  {r['sample']}  "
                     f"({'right' if r['right'] else 'wrong, expected ' + r['expected']})")
    ax.set_xlabel("sampled token (T: the teacher's top-1 where it differs; "
                  "grey: left out of the loss)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def printable(token):
    """A token as one printable cell: end-of-text shortened, a newline escaped."""
    return "<eot>" if token == EOT else token.replace("\n", "\\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="results/base/ckpt.pt",
                        help="checkpoint to evaluate (default: the shipped base)")
    parser.add_argument("--skills", default=",".join(SKILLS),
                        help="comma-separated skills (default: all)")
    parser.add_argument("--split", default="test", choices=["test", "val"],
                        help="which held-out queries")
    parser.add_argument("--n", type=int, default=None, help="queries per skill (default 200); "
                        "with --inspect, rollouts to show (default 4)")
    parser.add_argument("--mistakes", type=int, default=3,
                        help="wrong answers to print per column")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy; 1: sample (seeded by --seed)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling at --temperature "
                        "above 0, and the --inspect rollouts")
    parser.add_argument("--device", default=None,
                        help="cuda, mps or cpu (default: the best available)")
    # inside one SDFT step
    parser.add_argument("--inspect", default=None, metavar="SKILL",
                        help="show one SDFT step's training signal, token by token, "
                        "on SKILL's rollouts (sampled at temperature 1, as in training)")
    parser.add_argument("--teacher-ckpt", default=None, help="with --inspect: the teacher "
                        "(default: --ckpt itself, as at step 0)")
    parser.add_argument("--alpha", type=float, default=0.0, help="with --inspect: 0 forward "
                        "KL(teacher||student), 1 reverse KL, between: JSD")
    parser.add_argument("--skip", type=int, default=0, help="with --inspect: completion tokens "
                        "left out of the loss at the start")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="with --inspect: draw "
                        "the divergence per token into FILE.png")
    args = parser.parse_args()
    try:
        skills = parse_skills(args.inspect or args.skills)
        n = args.n if args.n is not None else 4 if args.inspect else 200
        if args.inspect and len(skills) != 1:
            raise ValueError("--inspect takes one skill")
        if n <= 0 or args.temperature < 0:
            raise ValueError("--n must be positive and --temperature non-negative")
        if not 0 <= args.alpha <= 1 or args.skip < 0:
            raise ValueError("--alpha must be in [0, 1] and --skip non-negative")
        device = get_device(args.device)
        model, _ = load_checkpoint(args.ckpt, device)
        teacher = (load_checkpoint(args.teacher_ckpt, device)[0].eval() if args.teacher_ckpt
                   else model)
    except ValueError as e:
        sys.exit(f"error: {e}")
    model.eval()
    torch.manual_seed(args.seed)
    tok = Tokenizer()

    if args.inspect:
        # Rollouts of a few more queries than shown, so that a wrong and a right one can be picked.
        rollouts = inspect_step(model, teacher, tok, args.inspect, eval_queries(args.split, 4 * n),
                                device, alpha=args.alpha, skip=args.skip, seed=args.seed)
        wrong = after_first_wrong(rollouts)
        right = [r["right"] for r in rollouts]
        first = [right.index(v) for v in (False, True) if v in right]  # first wrong, first right
        rollouts = [rollouts[i] for i in
                    sorted((first + [i for i in range(len(rollouts)) if i not in first])[:n])]
        print(f"{args.ckpt}: inside one SDFT step on {args.inspect}, "
              f"teacher {args.teacher_ckpt or 'the same weights (step 0)'}, "
              f"expert demonstrations, alpha {args.alpha:g}, skip {args.skip}; "
              "p: probability, x: left out of the loss")
        # top-1 token and its p
        top = lambda t, who: f"{printable(t[who + '_top']):<6}{t[who + '_p']:.2f}"
        for r in rollouts:
            verdict = "right" if r["right"] else f"wrong, expected {r['expected']!r}"
            print(f"\n{r['prompt']!r} -> {r['sample']!r} ({verdict})\n"
                  f"  teacher prompt {r['teacher_prompt']!r}")
            print(f"  {'token':<6} {'student top-1':<14} {'teacher top-1':<14} "
                  f"{'p_S(token)':>10} {'p_T(token)':>10} {'divergence':>10}")
            # divergence clamped at 0 for printing only: rounding can make it -0.000
            for t in r["tokens"]:
                print(f"  {printable(t['token']):<6} {top(t, 'student'):<14} "
                      f"{top(t, 'teacher'):<14} {t['student_p_sampled']:>10.2f} "
                      f"{t['teacher_p_sampled']:>10.2f} {max(t['divergence'], 0):>10.3f}"
                      f"{'' if t['in_loss'] else '  x'}")
        kept = [t["divergence"] for r in rollouts for t in r["tokens"] if t["in_loss"]]
        print(f"\nloss on these rollouts (mean divergence over their {len(kept)} tokens "
              f"in the loss): {sum(kept) / max(len(kept), 1):.3f}")
        if wrong:
            print(f"on the {wrong['wrong_rollouts']} wrong rollouts of {4 * n}: "
                  f"divergence {wrong['divergence_first_wrong']:.3f} at the first wrong token, "
                  f"{wrong['divergence_after']:.3f} per token after it "
                  f"({wrong['tokens_after']} tokens), where the teacher's top-1 is the student's "
                  f"own next token {wrong['teacher_follows']:.0%} of the time")
        if args.plot:
            plot_inspect(rollouts, args.plot)
            print(f"plot: {args.plot}")
        sys.exit(0)
    queries = eval_queries(args.split, n)

    decoding = "greedy" if args.temperature == 0 else f"sampled (temperature {args.temperature:g})"
    print(f"{args.ckpt}: {decoding} exact match on {n} {args.split} queries per skill")
    print(f"{'skill':<8} {'kind':<6} {'plain':>6} {'own demo':>9} {'expert demo':>12}")
    shown = []
    for skill in skills:
        row = []
        for style in (None, "own", "expert"):
            acc, mistakes = accuracy(model, tok, skill, queries, device, style, args.temperature)
            row.append(acc)
            shown += mistakes[:args.mistakes]
        kind = ("prior" if skill in PRIOR_SKILLS else "new" if skill in NEW_SKILLS
                else "lab" if skill in LAB_SKILLS else "?")
        print(f"{skill:<8} {kind:<6} {row[0]:>6.2f} {row[1]:>9.2f} {row[2]:>12.2f}")
    if shown:
        print("\nsome mistakes (prompt -> output, expected):")
        for prompt, output, expected in shown:
            print(f"  {prompt!r} -> {output!r}, expected {expected!r}")
