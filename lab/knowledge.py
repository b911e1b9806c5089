"""
Knowledge acquisition in miniature: learning facts from documents (the paper's Table 1, and its
teacher-context ablation, App. A.2), one command.

    python lab/knowledge.py                       # 10 facts, 3 seeds, every method
                                                    (about 4 min on 2 CPU cores)
    python lab/knowledge.py --facts 10,50         # the number of facts learned at once
                                                    (results/knowledge; 45 min)
    python lab/knowledge.py --demo-style own --out results/knowledge-own
                                                  # pairs in the model's own style (the control)
    python lab/knowledge.py --quick               # a tiny check of the pipeline: shows nothing

From the knowledge base (results/base-knowledge/ckpt.pt: the skills mixture plus knowledge
examples, pretrained first if it is missing), each method learns the same n facts about
made-up entities (data.knowledge_facts of the seed) within the same budget, and is evaluated on:
- direct:        `what ENTITY>` -> the value (the paper's strict column; the toy has no lenient
                 grader)
- indirect:      `rev ENTITY>` -> the value, then rev of it, for every prior skill but copy: needs
                 the new fact and an old skill, and no method trains on it (the paper's OOD column)
- prior_average: the prior skills on their test queries, after learning (retention; the paper
                 does not report it for this setting)
The methods: base (nothing learned), oracle (the base with the fact's document in context:
evaluated, not trained), CPT (train_sft.py --cpt: next-token training on the documents), SFT
(train_sft.py: on the direct question-answer pairs) and SDFT (train_sdft.py: the student sees the
direct question, the teacher sees the document and the answer before it, or one of the two:
--context doc+answer | doc | answer), and beside them two SDFT variants (teacher sees document
and answer): +frozen-teacher (train_sdft.py --teacher base: the paper's App. A.3 ablation) and
+agreed-prefix (train_sdft.py --agreed-prefix, not in the paper). SFT and SDFT learn from pairs
written in the expert's style (`what zorpxl>` -> `c a b d=cabd`, as the paper's pairs were
written by another model; the default) or in the model's own (`cabd`: --demo-style own). A run
ends when every fact is answered directly or its budget, 30 steps per fact and at least 300, runs
out, on the weights of its best validation (--keep-best: the paper reports the checkpoint with
the best validation score; here the validation is the facts asked directly). Writes
OUT/results.json (one record per run: method, context, variant, demo, n_facts, seed, direct,
indirect, prior_average, steps), OUT/table.md and OUT/knowledge.png; the runs go to
OUT/runs and are reused when their command and its base have not changed.
"""

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

# the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import PRIOR_SKILLS, Tokenizer
from eval import evaluate
from lab.knowledge_world import (CONTEXTS, MAX_FACTS, knowledge_accuracy, knowledge_facts,
                                 knowledge_signature)
from runner import BASE_SETTINGS, clock, ensure_base, every, flags, mean_sd, run_once
from model import load_checkpoint

# The knowledge base: the skills base's recipe, with 40% of the batches knowledge examples and
# more steps, so that the skills still get about the 12000 steps' worth of batches they have
# (20000 x 0.6; results/base-knowledge/eval.txt: every prior skill 1.00, the new ones .38-.45).
KNOWLEDGE_BASE_SETTINGS = BASE_SETTINGS | {"steps": 20000, "p_knowledge": 0.4}
# Each method's rate: the lowest of 1e-5, 3e-5, 1e-4 that answers all 10 facts of seed 0 directly
# within the budget (direct after 300 steps: SFT 0.50, 1.00, 1.00; SDFT 0.00, 0.40, 1.00), the
# skills' rates (runner.LR) being too low for SDFT here: its student starts ~3.8 nats/token from the
# teacher, whose fact it does not know. CPT learns no fact at any of them, so it gets the highest.
LR = {"cpt": 1e-4, "sft": 3e-5, "sdft": 1e-4}
# SDFT's variants beside the paper's recipe, as train_sdft.py flags: the frozen base as teacher
# instead of the EMA one (the paper's App. A.3 ablation) and the agreed prefix (not in the paper)
VARIANTS = {"-": [], "frozen-teacher": ["--teacher", "base"], "agreed-prefix": ["--agreed-prefix"]}
# (method, context, variant)
METHODS = ([("base", "-", "-"), ("oracle", "-", "-"), ("cpt", "-", "-"), ("sft", "-", "-")]
           + [("sdft", c, "-") for c in CONTEXTS]
           + [("sdft", "doc+answer", v) for v in VARIANTS if v != "-"])
