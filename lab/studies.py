"""
Why it works: the paper's ablations and baselines, in miniature, one command per study.

    python lab/studies.py onpolicy      # on-policy or the teacher? SDFT, offline distillation, SFT
                                          on teacher samples, SFT (§4.6, Fig. 6)
    python lab/studies.py teacher       # the teacher's weights: EMA, frozen base or the live
                                          student, learning curves (App. A.3, Fig. 8)
    python lab/studies.py divergence    # forward KL, reverse KL, JSD 0.5; skipping 0, 1 or 3
                                          first tokens
    python lab/studies.py baselines     # SFT, DFT, SFT + re-invoke, SDFT (Table 5)
    python lab/studies.py size          # model size: the teacher's in-context accuracy and the
                                          SDFT - SFT gap (Fig. 5 left)
    python lab/studies.py passk         # pass@1..16 of the base, SFT and SDFT (Fig. 5 right)
    python lab/studies.py law           # the forgetting law: the prior-skill drop against
                                          kl_from_base (RL's Razor)
    python lab/studies.py inside        # inside one SDFT step, token by token (also:
                                          eval.py --inspect SKILL)
    python lab/studies.py all           # every study, about 1.5 hours on 2 CPU cores; --quick:
                                          a tiny check of the pipeline

As the paper's ablations each learn one task, every run here learns one new skill from the
shipped base (results/base/ckpt.pt), for each new skill and seed (3 x 3 runs per variant),
with the budget and stopping rule of the benchmark, and is evaluated on every skill at the end.
Each method runs at its tuned rate (runner.LR: SFT's for the cross-entropy losses, SDFT's for the
divergences) unless the variant says otherwise. Each study writes OUT/STUDY/results.json (one
record per run: study, variant, seed, skill, new_accuracy, prior_average, and what the study
measures), OUT/STUDY/table.md and OUT/STUDY/STUDY.png. The runs themselves go to OUT/runs and
are reused by every study that needs the same run (same command from the same base, finished).
"""

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

# the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import NEW_SKILLS, PRIOR_SKILLS, SEQUENCE, Tokenizer, eval_queries, parse_skills
from eval import evaluate, inspect_step, pass_at_k, plot_inspect
from runner import (BASE_SETTINGS, LR, clock, ensure_base, every, flags, mean_sd, run_once,
                        worst_skill)
from model import load_checkpoint

STUDIES = ["onpolicy", "teacher", "divergence", "baselines", "size", "passk", "law", "inside"]
SDFT, SFT = ("train_sdft.py", {"lr": LR["sdft"]}), ("train_sft.py", {"lr": LR["sft"]})
VSDFT = "lab/variants.py train_sdft.py"  # the paper's ablations: flags of lab/variants.py
# the frozen base, shown the demonstration, writes the answers
OFFLINE = {"rollout": "teacher", "teacher": "base"}
VARIANTS = {  # name: (script, flags, label)
    "sdft": (*SDFT, "SDFT"),
    "sft": (*SFT, "SFT"),
    "offline-kl": (VSDFT, SDFT[1] | OFFLINE,
                   "offline distillation (forward KL on the teacher's samples)"),
    "offline-kl-sft-rate": (VSDFT, OFFLINE | {"lr": LR["sft"]},
                            "offline distillation, at SFT's rate"),
    "offline-ce": (VSDFT, SFT[1] | OFFLINE | {"loss": "ce"}, "SFT on the teacher's samples"),
    "offline-ce-sdft-rate": (VSDFT, OFFLINE | {"loss": "ce", "lr": LR["sdft"]},
                             "SFT on the teacher's samples, at SDFT's rate"),
    "teacher-ema": (SDFT[0], SDFT[1] | {"stop_at": 2}, "EMA teacher (the whole budget)"),
    "teacher-base": (SDFT[0], SDFT[1] | {"stop_at": 2, "teacher": "base"},
                     "frozen base teacher (the whole budget)"),
    "teacher-live": (SDFT[0], SDFT[1] | {"stop_at": 2, "teacher": "live"},
                     "live student as teacher (the whole budget)"),
    "teacher-ema-sft-rate": (SDFT[0], {"lr": LR["sft"], "stop_at": 2},
                             "EMA teacher, at SFT's rate"),
    "teacher-base-sft-rate": (SDFT[0], {"lr": LR["sft"], "stop_at": 2, "teacher": "base"},
                              "frozen base teacher, at SFT's rate"),
    "teacher-live-sft-rate": (SDFT[0], {"lr": LR["sft"], "stop_at": 2, "teacher": "live"},
                              "live student as teacher, at SFT's rate"),
    "reverse-kl": (SDFT[0], SDFT[1] | {"alpha": 1}, "reverse KL"),
    "jsd": (SDFT[0], SDFT[1] | {"alpha": 0.5}, "JSD 0.5"),
    "skip1": (SDFT[0], SDFT[1] | {"skip": 1}, "skip the first token"),
    "skip3": (SDFT[0], SDFT[1] | {"skip": 3}, "skip the first 3 tokens"),
    "agreed-prefix": (VSDFT, SDFT[1] | {"agreed_prefix": True},
                      "only the agreed prefix (not in the paper)"),
    "dft": (SFT[0], SFT[1] | {"dft": True}, "DFT"),
    "sft+reinvoke": (None, None, "SFT + re-invoke (two stages; sees prior-skill prompts; "
                                 "kl_from_base: after SFT)"),
}
# The baselines' rate sweeps (Table 5: "each method was tuned"): DFT's rate, and re-invoke's
# (after SFT at SFT's rate), each chosen on validation. The sweep's 3e-4 points are "dft" and
# "sft+reinvoke" themselves, the variants every other study knows.
SWEEP = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3]
SWEPT = {m: {lr: m if lr == LR["sft"] else f"{m}-lr{lr:g}" for lr in SWEEP}  # {rate: variant}
         for m in ("dft", "sft+reinvoke")}
