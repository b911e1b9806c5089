"""
The sequential-skill benchmark: the paper's claims in miniature, in one command.

    # the shipped base, SFT and SDFT at their tuned rates: ~1 min on 2 CPU cores
    python benchmark.py
    # every order of the new skills, 3 seeds each
    python benchmark.py --seeds 0,1,2 --orders all
    # a rate sweep, chosen on validation
    python benchmark.py --lr-sft 1e-5,3e-5,1e-4,3e-4 --lr-sdft 3e-6,1e-5,3e-5 --seeds 0,1,2
    # pretrain a new base model first (~7 min)
    python benchmark.py --pretrain --base runs/mybase/ckpt.pt
    # the base recipe under 3 pretraining seeds
    python benchmark.py --base-seeds 0,1,2 --out results/base
    # a tiny run, for smoke tests and demos (~15 s)
    python benchmark.py --quick

1. The base model: --base (default results/base/ckpt.pt, the one shipped with the repository
   and behind every committed result). It is used only if it was pretrained with this
   benchmark's pretraining settings and for this toy world (data.world_signature(): the
   skills, their rivals, the alphabet, the prompt formats), so a base made before a skill was
   added is never taken for one that met it. --pretrain makes a new one where --base holds
   none; it never replaces a checkpoint. Evaluated plainly and with a demonstration in context.
2. For each order of the new skills, method, learning rate and seed: learn the skills in
   sequence from that one base with train_sft.py / train_sdft.py, with the same queries,
   demonstrations, budgets and stopping rule; every skill is evaluated after every stage.
3. Write OUT/results.json and OUT/table.md, print the table and whether the accumulation goals
   hold, and draw three plots: OUT/stages.png (the paper's Figure 3 in miniature),
   OUT/pareto.png (prior-skill average against new-skill accuracy) and OUT/forgetting.png
   (drop in prior-skill accuracy against kl_from_base, after the first stage).

The training runs are the scripts themselves, started as subprocesses: the benchmark only
orchestrates them and reads their OUT/metrics.jsonl, so there is one implementation of each
method. Simplified relative to the paper: one toy model, string skills, one rollout per query.
"""

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from data import NEW_SKILLS, PRIOR_SKILLS, SEQUENCE, Tokenizer, parse_skills, world_signature
from eval import evaluate
from runner import (BASE_SETTINGS, LR, check_base, clock, every, flags, mean_sd, pretrain_base,
                        run_script)
from model import load_checkpoint


# -----------------------------------------------------------------------------
# arguments

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", default=None, help="directory for results.json, table.md, the plots "
                    "and the runs (default: runs/benchmark, or runs/benchmark-quick with --quick)")
parser.add_argument("--base", default=None, help="base checkpoint (default: results/base/ckpt.pt, "
                    "the shipped one; runs/benchmark-quick/base/ckpt.pt with --quick)")
parser.add_argument("--pretrain", action="store_true", help="pretrain the base first, where --base "
                    "holds none (a base made with the same settings for the same world is reused; "
                    "any other is never replaced)")
parser.add_argument("--seeds", default="0",
                    help="comma-separated fine-tuning seeds (the base is pretrained once, seed 0)")
parser.add_argument("--demo-style", default="expert", choices=["expert", "own"],
                    help="style of the demonstrations")
parser.add_argument("--skills", default=",".join(SEQUENCE),
                    help="new skills to learn in this order, comma-separated")
parser.add_argument("--orders", default="given", choices=["given", "all"],
                    help="the order of --skills only, or every order of them")
parser.add_argument("--lr-sft", default=str(LR["sft"]),
                    help="peak learning rate of SFT; a comma-separated list gives a sweep")
parser.add_argument("--lr-sdft", default=str(LR["sdft"]),
                    help="peak learning rate of SDFT; a comma-separated list gives a sweep")
parser.add_argument("--steps", type=int, default=300, help="step budget per skill")
parser.add_argument("--eval-n", type=int, default=100,
                    help="queries per skill for validation and test accuracy")
parser.add_argument("--stop-at", type=float, default=0.95,
                    help="a stage ends when its skill's validation accuracy reaches this")