PAPER = {("base", "-"): "0 / 0 / 0", ("oracle", "-"): "91 / 100 / 100",
         ("cpt", "-"): "9 / 37 / 7", ("sft", "-"): "80 / 95 / 80",
         ("sdft", "doc+answer"): "89 / 100 / 98 (App. A.2: 89)",
         ("sdft", "doc"): "App. A.2: 75", ("sdft", "answer"): "App. A.2: between 75 and 89",
         "frozen-teacher": "App. A.3: stable, below the EMA teacher",
         "agreed-prefix": "not in the paper"}

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--facts", default="10",
                    help="comma-separated numbers of facts, each learned at once")
parser.add_argument("--seeds", default="0,1,2",
                    help="comma-separated seeds: each seed's facts and run")
parser.add_argument("--out", default=None, help="directory for the results "
                    "(default: results/knowledge, or runs/knowledge-quick with --quick)")
parser.add_argument("--base", default=None, help="the knowledge base "
                    "(default: results/base-knowledge/ckpt.pt, pretrained if missing; "
                    "with --quick: OUT/base.pt)")
parser.add_argument("--demo-style", default="expert", choices=["expert", "own"],
                    help="style of the question-answer pairs SFT and SDFT learn from "
                    "(data.fact_prompts)")
parser.add_argument("--jobs", type=int, default=2,
                    help="training runs side by side (one thread each: the results do not "
                    "depend on it)")
parser.add_argument("--quick", action="store_true",
                    help="tiny model and budget: checks the pipeline, shows nothing")
args = parser.parse_args()
args.out = args.out or ("runs/knowledge-quick" if args.quick else "results/knowledge")
base_settings = KNOWLEDGE_BASE_SETTINGS
# stop_at 1: when every fact is answered directly; keep_best: on the weights of the best validation
FINETUNE = {"steps": 300, "eval_n": 100, "stop_at": 1, "keep_best": True}
# the budget grows with the facts: max(steps, 30 n); 10 facts took SFT and SDFT ~90 steps
STEPS_PER_FACT = 30
if args.quick:
    base_settings = KNOWLEDGE_BASE_SETTINGS | {"steps": 20, "n_layer": 1, "n_head": 2, "n_embd": 32}
    FINETUNE, STEPS_PER_FACT = {"steps": 2, "eval_n": 4, "eval_every": 1, "batch_size": 4,
                                "stop_at": 1, "keep_best": True}, 0
args.base = args.base or (os.path.join(args.out, "base.pt") if args.quick
                          else "results/base-knowledge/ckpt.pt")