for _lr in SWEEP:
    if _lr != LR["sft"]:
        VARIANTS[SWEPT["dft"][_lr]] = (SFT[0], {"lr": _lr, "dft": True}, f"DFT, lr {_lr:g}")
        VARIANTS[SWEPT["sft+reinvoke"][_lr]] = (None, {"lr": _lr}, f"SFT + re-invoke, lr {_lr:g}")
PAPER = {  # the paper's number for each variant, where it gives one (PAPER.md)
    "onpolicy": {"sdft": "~70", "offline-kl": "~64", "offline-ce": "~62", "sft": "below both"},
    "teacher": {"teacher-ema": "~70", "teacher-base": "~66, stable",
                "teacher-live": "peaks ~52, collapses"},
    "divergence": {"sdft": "forward KL: the paper's results",
                   "reverse-kl": "worse than forward (v2)", "skip3": "the code's setting"},
    "baselines": {"sft": "66.2 / 53.4", "dft": "54.8 / 60.2", "sft+reinvoke": "66.0 / 60.2",
                  "sdft": "70.2 / 64.5"},
}
TITLES = {  # each study's plot
    "onpolicy": "on-policy or the teacher? (the paper's Fig. 6)",
    "teacher": "the teacher's weights: validation accuracy while learning (App. A.3, Fig. 8)",
    "divergence": "the divergence, and the first tokens left out",
    "baselines": "the baselines (the paper's Table 5)",
    "size": "model size: the SDFT - SFT gap follows the teacher (Fig. 5 left)",
    "passk": "pass@k (the paper's Fig. 5 right)",
    "law": "the forgetting law: every run of every single-skill variant",
    "inside": "inside one SDFT step, token by token",
}
STUDY_VARIANTS = {
    "onpolicy": ["sdft", "offline-kl", "offline-kl-sft-rate", "offline-ce", "offline-ce-sdft-rate",
                 "sft"],
    "teacher": ["teacher-ema", "teacher-base", "teacher-live", "teacher-ema-sft-rate",
                "teacher-base-sft-rate", "teacher-live-sft-rate"],
    "divergence": ["sdft", "reverse-kl", "jsd", "skip1", "skip3", "agreed-prefix"],
}
# Re-invoke: steps per prior skill, distilled from the base in turn (7 skills: up to 280 steps), at
# SFT's rate: at SDFT's it restored little (prior average 0.12-0.21 after SFT on a skill, in the
# previous world).
REINVOKE_STEPS, REINVOKE_LR = 40, LR["sft"]
# (n_layer, n_head, n_embd); the last is the shipped base
SIZES = [(2, 2, 32), (4, 4, 64), (4, 4, 128)]

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("study", choices=STUDIES + ["all"], help="which study")
parser.add_argument("--out", default=None, help="directory for each study's results "
                    "(default: results/studies, or runs/studies-quick with --quick)")