parser.add_argument("--p-new", type=float, default=BASE_SETTINGS["p_new"],
                    help="pretraining: how often the base meets each new skill (it knows it on "
                    "40%% of first letters; 0: never, the control in which both methods forget)")
parser.add_argument("--agreed-prefix", action="store_true", help="SDFT counts only the tokens up "
                    "to the first one the teacher would not write (lab/variants.py; not in the "
                    "paper: results/NOTES.md)")
parser.add_argument("--jobs", type=int, default=2, help="training runs side by side; each uses one "
                    "thread, so the results do not depend on this")
parser.add_argument("--base-seeds", default=None, help="instead of fine-tuning: the base recipe "
                    "under each of these pretraining seeds (seed 0: --base; others: "
                    "OUT/runs/base-seedS/ckpt.pt, made where missing), each base's table written "
                    "to OUT/seeds.json (results/base/seeds.json)")
parser.add_argument("--quick", action="store_true",
                    help="a tiny model and budgets: checks the pipeline, shows nothing")
parser.add_argument("--replot", action="store_true", help="no training: the table, summary and "
                    "plots again from OUT/results.json, with its settings (the flags are ignored)")
args = parser.parse_args()
args.out = args.out or ("runs/benchmark-quick" if args.quick else "runs/benchmark")
args.base = args.base or ("runs/benchmark-quick/base/ckpt.pt" if args.quick
                          else "results/base/ckpt.pt")


