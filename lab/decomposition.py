"""
What drives the toy's win? SDFT against every kind of SFT, each on its frontier (the paper's
Fig. 4 in miniature, with Fig. 6's offline variants), learning the headline's skills in turn.

    python lab/decomposition.py               # 6 variants x 5 rates x 3 seeds, the default order
    python lab/decomposition.py --orders all  # and then every other order, at the chosen rates
    python lab/decomposition.py --quick       # a tiny model and budget: checks the pipeline

The variants, each learning jab, mug, hub in turn from the shipped base with the same queries,
the same step budget per skill (1000: enough for SFT on the expert's traces to learn), the same
stopping rule (0.95 on validation) and at every rate of the same sweep:

  sft-expert   SFT on the expert's demonstrations: the paper's SFT, the headline's
  dft          DFT on the expert's demonstrations (Wu et al. 2025): each token's loss weighted
               by its probability, detached (a baseline of the paper's Table 5)
  sft-own      SFT on demonstrations in the model's own style: a control, not a method (writing
               such demonstrations is the teacher's job; a user of SFT has only the expert's)
  sft-teacher  SFT on the teacher's samples: the frozen base, shown the expert's demonstration,
               writes each answer; the student imitates it token by token (Fig. 6)
  offline      offline distillation: forward KL to that teacher on its own samples (Fig. 6)
  sdft         SDFT: forward KL to the EMA teacher on the student's own samples

sft-own and sft-teacher differ from sft-expert only in the style of what is imitated;
offline differs from sft-teacher only in the loss (the teacher's whole distribution); sdft
differs from offline only in who samples (on-policy) and in the teacher (EMA).

Each variant's rate is chosen on validation queries, as benchmark.py chooses: the best mean
validation accuracy of the new skills after the last stage, over seeds (a tie: the lower rate).
Writes OUT/results.json (every run, per stage: steps, test and validation accuracy of every
skill, kl_from_base), OUT/table.md (the chosen rates, then every rate), OUT/pareto.png (every
variant and rate: new-skill mean against the prior average, of the base's, after the sequence)
and OUT/collapse.txt (what SFT and SDFT write on prior-skill prompts after the first stage).
"""

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root
from data import NEW_SKILLS, PRIOR_SKILLS, SEQUENCE, Tokenizer, eval_queries, student_prompt
from data import parse_skills, skill_answer
from eval import answer, evaluate
from runner import (BASE_SETTINGS, clock, ensure_base, every, flags, mean_sd, run_once,
                        worst_skill)
from model import load_checkpoint

VARIANTS = {  # name: (script, its flags, label); lab/variants.py runs the ablations
    "sft-expert": ("train_sft.py", {"demo_style": "expert"}, "SFT on the expert's demonstrations"),
    "dft": ("train_sft.py", {"dft": True}, "DFT on the expert's demonstrations (a baseline)"),
    "sft-own": ("train_sft.py", {"demo_style": "own"}, "SFT on own-style demonstrations (control)"),
    "sft-teacher": ("lab/variants.py train_sdft.py",
                    {"rollout": "teacher", "teacher": "base", "loss": "ce"},
                    "SFT on the teacher's samples"),
    "offline": ("lab/variants.py train_sdft.py", {"rollout": "teacher", "teacher": "base"},
                "offline distillation (KL on the teacher's samples)"),
    "sdft": ("train_sdft.py", {}, "SDFT"),
}
COLORS = {"sft-expert": "tab:red", "dft": "tab:brown", "sft-own": "tab:orange",
          "sft-teacher": "tab:purple", "offline": "tab:green", "sdft": "tab:blue"}

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", default=None,
                    help="directory (default: results/decomposition; runs/decomposition-quick)")
parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants")
parser.add_argument("--lrs", default="1e-5,3e-5,1e-4,3e-4,1e-3",
                    help="the rate sweep, the same for every variant")
parser.add_argument("--seeds", default="0,1,2", help="comma-separated fine-tuning seeds")
parser.add_argument("--skills", default=",".join(SEQUENCE), help="new skills, in this order")
parser.add_argument("--orders", default="given", choices=["given", "all"], help="given: the "
                    "sweep in the order of --skills; all: then every other order, at the chosen "
                    "rate of each variant")
parser.add_argument("--steps", type=int, default=1000, help="step budget per skill")
parser.add_argument("--jobs", type=int, default=2, help="training runs side by side (one thread "
                    "each, so the results do not depend on this)")