parser.add_argument("--seeds", default="0,1,2", help="comma-separated fine-tuning seeds")
parser.add_argument("--skills", default=",".join(SEQUENCE),
                    help="new skills, each learned alone from the base")
parser.add_argument("--jobs", type=int, default=2,
                    help="training runs side by side (one thread each)")
parser.add_argument("--quick", action="store_true",
                    help="tiny models and budgets: checks the pipeline, shows nothing")
args = parser.parse_args()
args.out = args.out or ("runs/studies-quick" if args.quick else "results/studies")
try:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    skills = parse_skills(args.skills)
    if not set(skills) <= set(NEW_SKILLS) or len(set(skills)) < len(skills):
        raise ValueError(f"--skills must name distinct new skills ({', '.join(NEW_SKILLS)}), "
                         f"got '{args.skills}'")
    if not seeds or args.jobs <= 0:
        raise ValueError("--seeds must list at least one seed and --jobs be positive")
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
except ValueError as e:
    sys.exit(f"error: {e}" if "invalid literal" not in str(e)
             else f"error: --seeds must be comma-separated integers, got '{args.seeds}'")
except OSError as e:
    sys.exit(f"error: cannot write to --out {args.out} ({e.strerror})")

FINETUNE = {"steps": 300, "eval_n": 100}
base_settings = BASE_SETTINGS
if args.quick:
    FINETUNE, REINVOKE_STEPS = {"steps": 4, "eval_n": 4, "eval_every": 2}, 2
    base_settings = BASE_SETTINGS | {"steps": 100, "n_layer": 1, "n_head": 2, "n_embd": 32}
    SIZES = [(1, 2, 16), (1, 2, 32)]
    SWEEP = SWEEP[-2:]  # two rates of each baseline's sweep
prior = list(PRIOR_SKILLS)
device = torch.device("cpu")
tok = Tokenizer()
t_start = time.time()
lock = threading.Lock()


def size_name(n_layer, n_embd):
    return f"{n_layer}x{n_embd}"


def base_path(size=None):
    """The base of a size (n_layer, n_head, n_embd); None: the benchmark's base."""
    size = size or (base_settings["n_layer"], base_settings["n_head"], base_settings["n_embd"])
    if not args.quick and size == SIZES[-1]:
        return "results/base/ckpt.pt"
    return os.path.join(args.out, "size" if not args.quick else "bases",
                        f"base-{size_name(size[0], size[2])}.pt")


checked = set()  # the bases checked (or made) so far


def get_base(size=None):
    """The base model's path, pretrained first (with the benchmark's settings at that size) if it
    is not there yet; a checkpoint made otherwise is refused, never replaced."""
    path = base_path(size)
    settings = base_settings | ({"n_layer": size[0], "n_head": size[1], "n_embd": size[2]}
                                if size else {})
    with lock:
        if path in checked:
            return path
        checked.add(path)
        ensure_base(path, settings, on_line=every())
    return path


# -----------------------------------------------------------------------------
# runs: one new skill learned from a base; the run directory is reused when it holds the same
# finished command from the same base