def numbers(text, flag, kind):
    try:
        values = [kind(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got '{text}'") from None
    if not values or (kind is float and any(not v > 0 for v in values)):
        raise ValueError(f"{flag} must list at least one "
                         f"{'positive number' if kind is float else 'seed'}, got '{text}'")
    return values


try:
    seeds = numbers(args.seeds, "--seeds", int)
    base_seeds = numbers(args.base_seeds, "--base-seeds", int) if args.base_seeds else []
    lrs = {"sft": numbers(args.lr_sft, "--lr-sft", float),
           "sdft": numbers(args.lr_sdft, "--lr-sdft", float)}
    if args.steps <= 0 or args.eval_n <= 0 or args.jobs <= 0:
        raise ValueError("--steps, --eval-n and --jobs must be positive")
    if not 0 < args.stop_at <= 1:
        raise ValueError(f"--stop-at must be in (0, 1], got {args.stop_at}")
    if not 0 <= args.p_new * len(NEW_SKILLS) <= 1:  # a share per new skill, as in train_sft.py
        raise ValueError(f"--p-new must be in [0, 1/{len(NEW_SKILLS)}] (one share per new skill), "
                         f"got {args.p_new}")
    skills = parse_skills(args.skills)
    if not set(skills) <= set(NEW_SKILLS) or len(set(skills)) < len(skills):
        raise ValueError(f"--skills must name distinct new skills ({', '.join(NEW_SKILLS)}), "
                         f"got '{args.skills}'")
    os.makedirs(args.out, exist_ok=True)
    # fail now, not after the runs, if the results cannot be written
    with tempfile.TemporaryFile(dir=args.out):
        pass
except ValueError as e:
    sys.exit(f"error: {e}")
except OSError as e:
    sys.exit(f"error: cannot write to --out {args.out} ({e.strerror})")
if args.replot:  # a finished benchmark: its own settings, not the flags
    try:
        with open(os.path.join(args.out, "results.json")) as f:
            results = json.load(f)
    except (OSError, ValueError):
        sys.exit(f"error: --replot needs a readable results.json in --out {args.out}")
    config = results["config"]
    skills, seeds, lrs = config["skills"], config["seeds"], config["lrs"]
    args.demo_style, args.agreed_prefix = config["demo_style"], config["agreed_prefix"]

# pretraining settings: a base is used only when they, and the world, match
PRETRAIN = BASE_SETTINGS | {"p_new": args.p_new}
FINETUNE = {"steps": args.steps, "eval_n": args.eval_n, "stop_at": args.stop_at}
if args.quick:
    PRETRAIN |= {"steps": 200, "n_layer": 1, "n_head": 2, "n_embd": 32}
    FINETUNE |= {"steps": 6, "eval_n": 8, "eval_every": 3}
prior, new = list(PRIOR_SKILLS), list(NEW_SKILLS)
# each method's command; --agreed-prefix runs SDFT's through lab/variants.py, with the variant
SCRIPTS = {"sft": ["train_sft.py"], "sdft": (["lab/variants.py", "train_sdft.py", "--agreed-prefix"]
                                           if args.agreed_prefix else ["train_sdft.py"])}
NAMES = {"sft": "SFT", "sdft": "SDFT (agreed prefix)" if args.agreed_prefix else "SDFT"}
if args.replot:
    orders = config["orders"]
else:
    orders = [list(o) for o in itertools.permutations(skills)] if args.orders == "all" else [skills]
device = torch.device("cpu")  # evaluation of the base here; the scripts pick their own device
tok = Tokenizer()
t_start = time.time()


def base_table(path, seed):
    """One base's record for seeds.json: every new skill sampled at temperature 1 (as SDFT's
    rollouts, seeded), every skill greedily, and every skill with a demonstration of each
    style."""
    model, _ = load_checkpoint(path, device)
    torch.manual_seed(0)
    return {"seed": seed, "sampled": evaluate(model, tok, new, device, n=200, temperature=1.0),
            "greedy": evaluate(model, tok, prior + new, device, n=200),
            "with_demo": {style: evaluate(model, tok, prior + new, device, n=200, demo_style=style)
                          for style in ("own", "expert")}}


if base_seeds:  # where the base recipe starts, for each pretraining seed; then stop
    records = []
    for seed in base_seeds:
        path = (args.base if seed == BASE_SETTINGS["seed"]
                else os.path.join(args.out, "runs", f"base-seed{seed}", "ckpt.pt"))
        settings = PRETRAIN | {"seed": seed}
        try:
            why_not = check_base(load_checkpoint(path)[1], settings)
        except ValueError:  # none there yet: make it
            print(f"pretraining seed {seed} into {path} (~7 min)", flush=True)
            pretrain_base(path, settings, on_line=every(prefix="  "))
            why_not = None
        if why_not:
            sys.exit(f"error: {path} is not the base recipe under seed {seed}: {why_not}")
        records.append(base_table(path, seed))
        r = records[-1]
        print(f"seed {seed}: sampled " + " ".join(f"{k} {v:.2f}" for k, v in r["sampled"].items())
              + f"; prior greedy min {min(r['greedy'][k] for k in prior):.2f}; "
                "with a demonstration min "
              + f"{min(min(r['with_demo'][st].values()) for st in r['with_demo']):.2f}", flush=True)
    with open(os.path.join(args.out, "seeds.json"), "w") as f:
        json.dump(records, f, indent=1)
    sys.exit(0)

if args.replot:  # a finished benchmark's records: only the table, summary and plots again
    base, runs = results["base"], results["runs"]
else:
    # -----------------------------------------------------------------------------
    # 1. the base model

    base_ckpt = args.base
    try:
        _, ckpt = load_checkpoint(base_ckpt)
    except ValueError:
        ckpt = None
    why_not = check_base(ckpt, PRETRAIN) if ckpt is not None else None
    if why_not:  # never replaced, even with --pretrain
        sys.exit(f"error: {base_ckpt} is not a base for this benchmark: {why_not}; "
                 f"make one with --pretrain and another --base")
    if ckpt is None and os.path.exists(base_ckpt):
        sys.exit(f"error: {base_ckpt} is not a readable checkpoint; move it away, "
                 "or choose another --base")
    if ckpt is None and not (args.pretrain or args.quick):
        sys.exit(f"error: no base model at {base_ckpt}; pass --pretrain to make one "
                 "(~7 min on 2 CPU cores)")
    if ckpt is None:
        print(f"base model: pretraining into {base_ckpt} ({PRETRAIN['steps']} steps)", flush=True)
        last_shown = [0.0]

        def show_pretraining(line):  # one of its step lines every ~15 s
            if time.time() - last_shown[0] > 15 and " step " in line:
                print(f"  {line} | {clock(time.time() - t_start)} elapsed", flush=True)
                last_shown[0] = time.time()

        # it saves weights, settings and world only: a few MB
        pretrain_base(base_ckpt, PRETRAIN, on_line=show_pretraining)
    else:
        print(f"base model: reusing {base_ckpt}, made with these settings for this world",
              flush=True)
    base_model, _ = load_checkpoint(base_ckpt, device)
    n = FINETUNE["eval_n"]
    base = {"accuracy": evaluate(base_model, tok, prior + new, device, n=n),
            "teacher_accuracy": evaluate(base_model, tok, prior + new, device, n=n,
                                         demo_style=args.demo_style)}
    print("base  " + " ".join(f"{s} {base['accuracy'][s]:.2f}" for s in prior + new))
    print("with a demonstration  "
          + " ".join(f"{s} {base['teacher_accuracy'][s]:.2f}" for s in new),
          flush=True)

    # -----------------------------------------------------------------------------
    # 2. both methods, every order, learning rate and seed, from the same base

    jobs = [(order, method, lr, seed) for order in orders for method in ("sft", "sdft")
            for lr in lrs[method] for seed in seeds]
    stages_done, stages_total = 0, len(jobs) * len(skills)
    t_runs, last_shown, lock = time.time(), 0.0, threading.Lock()


    def progress(name, line):
        """Echo each stage summary, and a step line every ~15 s, with the time left for the whole
        benchmark (from the mean time of a stage so far: stages that stop early make it shrink)."""
        global stages_done, last_shown
        with lock:  # --jobs runs report from their own threads
            done = " done: " in line
            stages_done += done
            if not done and (" step " not in line or time.time() - last_shown < 15):
                return
            elapsed, last_shown = time.time() - t_runs, time.time()
            left = (f"~{clock(elapsed / stages_done * (stages_total - stages_done))} to go"
                    if stages_done else "first stage")
            print(f"  [{stages_done}/{stages_total} stages] {name}: {line} | "
                  f"{clock(time.time() - t_start)} elapsed, {left}", flush=True)


    def run(job):
        """One training run of the benchmark; returns its record for results.json."""
        order, method, lr, seed = job
        name = (f"{method}-{'-'.join(order)}-{args.demo_style}-seed{seed}-lr{lr:g}"
                + ("-agreed" if "--agreed-prefix" in SCRIPTS[method] else ""))
        run_dir = os.path.join(args.out, "runs", name)
        run_script(*SCRIPTS[method], "--init", base_ckpt, "--skills", ",".join(order),
                   "--seed", str(seed), "--lr", str(lr), "--demo-style", args.demo_style,
                   *flags(FINETUNE), "--out", run_dir,
                   on_line=lambda line: progress(name, line))
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        stages = [{k: r[k] for k in ("skill", "steps", "seconds", "accuracy", "val_accuracy",
                                     "kl_from_base")}
                  for r in records if "accuracy" in r]
        return {"method": method, "order": order, "seed": seed, "demo_style": args.demo_style,
                "lr": lr, "stages": stages}


    print(f"{len(jobs)} training runs, {args.jobs} at a time, into "
          f"{os.path.join(args.out, 'runs')}",
          flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:  # threads only wait on the scripts, which work
        runs = list(pool.map(run, jobs))

    # the records of every run: OUT/results.json
    config = {"skills": skills, "orders": orders, "prior_skills": prior, "new_skills": new,
              "seeds": seeds, "lrs": lrs, "demo_style": args.demo_style,
              "agreed_prefix": args.agreed_prefix, "quick": args.quick, "base": base_ckpt,
              "world": world_signature(), "pretrain": PRETRAIN, "finetune": FINETUNE}
    results = {"config": config, "base": base, "runs": runs}
    tmp = os.path.join(args.out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, os.path.join(args.out, "results.json"))  # never a half-written results.json

# -----------------------------------------------------------------------------
# 3. results, table, goals, plots



def prior_avg(accuracy):
    return sum(accuracy[s] for s in prior) / len(prior)


def worst_prior(accuracies):
    """The prior skill lowest on average over these accuracy records, and that average: an
    average over seven skills can hide one that is lost."""
    skill = min(prior, key=lambda k: statistics.mean(a[k] for a in accuracies))
    return f"{skill} {statistics.mean(a[skill] for a in accuracies):.2f}"


def group(order, method, lr):
    return [r for r in runs if r["order"] == order and r["method"] == method and r["lr"] == lr]


# the table, as markdown (OUT/table.md, copied into the READMEs): mean ± sd over seeds
rows = [f"| order | method | lr | stage | steps | {' | '.join(new)} | "
        "prior average | worst prior skill | kl_from_base |",
        "|" + "---|" * (len(new) + 8),
        "| - | base | - | - | - | " + " | ".join(f"{base['accuracy'][s]:.2f}" for s in new)
        + f" | {prior_avg(base['accuracy']):.2f} | {worst_prior([base['accuracy']])} | 0 |"]
for order in orders:
    for method in ("sft", "sdft"):
        for lr in lrs[method]:
            for i, skill in enumerate(order):
                at = [r["stages"][i] for r in group(order, method, lr)]
                rows.append(f"| {','.join(order)} | {NAMES[method]} | {lr:g} | {i + 1}: {skill} "
                            f"| {statistics.mean(s['steps'] for s in at):.0f} | "
                            + " | ".join(mean_sd([s["accuracy"][k] for s in at]) for k in new)
                            + f" | {mean_sd([prior_avg(s['accuracy']) for s in at])} "
                              f"| {worst_prior([s['accuracy'] for s in at])} "
                              f"| {mean_sd([s['kl_from_base'] for s in at])} |")
with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write("\n".join(rows) + "\n")
print(f"\naccuracy after each stage, mean ± sd over seeds {seeds} "
      f"({args.demo_style} demonstrations)")
print("\n".join(rows))

# the accumulation goals, after the last stage of every run (printed, and in OUT/summary.txt);
# the rate each method chooses, on validation queries only (test queries are only for the tables)
summary = ["after the last stage (goals: every learned skill >= 0.9, prior average >= 0.9 of the "
           "base's):"]
chosen = {}  # each method's rate: the one given, or the sweep's best on validation
for method in ("sft", "sdft"):
    for lr in lrs[method]:
        last = [r["stages"][-1] for r in runs if r["method"] == method and r["lr"] == lr]
        worst_new = [min(s["accuracy"][k] for k in skills) for s in last]
        mean_new = statistics.mean(s["accuracy"][k] for s in last for k in skills)
        # max(..., 1e-9): a --quick base knows nothing
        kept = [prior_avg(s["accuracy"]) / max(prior_avg(base["accuracy"]), 1e-9) for s in last]
        kls = [s["kl_from_base"] for s in last]
        low = min(((k, s["accuracy"][k]) for s in last for k in prior), key=lambda t: t[1])
        summary.append(f"  {NAMES[method]} lr {lr:g}: every learned skill >= 0.9 in "
                       f"{sum(w >= 0.9 for w in worst_new)}/{len(last)} runs (worst "
                       f"{min(worst_new):.2f}, mean {mean_new:.2f}); prior average >= 0.9 of the "
                       f"base's in {sum(k >= 0.9 for k in kept)}/{len(last)} (worst "
                       f"{min(kept):.2f}, mean {statistics.mean(kept):.2f}); worst single prior "
                       f"skill in any run {low[0]} {low[1]:.2f}; kl_from_base "
                       f"{min(kls):.2f}-{max(kls):.2f}")
    score = {lr: statistics.mean(r["stages"][-1]["val_accuracy"][k] for r in runs
                                 if r["method"] == method and r["lr"] == lr for k in r["order"])
             for lr in lrs[method]}
    chosen[method] = max(score, key=score.get)
    if len(lrs[method]) > 1:
        summary.append(f"  {NAMES[method]}: rate chosen on validation (best mean validation "
                       f"accuracy of the new skills after the last stage): {chosen[method]:g} "
                       f"({', '.join(f'{lr:g}: {v:.3f}' for lr, v in score.items())})")
print("\n" + "\n".join(summary))
with open(os.path.join(args.out, "summary.txt"), "w") as f:
    f.write("\n".join(summary) + "\n")

import matplotlib  # noqa: E402  (imported late: only the plots need it)

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"sft": "tab:red", "sdft": "tab:blue"}

# (1) Figure 3 in miniature: each new skill and the prior average across stages, per method
# (the first order, each method at its chosen rate)
fig, axes = plt.subplots(1, 2, figsize=(11.5, 4), sharey=True)
for ax, method in zip(axes, ("sft", "sdft")):
    runs_here = group(orders[0], method, chosen[method])
    x = range(len(skills) + 1)
    for k in orders[0] + ["prior average"]:
        ys = [[base["accuracy"][k] if k != "prior average" else prior_avg(base["accuracy"])]
              + [s["accuracy"][k] if k != "prior average" else prior_avg(s["accuracy"])
                 for s in r["stages"]]
              for r in runs_here]
        ax.plot(x, [statistics.mean(col) for col in zip(*ys)], marker="o", label=k,
                linestyle="--" if k == "prior average" else "-")
    ax.set_xticks(list(x), ["base"] + [f"after {s}" for s in orders[0]])
    ax.set_xlabel("stage")
    ax.set_title(f"{NAMES[method]} (lr {chosen[method]:g}, {args.demo_style}, "
                 f"mean of {len(runs_here)} seeds)")
    ax.set_ylim(-0.05, 1.05)
axes[0].set_ylabel("test accuracy")
axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5))  # beside the data, not on it
fig.tight_layout()
fig.savefig(os.path.join(args.out, "stages.png"), dpi=120)