parser.add_argument("--quick", action="store_true",
                    help="a tiny base and budget: checks the pipeline, shows nothing")
args = parser.parse_args()
args.out = args.out or ("runs/decomposition-quick" if args.quick else "results/decomposition")
try:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"unknown variant '{','.join(unknown)}' (known: {', '.join(VARIANTS)})")
    lrs = sorted(float(s) for s in args.lrs.split(",") if s.strip())
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not lrs or not seeds or min(lrs) <= 0:
        raise ValueError("--lrs must list positive rates and --seeds at least one seed")
    if args.steps <= 0 or args.jobs <= 0:
        raise ValueError("--steps and --jobs must be positive")
    skills = parse_skills(args.skills)
    if not set(skills) <= set(NEW_SKILLS) or len(set(skills)) < len(skills):
        raise ValueError(f"--skills must name distinct new skills ({', '.join(NEW_SKILLS)}), "
                         f"got '{args.skills}'")
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
except ValueError as e:
    bad = "could not convert" in str(e) or "invalid literal" in str(e)
    sys.exit("error: --lrs and --seeds must be comma-separated numbers" if bad else f"error: {e}")
except OSError as e:
    sys.exit(f"error: cannot write to --out {args.out} ({e.strerror})")

FINETUNE = {"steps": args.steps, "eval_n": 100, "stop_at": 0.95}
base_settings, base = BASE_SETTINGS, "results/base/ckpt.pt"
if args.quick:
    FINETUNE = {"steps": min(args.steps, 2), "eval_n": 4, "stop_at": 0.95, "eval_every": 1}
    base_settings = BASE_SETTINGS | {"steps": 20, "n_layer": 1, "n_head": 2, "n_embd": 32}
    base = os.path.join(args.out, "base.pt")
prior = list(PRIOR_SKILLS)
device = torch.device("cpu")
tok = Tokenizer()
t_start = time.time()

ensure_base(base, base_settings)
base_acc = evaluate(load_checkpoint(base, device)[0], tok, prior + list(NEW_SKILLS), device,
                    n=FINETUNE["eval_n"])


def prior_avg(accuracy):
    return sum(accuracy[s] for s in prior) / len(prior)


# -----------------------------------------------------------------------------
# the runs: each is the training script itself, reused when finished with the same command

def run_name(variant, order, lr, seed):
    return f"{variant}-{'-'.join(order)}-seed{seed}-lr{lr:g}"


def run(variant, order, lr, seed):
    """One variant learning the skills of `order` in turn; its record for results.json."""
    script, settings, _ = VARIANTS[variant]
    name = run_name(variant, order, lr, seed)
    out = os.path.join(args.out, "runs", name)
    command = [*script.split(), "--init", base, "--skills", ",".join(order), "--seed", str(seed),
               "--lr", str(lr), *flags(FINETUNE | settings), "--out", out]
    run_once(command, out, on_line=every(60, prefix=f"  {name}: "))  # a step line a minute
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    stages = [{k: r[k] for k in ("skill", "steps", "seconds", "accuracy", "val_accuracy",
                                 "kl_from_base")} for r in records if "accuracy" in r]
    return {"variant": variant, "order": order, "lr": lr, "seed": seed, "stages": stages}