def run(variant, skill, seed, base=None):
    """Train one variant on one skill from the base; returns the stage record of its metrics.jsonl
    (accuracy on every skill, steps, kl_from_base) and the validation curve."""
    base = base or get_base()
    tag = "" if base == get_base() else "-" + os.path.basename(base)[5:-3]  # another size
    name = f"{variant}-{skill}-seed{seed}{tag}"
    out = os.path.join(args.out, "runs", name)
    reinvoke = variant.startswith("sft+reinvoke")
    if reinvoke:  # SFT on the skill, then on-policy distillation from the base on the prior skills
        sft = run("sft", skill, seed, base)
        lr = (VARIANTS[variant][1] or {}).get("lr", REINVOKE_LR)
        command = [*VSDFT.split(), "--init", os.path.join(sft["out"], "ckpt.pt"),
                   "--teacher", "base", "--teacher-ckpt", base, "--teacher-sees", "query",
                   "--skills", ",".join(prior), "--seed", str(seed), "--lr", str(lr),
                   *flags(FINETUNE | {"steps": REINVOKE_STEPS}), "--out", out]
    else:
        script, settings, _ = VARIANTS[variant]
        command = [*script.split(), "--init", base, "--skills", skill, "--seed", str(seed),
                   *flags(FINETUNE | settings), "--out", out]
    run_once(command, out, on_line=lambda line: progress(name, line))
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    stages = [r for r in records if "accuracy" in r]
    result = {"out": out, "accuracy": stages[-1]["accuracy"],
              "val_accuracy": stages[-1]["val_accuracy"],
              "steps": sum(r["steps"] for r in stages),
              "kl_from_base": stages[0]["kl_from_base"],
              "curve": [[r["step"], r["val_acc"]] for r in records
                        if "val_acc" in r and r["stage"] == 0]}
    if reinvoke:
        result["steps"] += sft["steps"]
        # on the skill, after SFT (re-invoke's KLs are on prior skills)
        result["kl_from_base"] = sft["kl_from_base"]
    with lock:
        finished[0] += 1
    return result


finished, last_shown = [0], [0.0]


def progress(name, line):
    """A line every ~15 s from the runs in flight, with the runs finished so far."""
    with lock:
        if time.time() - last_shown[0] > 15 and " step " in line:
            print(f"  [{finished[0]} runs done] {name}: {line} | "
                  f"{clock(time.time() - t_start)} elapsed", flush=True)
            last_shown[0] = time.time()


def prior_avg(accuracy):
    return sum(accuracy[s] for s in prior) / len(prior)


def record(study, variant, skill, seed, result, base_acc, **extra):
    return {"study": study, "variant": variant, "seed": seed, "skill": skill,
            "new_accuracy": {skill: result["accuracy"][skill]},
            "prior_average": prior_avg(result["accuracy"]),
            "prior_drop": prior_avg(base_acc) - prior_avg(result["accuracy"]),
            "kl_from_base": result["kl_from_base"],
            "steps": result["steps"], "accuracy": result["accuracy"],
            "val_accuracy": result["val_accuracy"],
            "curve": result["curve"], **extra}


