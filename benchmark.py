"""
The sequential-skill benchmark: the paper's claims in miniature, in one command.

    python benchmark.py                                        # one seed, both methods: ~6 min on 2 CPU cores
    python benchmark.py --seeds 0,1,2 --lr 3e-5,1e-5,1e-4      # the headline: seeds and a learning-rate sweep
    python benchmark.py --quick                                # a tiny run, for smoke tests and demos (~15 s)

1. Pretrain the base model with train_sft.py --pretrain (or reuse the --base checkpoint when
   it was made with the same pretraining settings), and evaluate it: every skill plainly, and
   with a demonstration in context (the teacher's accuracy).
   (--base sets where; a cached base is shared by every --out.)
2. For each learning rate, seed and method (SFT, SDFT): learn the new skills in sequence from
   that one base, with train_sft.py / train_sdft.py, the same queries, demonstrations,
   budgets and stopping rule; every skill is evaluated after every stage.
3. Write OUT/results.json, print a table, and draw three plots: OUT/stages.png (the paper's
   Figure 3 in miniature), OUT/pareto.png (prior-skill average against new-skill accuracy)
   and OUT/forgetting.png (drop in prior-skill accuracy against kl_from_base).

The training runs are the scripts themselves, started as subprocesses: the benchmark only
orchestrates them and reads their OUT/metrics.jsonl, so there is one implementation of each
method. Simplified relative to the paper: one toy model, string skills, one rollout per query.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from data import NEW_SKILLS, PRIOR_SKILLS, Tokenizer, parse_skills
from eval import evaluate
from model import load_checkpoint

# -----------------------------------------------------------------------------
# arguments

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", default=None, help="directory for results.json, the plots and the runs (default: results, "
                    "or runs/benchmark-quick with --quick)")
parser.add_argument("--base", default=None, help="base checkpoint, made here if missing or made with other settings "
                    "(default: runs/benchmark-base[-quick]-pnewP/ckpt.pt)")
parser.add_argument("--seeds", default="0", help="comma-separated fine-tuning seeds (the base model is pretrained once, seed 0)")
parser.add_argument("--demo-style", default="expert", choices=["expert", "own"], help="style of the demonstrations")
parser.add_argument("--skills", default=",".join(NEW_SKILLS), help="new skills to learn in this order, comma-separated")
parser.add_argument("--lr", default="1e-4", help="peak learning rate of both methods; a comma-separated list gives a sweep")
parser.add_argument("--steps", type=int, default=300, help="step budget per skill")
parser.add_argument("--eval-n", type=int, default=100, help="queries per skill for validation and test accuracy")
parser.add_argument("--p-new", type=float, default=0.3, help="how often the base meets a new skill in pretraining, "
                    "plainly and answered right 40%% of the time (0: never; the control in which both methods forget)")
parser.add_argument("--quick", action="store_true", help="a tiny model and budgets: checks the pipeline, shows nothing")
args = parser.parse_args()
args.out = args.out or ("runs/benchmark-quick" if args.quick else "results")
args.base = args.base or f"runs/benchmark-base{'-quick' if args.quick else ''}-pnew{args.p_new:g}/ckpt.pt"

try:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    lrs = [float(s) for s in args.lr.split(",") if s.strip()]
    if not seeds:
        raise ValueError("--seeds is empty: give at least one seed, e.g. --seeds 0,1,2")
    if not lrs or any(not lr > 0 for lr in lrs):
        raise ValueError(f"--lr must be a comma-separated list of positive numbers, got '{args.lr}'")
    if args.steps <= 0 or args.eval_n <= 0:
        raise ValueError("--steps and --eval-n must be positive")
    if not 0 <= args.p_new <= 1:
        raise ValueError(f"--p-new must be in [0, 1], got {args.p_new}")
    skills = parse_skills(args.skills)
    os.makedirs(args.out, exist_ok=True)
    probe = os.path.join(args.out, ".write-test")
    with open(probe, "w"):  # fail now, not after the runs, if the results cannot be written
        pass
    os.remove(probe)
except ValueError as e:  # int() and float() say "invalid literal": name the flag instead
    sys.exit(f"error: {e}" if "--" in str(e) or "skill" in str(e) else f"error: --seeds and --lr must be comma-separated numbers ({e})")
except OSError as e:
    sys.exit(f"error: cannot write to --out {args.out} ({e.strerror})")

# pretraining settings: the cached base model is reused only when they match
PRETRAIN = {"steps": 5000, "n_layer": 4, "n_head": 4, "n_embd": 128, "seed": 0, "p_new": args.p_new, "p_right": 0.4}
FINETUNE = {"steps": args.steps, "eval_n": args.eval_n}
if args.quick:
    PRETRAIN |= {"steps": 200, "n_layer": 1, "n_head": 2, "n_embd": 32}
    FINETUNE = {"steps": 6, "eval_n": 8, "eval_every": 3}
prior, new = list(PRIOR_SKILLS), list(NEW_SKILLS)
device = torch.device("cpu")  # evaluation of the base here; the scripts pick their own device
tok = Tokenizer()
t_start = time.time()


def flags(settings):
    return [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]


def run_script(script, *script_args, on_stage=None):
    """Run a training script to the end, echoing nothing but its stage summaries (through
    on_stage). Exits with the script's own error line if it fails."""
    proc = subprocess.Popen([sys.executable, script, *script_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    for line in proc.stdout:
        if " done: " in line and on_stage:
            on_stage(line.strip())
    stderr = proc.stderr.read()
    if proc.wait() != 0:
        sys.exit(stderr.strip().splitlines()[-1] if stderr.strip() else f"error: {script} failed")


# -----------------------------------------------------------------------------
# 1. the base model

base_ckpt = args.base
try:
    _, ckpt = load_checkpoint(base_ckpt)
    # same settings, and finished: a pretraining run that was stopped leaves a mid-stage checkpoint
    cached = all(ckpt["args"].get(k) == v for k, v in PRETRAIN.items()) and ckpt["args"].get("pretrain") \
        and ckpt.get("stage_done")
except ValueError:
    cached = False
if cached:
    print(f"base model: reusing {base_ckpt}")
else:
    print(f"base model: pretraining into {base_ckpt} ({PRETRAIN['steps']} steps)")
    run_script("train_sft.py", "--pretrain", *flags(PRETRAIN), "--out", os.path.dirname(base_ckpt),
               on_stage=lambda line: print(f"  {line} | {time.time() - t_start:.0f}s elapsed"))
base_model, _ = load_checkpoint(base_ckpt, device)
n = FINETUNE["eval_n"]
base = {"accuracy": evaluate(base_model, tok, prior + new, device, n=n),
        "teacher_accuracy": evaluate(base_model, tok, prior + new, device, n=n, demo_style=args.demo_style)}
print("base  " + " ".join(f"{s} {base['accuracy'][s]:.2f}" for s in prior + new))
print("with a demonstration  " + " ".join(f"{s} {base['teacher_accuracy'][s]:.2f}" for s in new))

# -----------------------------------------------------------------------------
# 2. both methods, every seed and learning rate, from the same base

jobs = [(method, seed, lr) for lr in lrs for seed in seeds for method in ("sft", "sdft")]
stages_done, stages_total = 0, len(jobs) * len(skills)
t_runs = time.time()


def progress(line):
    global stages_done
    stages_done += 1
    elapsed = time.time() - t_runs
    eta = elapsed / stages_done * (stages_total - stages_done)
    print(f"  [{stages_done}/{stages_total}] {line} | {time.time() - t_start:.0f}s elapsed, ~{eta:.0f}s to go", flush=True)


runs = []
for method, seed, lr in jobs:
    run_dir = os.path.join(args.out, "runs", f"{method}-{args.demo_style}-seed{seed}-lr{lr:g}")
    print(f"{method} seed {seed} lr {lr:g} -> {run_dir}")
    run_script(f"train_{method}.py", "--init", base_ckpt, "--skills", ",".join(skills), "--seed", str(seed),
               "--lr", str(lr), "--demo-style", args.demo_style, *flags(FINETUNE), "--out", run_dir, on_stage=progress)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    stages = [{k: r[k] for k in ("skill", "steps", "seconds", "accuracy", "kl_from_base")}
              for r in records if "accuracy" in r]
    runs.append({"method": method, "seed": seed, "demo_style": args.demo_style, "lr": lr, "stages": stages})

# -----------------------------------------------------------------------------
# 3. results, table, plots

config = {"skills": skills, "prior_skills": prior, "new_skills": new, "seeds": seeds, "lrs": lrs,
          "demo_style": args.demo_style, "quick": args.quick, "pretrain": PRETRAIN, "finetune": FINETUNE}
results = {"config": config, "base": base, "runs": runs}
tmp = os.path.join(args.out, "results.json.tmp")
with open(tmp, "w") as f:
    json.dump(results, f, indent=1)
os.replace(tmp, os.path.join(args.out, "results.json"))  # never a half-written results.json


def prior_avg(accuracy):
    return sum(accuracy[s] for s in prior) / len(prior)


def mean_sd(values):
    return f"{statistics.mean(values):.2f}" + (f"±{statistics.stdev(values):.2f}" if len(values) > 1 else "")


print(f"\naccuracy after each stage, mean±sd over seeds {seeds} ({args.demo_style} demonstrations); "
      f"base prior average {prior_avg(base['accuracy']):.2f}")
print(f"{'method':6s} {'lr':>7s} {'stage':10s} {'steps':>6s} " + " ".join(f"{s:>10s}" for s in skills)
      + f" {'prior avg':>10s} {'kl_base':>10s}")
for lr in lrs:
    for method in ("sft", "sdft"):
        group = [r for r in runs if r["method"] == method and r["lr"] == lr]
        for i, skill in enumerate(skills):
            at = [r["stages"][i] for r in group]
            print(f"{method:6s} {lr:7.0e} {f'{i + 1}:{skill}':10s} {statistics.mean(s['steps'] for s in at):6.0f} "
                  + " ".join(f"{mean_sd([s['accuracy'][k] for s in at]):>10s}" for k in skills)
                  + f" {mean_sd([prior_avg(s['accuracy']) for s in at]):>10s}"
                  + f" {mean_sd([s['kl_from_base'] for s in at]):>10s}")

import matplotlib  # noqa: E402  (imported late: only the plots need it)

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"sft": "tab:red", "sdft": "tab:blue"}

# (1) Figure 3 in miniature: each new skill and the prior average across stages, per method (first lr)
fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
for ax, method in zip(axes, ("sft", "sdft")):
    group = [r for r in runs if r["method"] == method and r["lr"] == lrs[0]]
    x = range(len(skills) + 1)
    for k in skills + ["prior average"]:
        ys = [[base["accuracy"][k] if k != "prior average" else prior_avg(base["accuracy"])]
              + [s["accuracy"][k] if k != "prior average" else prior_avg(s["accuracy"]) for s in r["stages"]]
              for r in group]
        ax.plot(x, [statistics.mean(col) for col in zip(*ys)], marker="o", label=k,
                linestyle="--" if k == "prior average" else "-")
    ax.set_xticks(list(x), ["base"] + [f"after {s}" for s in skills])
    ax.set_title(f"{method.upper()} (lr {lrs[0]:g}, {args.demo_style}, {len(group)} seeds)")
    ax.set_ylim(-0.05, 1.05)
axes[0].set_ylabel("test accuracy")
axes[1].legend(loc="center right")
fig.tight_layout()
fig.savefig(os.path.join(args.out, "stages.png"), dpi=120)

# (2) Pareto view after the first stage: prior average against the new skill, per method and lr
fig, ax = plt.subplots(figsize=(5, 4))
for method in ("sft", "sdft"):
    for lr in lrs:
        first = [r["stages"][0] for r in runs if r["method"] == method and r["lr"] == lr]
        xy = (statistics.mean(s["accuracy"][skills[0]] for s in first),
              statistics.mean(prior_avg(s["accuracy"]) for s in first))
        ax.scatter(*xy, color=COLORS[method])
        ax.annotate(f"{method} {lr:g}", xy, fontsize=8)
ax.set_xlabel(f"new skill accuracy ({skills[0]}, after stage 1)")
ax.set_ylabel("prior-skill average")
ax.set_xlim(-0.05, 1.05)
ax.set_ylim(-0.05, 1.05)
fig.tight_layout()
fig.savefig(os.path.join(args.out, "pareto.png"), dpi=120)

# (3) the forgetting law in miniature: drop in prior accuracy against KL from the base, every stage
fig, ax = plt.subplots(figsize=(5, 4))
for method in ("sft", "sdft"):
    points = [(s["kl_from_base"], prior_avg(base["accuracy"]) - prior_avg(s["accuracy"]))
              for r in runs if r["method"] == method for s in r["stages"]]
    ax.scatter(*zip(*points), color=COLORS[method], label=method.upper(), alpha=0.7)
ax.set_xlabel("kl_from_base on the stage's skill (nats per token)")
ax.set_ylabel("drop in prior-skill average")
ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(args.out, "forgetting.png"), dpi=120)
plt.close("all")

print(f"\nwrote {os.path.join(args.out, 'results.json')} and stages.png, pareto.png, forgetting.png; "
      f"total time {time.time() - t_start:.0f}s")