try:
    n_facts = [int(n) for n in args.facts.split(",") if n.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not n_facts or not seeds:
        raise ValueError("--facts and --seeds must each list at least one number")
    if args.jobs <= 0:
        raise ValueError(f"--jobs must be positive, got {args.jobs}")
    for n in n_facts:
        knowledge_facts(n, 0)  # one sentence if the world cannot make n distinct facts
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
except ValueError as e:
    sys.exit(f"error: {e}" if "invalid literal" not in str(e) else
             f"error: --facts and --seeds must be comma-separated integers, "
             f"got '{args.facts}' and '{args.seeds}'")
except OSError as e:
    sys.exit(f"error: cannot write to --out {args.out} ({e.strerror})")

device = torch.device("cpu")  # the runs are CPU runs (runner.run_script); so is this evaluation
tok = Tokenizer()
t_start = time.time()


def get_base():
    """The knowledge base, pretrained first if it is missing; a checkpoint made otherwise, or
    for another knowledge world, is refused."""
    ensure_base(args.base, base_settings, on_line=every())
    if load_checkpoint(args.base)[1].get("knowledge_world") != knowledge_signature():
        sys.exit(f"error: {args.base} is not a base made with these settings: it was pretrained "
                 "for another knowledge world (lab/knowledge_world.py's facts, their formats or "
                 "the knowledge mixture have changed since)")
    return args.base


def prior_average(accuracy):
    return statistics.mean(accuracy[s] for s in PRIOR_SKILLS)


def evaluate_base(base, n, seed):
    """The base and the oracle (the base with each fact's document in context): evaluated, not
    trained."""
    model = load_checkpoint(base, device)[0]
    prior = prior_average(evaluate(model, tok, list(PRIOR_SKILLS), device, n=FINETUNE["eval_n"]))
    facts = knowledge_facts(n, seed)
    return [{"method": method, "context": "-", "variant": "-", "demo": "-", "n_facts": n,
             "seed": seed, "steps": 0, "prior_average": prior,
             **{kind: knowledge_accuracy(model, tok, facts, device, kind, context)
                for kind in ("direct", "indirect")}}
            for method, context in (("base", None), ("oracle", "doc"))]


def budget(n):
    return max(FINETUNE["steps"], STEPS_PER_FACT * n)


def train(base, method, context, variant, n, seed):
    """One run of a training script on the n facts of the seed; its record, from the last line of
    its metrics.jsonl (the end-of-stage evaluation)."""
    script, method_flags = {"cpt": ("train_sft.py", ["--cpt"]), "sft": ("train_sft.py", []),
                            "sdft": ("train_sdft.py",
                                     ["--context", context, *VARIANTS[variant]])}[method]
    # the knowledge world's flags (--facts, ...) are the lab's
    script = ["lab/variants.py", script]
    demo = "-" if method == "cpt" else args.demo_style  # CPT reads the documents, not the pairs
    name = (f"{method}{'' if context == '-' else '-' + context}"
            f"{'' if variant == '-' else '-' + variant}"
            f"{'' if demo == '-' else '-' + demo}-{n}facts-seed{seed}")
    out = os.path.join(args.out, "runs", name)
    command = [*script, "--init", base, "--facts", str(n), "--seed", str(seed),
               "--lr", str(LR[method]), *method_flags,
               *([] if demo == "-" else ["--demo-style", demo]),
               *flags(FINETUNE | {"steps": budget(n)}), "--out", out]
    run_once(command, out, on_line=every(prefix=f"  {name}: "),
             announce=f"{name} ({clock(time.time() - t_start)} elapsed)")
    stage = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][-1]
    accuracy = stage["accuracy"]
    return {"method": method, "context": context, "variant": variant, "demo": demo, "n_facts": n,
            "seed": seed, "steps": stage["steps"],
            "direct": accuracy["direct"], "indirect": accuracy["indirect"],
            "prior_average": prior_average(accuracy)}


# -----------------------------------------------------------------------------
# tables and plots

def runs_of(records, method, n):
    """The records of one (method, context, variant) with n facts, one per seed."""
    return [r for r in records
            if (r["method"], r["context"], r["variant"]) == method and r["n_facts"] == n]


def table(records):
    """| facts | method | context | pairs | direct | indirect | prior average | steps | paper |,
    mean ± sd over seeds, then the issue's goals, met or not, per number of facts."""
    rows = ["| facts | method | context | pairs | direct | indirect (OOD) | prior average "
            "| steps (budget) | paper: strict / lenient / OOD |",
            "|---|---|---|---|---|---|---|---|---|"]
    mean = {}
    for n in n_facts:
        for method, context, variant in METHODS:
            rs = runs_of(records, (method, context, variant), n)
            mean[n, method, context, variant] = {k: statistics.mean(r[k] for r in rs)
                                                 for k in ("direct", "indirect", "prior_average")}
            name = method if variant == "-" else f"{method} +{variant}"
            paper = PAPER[method, context] if variant == "-" else PAPER[variant]
            steps = (f"{statistics.mean(r['steps'] for r in rs):.0f}"
                     + (f" ({budget(n)})" if method in ("cpt", "sft", "sdft") else ""))
            rows.append(f"| {n} | {name} | {context} | {rs[0]['demo']} "
                        f"| {mean_sd([r['direct'] for r in rs])} | "
                        f"{mean_sd([r['indirect'] for r in rs])} "
                        f"| {mean_sd([r['prior_average'] for r in rs])} | "
                        f"{steps} | {paper} |")
    rows += ["", "| facts | goal | met |", "|---|---|---|"]
    for n in n_facts:
        sft, oracle, base, cpt = (mean[n, m, "-", "-"] for m in ("sft", "oracle", "base", "cpt"))
        for variant in VARIANTS:
            rows += [f"| {n} | {goal}{'' if variant == '-' else f' (+{variant})'} "
                     f"| {'yes' if met else 'no'} |"
                     for goal, met in goals(mean[n, "sdft", "doc+answer", variant],
                                            sft, oracle, base)]
        rows.append(f"| {n} | CPT barely learns to answer: direct below 0.2 "
                    f"({cpt['direct']:.2f}) | {'yes' if cpt['direct'] < 0.2 else 'no'} |")
    return rows