def run_all(study, variants, base=None, **extra):
    """Every variant on every skill and seed, --jobs at a time; one record per run."""
    base = base or get_base()
    base_acc = base_accuracy(base)
    jobs = [(v, s, seed) for v in variants for s in skills for seed in seeds]
    print(f"{study}: {len(jobs)} runs ({', '.join(variants)}) from {base}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        # re-invoke's SFT runs first, each once, so that no two threads make the same run
        sft_first = sorted({(s, seed) for v, s, seed in jobs if v.startswith("sft+reinvoke")})
        list(pool.map(lambda job: run("sft", *job, base), sft_first))
        results = list(pool.map(lambda job: run(*job, base), jobs))
    return [record(study, v, s, seed, r, base_acc, **extra)
            for (v, s, seed), r in zip(jobs, results)]


_base_acc = {}


def base_accuracy(base):
    if base not in _base_acc:
        model = load_checkpoint(base, device)[0]
        _base_acc[base] = evaluate(model, tok, prior + list(NEW_SKILLS), device,
                                   n=FINETUNE["eval_n"])
    return _base_acc[base]


# -----------------------------------------------------------------------------
# tables and plots

def worst_prior(rs):
    """The prior skill lowest on average over these runs, and that average ('flip 0.85')."""
    skill, accuracy = worst_skill([r["accuracy"] for r in rs], prior)
    return f"{skill} {accuracy:.2f}"


def variant_table(study, records, variants, extra_columns=()):
    """| variant | each skill | new mean | prior average | worst prior skill | kl_from_base |
    steps | paper |, mean ± sd over seeds."""
    rows = [f"| variant | {' | '.join(skills)} | new, mean | prior average "
            "| worst prior skill | kl_from_base | steps |"
            + "".join(f" {c} |" for c, _ in extra_columns) + " paper |",
            "|" + "---|" * (len(skills) + 7 + len(extra_columns))]
    for v in variants:
        rs = [r for r in records if r["variant"] == v]
        per_skill = [mean_sd([r["new_accuracy"][s] for r in rs if r["skill"] == s]) for s in skills]
        rows.append(f"| {VARIANTS[v][2]} | {' | '.join(per_skill)} "
                    f"| {mean_sd([list(r['new_accuracy'].values())[0] for r in rs])} "
                    f"| {mean_sd([r['prior_average'] for r in rs])} | {worst_prior(rs)} "
                    f"| {mean_sd([r['kl_from_base'] for r in rs])} "
                    f"| {statistics.mean(r['steps'] for r in rs):.0f} |"
                    + "".join(f" {fn(rs)} |" for _, fn in extra_columns)
                    + f" {PAPER.get(study, {}).get(v.split('-lr')[0], '')} |")
    return rows


def bars(ax, records, variants):
    """Per variant, two bars: the new skill's accuracy and the prior-skill average after learning
    it, mean and sd over every skill and seed."""
    for i, v in enumerate(reversed(variants)):
        rs = [r for r in records if r["variant"] == v]
        for j, (values, color, label) in enumerate(
                ((list(list(r["new_accuracy"].values())[0] for r in rs), "tab:green", "new skill"),
                 ([r["prior_average"] for r in rs], "tab:blue", "prior-skill average"))):
            ax.barh(i + 0.2 - 0.4 * j, statistics.mean(values), height=0.4, color=color,
                    label=label if i == 0 else None,
                    xerr=statistics.stdev(values) if len(values) > 1 else None)
    ax.set_yticks(range(len(variants)), [VARIANTS[v][2] for v in reversed(variants)], fontsize=8)
    ax.set_xlabel("accuracy after one new skill (mean ± sd, "
                  f"{len(skills)} skills x {len(seeds)} seeds)")
    ax.set_xlim(0, 1.05)
    # above the bars
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)