# (2) Pareto view after the first stage: prior average against the new skill, per method and lr
fig, ax = plt.subplots(figsize=(5.5, 4.5))
for method in ("sft", "sdft"):
    for i, lr in enumerate(lrs[method]):
        first = [r["stages"][0] for r in group(orders[0], method, lr)]
        xy = (statistics.mean(s["accuracy"][orders[0][0]] for s in first),
              statistics.mean(prior_avg(s["accuracy"]) for s in first))
        ax.scatter(*xy, color=COLORS[method], label=NAMES[method] if i == 0 else None)
        # each rate's label beside its point: SFT's on the left, SDFT's on the right, alternately
        # above and below
        ax.annotate(f"{lr:g}", xy, xytext=(-6 if method == "sft" else 6, 6 if i % 2 else -12),
                    textcoords="offset points", fontsize=8, color=COLORS[method],
                    ha="right" if method == "sft" else "left")
ax.set_xlabel(f"new skill accuracy ({orders[0][0]}, after stage 1)")
ax.set_ylabel("prior-skill average")
ax.set_title("after the first stage, by learning rate")
ax.set_xlim(-0.05, 1.1)
ax.set_ylim(-0.05, 1.1)
ax.legend(loc="center left")
fig.tight_layout()
fig.savefig(os.path.join(args.out, "pareto.png"), dpi=120)

# (3) the forgetting law in miniature, after the first stage, where both axes are measured from
# the base after learning one skill: the prior-skill drop against how far the model moved on that
# skill (later stages would pair a cumulative drop with one skill's KL; lab/studies.py law fits it)
fig, ax = plt.subplots(figsize=(5.5, 4.5))
for method in ("sft", "sdft"):
    points = [(r["stages"][0]["kl_from_base"],
               prior_avg(base["accuracy"]) - prior_avg(r["stages"][0]["accuracy"]))
              for r in runs if r["method"] == method]
    ax.scatter(*zip(*points), color=COLORS[method], label=NAMES[method], alpha=0.7)
ax.set_xlabel("KL(model || base) on the first skill's answers (nats/token)")
ax.set_ylabel("drop in prior-skill average, after stage 1")
ax.set_title("forgetting against distance from the base")
ax.legend(loc="center right")
fig.tight_layout()
fig.savefig(os.path.join(args.out, "forgetting.png"), dpi=120)
plt.close("all")

print(f"\nin {args.out}: results.json, table.md, summary.txt and stages.png, pareto.png, "
      f"forgetting.png; total time {clock(time.time() - t_start)}")