def goals(sdft, sft, oracle, base):
    """The issue's goals for SDFT (teacher sees document and answer): [(sentence with the
    figures, met)]."""
    return [(f"SDFT indirect within 0.1 of the oracle "
             f"({sdft['indirect']:.2f} vs {oracle['indirect']:.2f})",
             sdft["indirect"] >= oracle["indirect"] - 0.1),
            (f"SDFT indirect >= SFT + 0.15 ({sdft['indirect']:.2f} vs {sft['indirect']:.2f})",
             sdft["indirect"] >= sft["indirect"] + 0.15),
            (f"SDFT direct >= SFT ({sdft['direct']:.2f} vs {sft['direct']:.2f})",
             sdft["direct"] >= sft["direct"]),
            (f"SDFT prior average >= 0.9 of the base's "
             f"({sdft['prior_average']:.2f} vs {base['prior_average']:.2f})",
             sdft["prior_average"] >= 0.9 * base["prior_average"])]


def draw(records, path):
    """One panel per number of facts: per method, direct, indirect and prior-average bars (mean,
    sd over seeds)."""
    import matplotlib  # imported late: only the plot needs it

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(n_facts), figsize=(6 * len(n_facts), 3.5), squeeze=False)
    for ax, n in zip(axes[0], n_facts):
        for i, (method, context, variant) in enumerate(METHODS):
            rs = runs_of(records, (method, context, variant), n)
            for j, (key, color) in enumerate((("direct", "tab:green"), ("indirect", "tab:orange"),
                                              ("prior_average", "tab:blue"))):
                values = [r[key] for r in rs]
                ax.bar(i + 0.27 * (j - 1), statistics.mean(values), width=0.27, color=color,
                       label=key if i == 0 else None,
                       yerr=statistics.stdev(values) if len(values) > 1 else None)
        # the variants' teacher sees doc+answer
        ax.set_xticks(range(len(METHODS)),
                      [m if c == "-" else f"sdft\n{c}" if v == "-" else f"sdft\n+{v.split('-')[0]}"
                       for m, c, v in METHODS], fontsize=8)
        ax.set_ylim(0, 1.2)  # room for the legend
        ax.set_title(f"{n} facts learned at once, {args.demo_style} pairs ({len(seeds)} seeds)")
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=8, loc="upper center", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------
# the study

base = get_base()
jobs = [(method, n, seed) for n in n_facts for seed in seeds for method in METHODS
        if method[0] not in ("base", "oracle")]
with ThreadPoolExecutor(args.jobs) as pool:  # each run is a process with one thread
    trained = dict(zip(jobs, pool.map(lambda job: train(base, *job[0], job[1], job[2]), jobs)))
records = []
for n in n_facts:
    for seed in seeds:
        records += evaluate_base(base, n, seed)
        records += [trained[method, n, seed] for method in METHODS
                    if method[0] not in ("base", "oracle")]
rows = table(records)
results = {"config": {"facts": n_facts, "seeds": seeds, "finetune": FINETUNE,
                      "steps_per_fact": STEPS_PER_FACT, "lr": LR, "demo_style": args.demo_style,
                      "base": base, "base_settings": base_settings, "max_facts": MAX_FACTS,
                      "quick": args.quick}, "runs": records}
with open(os.path.join(args.out, "results.json.tmp"), "w") as f:
    json.dump(results, f, indent=1)
os.replace(os.path.join(args.out, "results.json.tmp"), os.path.join(args.out, "results.json"))
with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write("\n".join(rows) + "\n")
draw(records, os.path.join(args.out, "knowledge.png"))
print("\n".join(rows) + f"\nwrote {args.out}/results.json, table.md, knowledge.png "
      f"({clock(time.time() - t_start)} elapsed)")