def write(study, records, rows, draw, config=None):
    out = os.path.join(args.out, study)
    os.makedirs(out, exist_ok=True)
    results = {"config": {"skills": skills, "seeds": seeds, "finetune": FINETUNE, "lr": LR,
                          "quick": args.quick, "base": get_base(), **(config or {})},
               "runs": records}
    with open(os.path.join(out, "results.json.tmp"), "w") as f:
        json.dump(results, f, indent=1)
    os.replace(os.path.join(out, "results.json.tmp"), os.path.join(out, "results.json"))
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(rows) + "\n")
    import matplotlib  # imported late: only the plots need it

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    fig = draw(plt)
    fig.suptitle(TITLES[study], fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{study}.png"), dpi=120)
    plt.close("all")
    print(f"\n{study}\n" + "\n".join(rows) + f"\nwrote {out}/results.json, table.md, {study}.png "
          f"({clock(time.time() - t_start)} elapsed)\n", flush=True)


# -----------------------------------------------------------------------------
# the studies

def variant_study(study):
    """onpolicy, divergence, baselines: a table next to the paper's numbers and a Pareto plot."""
    variants = STUDY_VARIANTS[study]
    records = run_all(study, variants)

    def draw(plt):
        fig, ax = plt.subplots(figsize=(8, 1 + 0.6 * len(variants)))
        bars(ax, records, variants)
        return fig
    write(study, records, variant_table(study, records, variants), draw)
    return records


def baselines_study():
    """Table 5: SFT, DFT, SFT + re-invoke and SDFT. DFT and re-invoke each at the rate of its sweep
    with the best validation accuracy of the new skill at the end (mean over skills and seeds; a
    tie: the lower rate), as the paper reports each method's best validation score; then every
    rate of both sweeps."""
    swept = [SWEPT[m][lr] for m in SWEPT for lr in SWEEP]
    records = run_all("baselines", ["sft", "sdft"] + swept)
    score = {v: statistics.mean(r["val_accuracy"][r["skill"]] for r in records if r["variant"] == v)
             for v in swept}
    chosen = {m: max((SWEPT[m][lr] for lr in SWEEP), key=score.get) for m in SWEPT}  # the first
    main = ["sft", chosen["dft"], chosen["sft+reinvoke"], "sdft"]
    rows = variant_table("baselines", records, main)
    rows += ["", "Every rate of each sweep (val: the new skill's validation accuracy at the end, "
             "which chooses the rate):", ""]
    rate = {v: lr for m in SWEPT for lr, v in SWEPT[m].items()}
    rows += variant_table("baselines", records, swept,
                          [("lr", lambda rs: f"{rate[rs[0]['variant']]:g}"),
                           ("val", lambda rs: f"{score[rs[0]['variant']]:.3f}")])

    def draw(plt):
        fig, ax = plt.subplots(figsize=(8, 1 + 0.6 * len(main)))
        bars(ax, records, main)
        return fig
    write("baselines", records, rows, draw,
          {"sweep": SWEEP, "chosen": chosen, "val_scores": score})
    return records


def teacher_study():
    """EMA, frozen base or live teacher, each run for the whole budget, never stopped (the paper's
    Fig. 8 runs on past its peak): validation accuracy over steps."""
    variants = STUDY_VARIANTS["teacher"]
    records = run_all("teacher", variants)
    # does the trained model still read a demonstration (what a live or EMA teacher relies on)?
    for r in records:
        model = load_checkpoint(os.path.join(args.out, "runs",
                                             f"{r['variant']}-{r['skill']}-seed{r['seed']}",
                                             "ckpt.pt"), device)[0]
        r["demo_accuracy_end"] = statistics.mean(
            evaluate(model, tok, list(r["accuracy"]), device, n=FINETUNE["eval_n"],
                     demo_style="expert").values())
    peak = ("peak val", lambda rs: mean_sd([max(a for _, a in r["curve"]) for r in rs]))
    last = ("last val", lambda rs: mean_sd([r["curve"][-1][1] for r in rs]))
    demo = ("with a demonstration, at the end",
            lambda rs: mean_sd([r["demo_accuracy_end"] for r in rs]))

    def draw(plt):
        fig, axes = plt.subplots(1, len(skills), figsize=(4 * len(skills), 3.5), sharey=True,
                                 squeeze=False)
        for ax, skill in zip(axes[0], skills):
            for v in variants:
                curves = [r["curve"] for r in records if r["variant"] == v and r["skill"] == skill]
                n = min(len(c) for c in curves)  # every run has the whole budget
                ax.plot([c[0] for c in curves[0][:n]],
                        [statistics.mean(c[i][1] for c in curves) for i in range(n)],
                        label=VARIANTS[v][2].split(" (")[0])
            ax.set_title(f"{skill} ({len(seeds)} seeds)")
            ax.set_xlabel("step")
        axes[0][0].set_ylabel("validation accuracy")
        # beside the data
        axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        return fig
    write("teacher", records, variant_table("teacher", records, variants, [peak, last, demo]), draw)
    return records


def size_study():
    """Per model size: the base's accuracy with a demonstration in context (the teacher's), and
    SFT and SDFT on each skill; the gap SDFT - SFT on the new skill and on the prior average."""
    records, rows = [], ["| size (layers x width) | parameters "
                         "| teacher accuracy (demo in context, new skills) | base, plain "
                         "| SFT new | SDFT new | gap new | SFT prior | SDFT prior | gap prior |",
                         "|" + "---|" * 10]
    for size in SIZES:
        base = get_base(size)
        model = load_checkpoint(base, device)[0]
        params = model.num_params()
        teacher_acc = statistics.mean(evaluate(model, tok, skills, device, n=FINETUNE["eval_n"],
                                               demo_style="expert").values())
        plain = statistics.mean(base_accuracy(base)[s] for s in skills)
        rs = run_all("size", ["sft", "sdft"], base, size=size_name(size[0], size[2]),
                     parameters=params, teacher_accuracy=teacher_acc)
        records += rs
        new = {m: statistics.mean(list(r["new_accuracy"].values())[0]
                                  for r in rs if r["variant"] == m)
               for m in ("sft", "sdft")}
        pri = {m: statistics.mean(r["prior_average"] for r in rs if r["variant"] == m)
               for m in ("sft", "sdft")}
        rows.append(f"| {size_name(size[0], size[2])} | {params / 1e6:.2f}M | {teacher_acc:.2f} "
                    f"| {plain:.2f} | {new['sft']:.2f} | {new['sdft']:.2f} "
                    f"| {new['sdft'] - new['sft']:+.2f} | {pri['sft']:.2f} | {pri['sdft']:.2f} "
                    f"| {pri['sdft'] - pri['sft']:+.2f} |")

    def draw(plt):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        by_size = sorted({(r["parameters"], r["size"]) for r in records})
        for what, key in (("gap on the new skill", "new"), ("gap on the prior average", "prior")):
            gaps = []
            for params, name in by_size:
                rs = [r for r in records if r["size"] == name]
                value = ((lambda r: list(r["new_accuracy"].values())[0]) if key == "new"
                         else (lambda r: r["prior_average"]))
                gaps.append(statistics.mean(value(r) for r in rs if r["variant"] == "sdft")
                            - statistics.mean(value(r) for r in rs if r["variant"] == "sft"))
            ax.plot([p for p, _ in by_size], gaps, marker="o", label=f"SDFT - SFT, {what}")
        ax.plot([p for p, _ in by_size],
                [next(r["teacher_accuracy"] for r in records if r["size"] == n)
                 for _, n in by_size],
                marker="s", linestyle="--", label="teacher accuracy (demonstration in context)")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_xscale("log")
        ax.set_xticks([p for p, _ in by_size], [f"{p / 1e6:.2f}M\n({n})" for p, n in by_size])
        ax.minorticks_off()  # only the sizes measured: no overlapping log-scale labels
        ax.set_xlabel("parameters (layers x width)")
        ax.set_ylabel("accuracy, or difference in accuracy")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=1)
        return fig
    write("size", records, rows, draw, {"sizes": SIZES})
    return records