def run_all(jobs):
    print(f"{len(jobs)} runs, {args.jobs} at a time, into {os.path.join(args.out, 'runs')}",
          flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:  # threads only wait on the scripts
        return list(pool.map(lambda job: run(*job), jobs))


runs = run_all([(v, skills, lr, seed) for v in variants for lr in lrs for seed in seeds])


def group(variant, lr, order=skills):
    return [r for r in runs if r["variant"] == variant and r["lr"] == lr and r["order"] == order]


def val_score(variant, lr):
    """The rule that chooses a rate: mean validation accuracy of the new skills after the last
    stage, over seeds (validation queries only: test queries are only for the tables)."""
    return statistics.mean(r["stages"][-1]["val_accuracy"][k] for r in group(variant, lr)
                           for k in skills)


scores = {v: {lr: val_score(v, lr) for lr in lrs} for v in variants}
chosen = {v: max(lrs, key=lambda lr: scores[v][lr]) for v in variants}  # max: the first (lowest)
orders = [skills]
if args.orders == "all":
    orders += [list(o) for o in itertools.permutations(skills) if list(o) != skills]
    runs += run_all([(v, o, chosen[v], seed) for o in orders[1:] for v in variants
                     for seed in seeds])

# -----------------------------------------------------------------------------
# the table: after the last stage, mean ± sd over seeds; the prior average with its worst skill


def point(rs):
    """After the last stage of these runs: the new-skill mean and the prior average relative to
    the base's (means over seeds), and the prior skill lowest on average over seeds."""
    last = [r["stages"][-1]["accuracy"] for r in rs]
    new = statistics.mean(a[k] for a in last for k in rs[0]["order"])
    kept = statistics.mean(prior_avg(a) for a in last) / max(prior_avg(base_acc), 1e-9)
    return (new, kept, *worst_skill(last, prior))


def row(variant, lr, order):
    rs = group(variant, lr, order)
    last = [r["stages"][-1] for r in rs]
    new, kept, worst, worst_acc = point(rs)
    steps = " / ".join(f"{statistics.mean(r['stages'][i]['steps'] for r in rs):.0f}"
                       for i in range(len(order)))
    return (f"| {VARIANTS[variant][2]} | {lr:g} | {scores[variant][lr]:.3f} | {steps} | "
            + " | ".join(mean_sd([s["accuracy"][k] for s in last]) for k in order)
            + f" | {new:.2f} | {mean_sd([prior_avg(s['accuracy']) for s in last])} "
              f"({worst} {worst_acc:.2f}) | {kept:.2f} "
              f"| {mean_sd([s['kl_from_base'] for s in last])} |")


def header(order):
    return [f"| variant | lr | val score | steps per stage | {' | '.join(order)} | new, mean | "
            "prior average (worst skill) | of the base's | kl_from_base |",
            "|" + "---|" * (len(order) + 8)]


base_worst = min(prior, key=lambda k: base_acc[k])
rows = [f"Order {','.join(skills)}, {len(seeds)} seeds, test accuracy after the last stage "
        f"(base: {' '.join(f'{k} {base_acc[k]:.2f}' for k in skills)}; prior average "
        f"{prior_avg(base_acc):.2f}, worst {base_worst} {base_acc[base_worst]:.2f}). "
        "Each variant at its rate chosen on validation:", ""]
rows += header(skills) + [row(v, chosen[v], skills) for v in variants]
rows += ["", "Every rate of the sweep (val score: the rule that chooses the rate):", ""]
rows += header(skills) + [row(v, lr, skills) for v in variants for lr in lrs]
for order in orders[1:]:
    rows += ["", f"Order {','.join(order)}, each variant at its chosen rate:", ""]
    rows += header(order) + [row(v, chosen[v], order) for v in variants]
if len(orders) > 1:  # every order at the chosen rates, pooled: the goals of the headline
    rows += ["", f"Every order ({len(orders)} x {len(seeds)} runs), each variant at its chosen "
             "rate: runs with every new skill >= 0.9 | worst new skill | prior average of the "
             "base's, mean (worst run) | worst single prior skill in any run", "",
             "| variant | lr | every new skill >= 0.9 | worst new skill | prior, of the base's "
             "| worst prior skill |", "|---|---|---|---|---|---|"]
    for v in variants:
        last = [r["stages"][-1]["accuracy"] for r in runs if r["variant"] == v
                and r["lr"] == chosen[v]]
        worst_new = [min(a[k] for k in skills) for a in last]
        kept = [prior_avg(a) / max(prior_avg(base_acc), 1e-9) for a in last]
        k_min, a_min = min(((k, a[k]) for a in last for k in prior), key=lambda t: t[1])
        rows.append(f"| {VARIANTS[v][2]} | {chosen[v]:g} | {sum(w >= 0.9 for w in worst_new)}"
                    f"/{len(last)} | {min(worst_new):.2f} | {statistics.mean(kept):.2f} "
                    f"({min(kept):.2f}) | {k_min} {a_min:.2f} |")
table = "\n".join(rows) + "\n"

# -----------------------------------------------------------------------------
# what SFT writes on prior prompts after its first stage: the first skill alone, which is the
# sequence run's first stage (the same seed draws the same batches), checked on its accuracy

first = skills[:1]
shown = [v for v in ("sft-expert", "sft-own", "sdft") if v in variants]
after_first = run_all([(v, first, chosen[v], seeds[0]) for v in shown])
for r in after_first:
    seq = group(r["variant"], r["lr"])[0]["stages"][0]["accuracy"]
    if r["stages"][0]["accuracy"] != seq:
        sys.exit(f"error: {r['variant']} on {first[0]} alone does not repeat the sequence's first "
                 "stage; the collapse lines would not show the runs of the table")
queries = eval_queries("test", 2, seed=1)  # the same two test queries for every prior skill
lines = [f"What each model writes (greedy) on prior-skill test prompts after learning "
         f"{first[0]} alone, seed {seeds[0]}, at its chosen rate: the first stage of its run in "
         "table.md (the same accuracies, checked). The grader reads the text after the last "
         "'='.", ""]
for r in after_first:
    model = load_checkpoint(os.path.join(args.out, "runs", run_name(r["variant"], first, r["lr"],
                                                                    r["seed"]), "ckpt.pt"),
                            device)[0]
    lines.append(f"{VARIANTS[r['variant']][2]}, lr {r['lr']:g} (prior average after the stage "
                 f"{prior_avg(r['stages'][0]['accuracy']):.2f}):")
    prompts = [student_prompt(k, q) for k in prior for q in queries]
    expected = [skill_answer(k, q) for k in prior for q in queries]
    for p, out, want in zip(prompts, answer(model, tok, prompts, device), expected):
        lines.append(f"  {p:<12} -> {out!r:<24} expected {want!r}")
    lines.append("")
collapse = "\n".join(lines)

# -----------------------------------------------------------------------------
# files: results.json, table.md, collapse.txt, pareto.png

config = {"variants": {v: VARIANTS[v][:2] for v in variants}, "lrs": lrs, "seeds": seeds,
          "skills": skills, "orders": orders, "finetune": FINETUNE, "base": base,
          "base_settings": base_settings, "quick": args.quick, "chosen": chosen,
          "val_scores": {v: {f"{lr:g}": s for lr, s in scores[v].items()} for v in variants}}
results = {"config": config, "base": base_acc, "runs": runs, "after_first_stage": after_first}
with open(os.path.join(args.out, "results.json.tmp"), "w") as f:
    json.dump(results, f, indent=1)
os.replace(os.path.join(args.out, "results.json.tmp"), os.path.join(args.out, "results.json"))
for name, text in (("table.md", table), ("collapse.txt", collapse)):
    with open(os.path.join(args.out, name), "w") as f:
        f.write(text)

import matplotlib  # noqa: E402  (imported late: only the plot needs it)

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402

MARKERS = {"sft-expert": "o", "dft": "v", "sft-own": "s", "sft-teacher": "^", "offline": "D",
           "sdft": "o"}
fig, axes = plt.subplots(1, 2, figsize=(12, 5))
for ax, zoom in zip(axes, (False, True)):  # every point, then the corner where most of them are
    for i, v in enumerate(variants):  # each variant's frontier: one point per rate, in rate order
        xy = [point(group(v, lr))[:2] for lr in lrs]
        ax.plot(*zip(*xy), marker=MARKERS[v], color=COLORS[v], label=VARIANTS[v][2], alpha=0.7,
                markerfacecolor="none" if v != "sdft" else COLORS[v])
        ax.scatter(*point(group(v, chosen[v]))[:2], s=220, marker="*", color=COLORS[v], zorder=3,
                   alpha=0.6)
        for j, (lr, (x, y)) in enumerate(zip(lrs, xy)):  # labels apart where points meet:
            if zoom or v == "sft-expert":  # by variant in the corner, by rate elsewhere
                ax.annotate(f"{lr:g}", (x, y), textcoords="offset points", fontsize=6,
                            xytext=(6, 10 - 6 * i) if zoom else (6, 30 - 8 * j), color=COLORS[v])
    ax.set_xlabel(f"new skills, mean test accuracy after {','.join(skills)}")
    ax.set_ylabel("prior-skill average, of the base's")
if not args.quick:
    axes[1].set_xlim(0.82, 1.01)
    axes[1].set_ylim(0.4, 1.02)
axes[0].set_xlim(-0.05, 1.05)
axes[0].set_ylim(-0.05, 1.1)
axes[0].set_title("every variant at every rate", fontsize=10)
axes[1].set_title("the top right corner, enlarged", fontsize=10)
fig.suptitle(f"After the sequence, {len(seeds)} seeds; a star: the rate chosen on validation",
             fontsize=10)
fig.legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="lower center", ncol=3)
fig.tight_layout(rect=(0, 0.1, 1, 1))  # room for the legend below
fig.savefig(os.path.join(args.out, "pareto.png"), dpi=120)
plt.close("all")

print("\n" + table + "\n" + collapse)
print(f"wrote {args.out}/results.json, table.md, collapse.txt, pareto.png; total time "
      f"{clock(time.time() - t_start)}")