def passk_study():
    """pass@k at temperature 1 on each new skill: the base, and SFT and SDFT after learning it."""
    ks = (1, 2, 4, 8, 16)
    base = get_base()
    base_model = load_checkpoint(base, device)[0]
    queries = eval_queries("test", FINETUNE["eval_n"])
    records = []
    for variant, rs in (("base", None), ("sft", run_all("passk", ["sft"])),
                        ("sdft", run_all("passk", ["sdft"]))):
        for r in rs or [{"skill": s, "seed": 0, "accuracy": base_accuracy(base)} for s in skills]:
            model = base_model if rs is None else load_checkpoint(
                os.path.join(args.out, "runs", f"{variant}-{r['skill']}-seed{r['seed']}",
                             "ckpt.pt"), device)[0]
            p = pass_at_k(model, tok, r["skill"], queries, device, n_samples=max(ks), ks=ks,
                          seed=r["seed"])
            records.append({"study": "passk", "variant": variant, "seed": r["seed"],
                            "skill": r["skill"],
                            "new_accuracy": {r["skill"]: r["accuracy"][r["skill"]]},
                            "prior_average": prior_avg(r["accuracy"]), "pass_at_k": p})
    paper = {"base": "0.39 / 0.71 (pass@128)", "sft": "0.53 / 0.86", "sdft": "0.59 / 0.89"}
    rows = ["| model | " + " | ".join(f"pass@{k}" for k in ks) + " | paper pass@1 / pass@128 |",
            "|" + "---|" * (len(ks) + 2)]
    for v in ("base", "sft", "sdft"):
        rows.append(f"| {v.upper() if v != 'base' else 'base'} | "
                    + " | ".join(mean_sd([r["pass_at_k"][k] for r in records if r["variant"] == v])
                                 for k in ks)
                    + f" | {paper[v]} |")

    def draw(plt):
        fig, ax = plt.subplots(figsize=(5, 4))
        for v in ("base", "sft", "sdft"):
            ax.plot(ks, [statistics.mean(r["pass_at_k"][k] for r in records if r["variant"] == v)
                         for k in ks],
                    marker="o", label=v.upper() if v != "base" else "base")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k (samples at temperature 1)")
        ax.set_ylabel("pass@k, new skills")
        ax.legend()
        return fig
    write("passk", records, rows, draw, {"ks": ks, "n_samples": max(ks)})
    return records


def law_study():
    """Does how far a method moved on the new skill (kl_from_base) predict the prior-skill drop?
    One point per single-skill run of every study's variants (both measured from the base after
    learning one skill), a least-squares line and its R^2 per method and pooled."""
    # not re-invoke (its last KL is measured on a prior skill), nor the other rates of the sweeps
    other_rates = {v for m in SWEPT for v in SWEPT[m].values() if v != m}
    variants = [v for v in VARIANTS if v != "sft+reinvoke" and v not in other_rates]
    records = run_all("law", variants)

    def fit(points):
        xs, ys = zip(*points)
        mx, my = statistics.mean(xs), statistics.mean(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
        ss_res = sum((y - my - slope * (x - mx)) ** 2 for x, y in points)
        ss_tot = sum((y - my) ** 2 for y in ys)
        return slope, my - slope * mx, 1 - ss_res / ss_tot if ss_tot else float("nan")

    groups = {VARIANTS[v][2]: [r for r in records if r["variant"] == v] for v in variants}
    groups["pooled, every variant"] = records
    rows = ["| runs | n | slope (drop per nat) | R^2 |", "|---|---|---|---|"]
    for name, rs in groups.items():
        slope, _, r2 = fit([(r["kl_from_base"], r["prior_drop"]) for r in rs])
        rows.append(f"| {name} | {len(rs)} | {slope:.3f} | {r2:.2f} |")
    pooled = fit([(r["kl_from_base"], r["prior_drop"]) for r in records])

    def draw(plt):
        fig, ax = plt.subplots(figsize=(10, 4.5))
        for i, v in enumerate(variants):
            rs = [r for r in records if r["variant"] == v]
            ax.scatter([r["kl_from_base"] for r in rs], [r["prior_drop"] for r in rs], s=14,
                       color=plt.cm.tab20(i % 20), marker="os^"[i // 20 % 3],
                       label=VARIANTS[v][2].split(" (")[0])
        xs = [min(r["kl_from_base"] for r in records), max(r["kl_from_base"] for r in records)]
        ax.plot(xs, [pooled[1] + pooled[0] * x for x in xs], color="black",
                label=f"pooled fit, R^2 {pooled[2]:.2f}")
        ax.set_xlabel("KL(model || base) on the learned skill's answers (nats/token)")
        ax.set_ylabel("drop in prior-skill average")
        # beside, not on, the data
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
        return fig
    write("law", records, rows, draw,
          {"pooled": {"slope": pooled[0], "intercept": pooled[1], "r2": pooled[2]}})
    return records


def inside_study():
    """The training signal of SDFT's first step (the EMA teacher equals the student then), on a
    wrong and a right rollout of each new skill: what eval.py --inspect SKILL prints."""
    base = get_base()
    model = load_checkpoint(base, device)[0].eval()
    records, shown = [], []
    for skill in skills:
        rollouts = inspect_step(model, model, tok, skill, eval_queries("test", 16), device, seed=0)
        picked = [next(r for r in rollouts if r["right"] == right) for right in (False, True)
                  if any(r["right"] == right for r in rollouts)]
        shown += picked
        records.append({"study": "inside", "variant": "step 0", "seed": 0, "skill": skill,
                        "new_accuracy": {skill: base_accuracy(base)[skill]},
                        "prior_average": prior_avg(base_accuracy(base)),
                        "rollouts": picked})
    rows = ["| skill | rollout | right | tokens | mean divergence |", "|---|---|---|---|---|"]
    for rec in records:
        for r in rec["rollouts"]:
            d = [t["divergence"] for t in r["tokens"] if t["in_loss"]]
            rows.append(f"| {rec['skill']} | `{r['prompt']}{r['sample']}` | {r['right']} "
                        f"| {len(r['tokens'])} | {statistics.mean(d):.3f} |")

    def draw(plt):
        plot_inspect(shown, os.path.join(args.out, "inside", "inside.png"))
        return plt.gcf()
    os.makedirs(os.path.join(args.out, "inside"), exist_ok=True)
    write("inside", records, rows, draw)


for study in (STUDIES if args.study == "all" else [args.study]):
    if study in ("onpolicy", "divergence"):
        variant_study(study)
    else:
        {"baselines": baselines_study, "teacher": teacher_study, "size": size_study,
         "passk": passk_study, "law": law_study, "inside": inside_study}[study]()
print(f"total time {clock(time.time() - t_start)}")
