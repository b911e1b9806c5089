"""
Reasoning without reasoning data, in miniature: the paper's Table 2 (Olmo-3-7B-Think learning a
medical task whose demonstrations hold final answers only), one command.

    python lab/reasoning.py            # the thinking base, then 3 skills x 3 seeds x 3 rates
    python lab/reasoning.py --quick    # a tiny check of the pipeline: shows nothing

The reasoning world is lab/reasoning_world.py. A reasoning skill sorts the query's letters, then
applies a prior skill to them, and the model's own answer carries a short trace: the sorted
letters, '=', the answer (`bux dacb>` -> `abcd=ac`; the grader reads the text after '=').
From the thinking base (results/base-reasoning/ckpt.pt, made by lab/pretrain.py --p-think 1 where
it is missing), each new reasoning skill (bux, kaw, jug) is learned alone, from the same queries
with the same budget, from demonstrations that hold the final answer alone (`ac`: the training
scripts' --demo-style own, which for these skills is the answer without the model's trace):
- base: nothing learned. Also made to answer at once (the prompt `bux dacb>=`: the completion
  starts where the trace would end; right only if it is the answer itself, so a completion that
  writes a trace of its own after the '=' counts as wrong), and shown the answer-only
  demonstration as SDFT's teacher is (`bux dacb:ac\\nbux dacb>`).
- SFT (train_sft.py): next-token training on the answer alone.
- SDFT (train_sdft.py): the student answers the query; the teacher, shown the answer-only
  demonstration, scores the student's own answer, trace and all.
Each method runs at every rate of a small sweep (RATES), for every skill and seed; its rate is
the one with the best mean validation accuracy over all of those runs, and the table reports the
test queries of the runs at that rate. Per run, greedy, on test queries: accuracy (the final
answer), trace_rate (share of answers that think first), mean_tokens (answer length in tokens,
end-of-text not counted) and prior_average (the 7 prior skills). Writes OUT/results.json (one
record per run, with every setting that changes it), OUT/table.md and OUT/reasoning.png; the runs
go to OUT/runs and are reused when their command and base have not changed.
"""

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository root
from data import (PRIOR_SKILLS, Tokenizer, demonstration, eval_queries,  # noqa: E402
                  final_answer, skill_answer, student_prompt, teacher_prompt)
from lab.reasoning_world import (REASONING_NEW, REASONING_PRIOR, at_once_prompt,  # noqa: E402
                                 has_trace, reasoning_signature)
from eval import answer, evaluate  # noqa: E402
from runner import (BASE_SETTINGS, check_base, clock, every, flags, mean_sd,  # noqa: E402
                        pretrain_base, run_once, worst_skill)
from model import load_checkpoint  # noqa: E402

# The thinking base: the shipped base's recipe, every batch from the reasoning world's mixture
# (the prior skills, the known reasoning skills, the new ones on 4 of 10 first letters, throw-away
# ones with a demonstration), with a quarter more steps for the skills it adds.
THINK_BASE_SETTINGS = BASE_SETTINGS | {"steps": 15000, "p_think": 1.0}
# the sweep: around each method's rate in the skills world (runner.LR), a factor ~3 either way
RATES = {"sft": [1e-4, 3e-4, 1e-3], "sdft": [1e-5, 3e-5, 1e-4]}
# the skills world's budget and stopping rule: at most 300 steps, stop at 0.95 validation accuracy
FINETUNE = {"steps": 300, "eval_n": 100}
SCRIPTS = {"sft": "train_sft.py", "sdft": "train_sdft.py"}
METHODS = ["base", "sft", "sdft"]
LABELS = {"base": "base", "sft": "SFT", "sdft": "SDFT"}
PAPER = {"base": (31.2, 4612), "sft": (23.5, 3273), "sdft": (43.7, 4180)}  # accuracy %, tokens
MEASURES = ["accuracy", "trace_rate", "mean_tokens"]


def why_not_thinking_base(ckpt, settings):
    """Why this checkpoint is not a thinking base made with these settings for this reasoning
    world, or None if it is one."""
    if "world" in ckpt and not ckpt.get("reasoning_world"):
        return "it is not a thinking base (lab/pretrain.py --p-think makes those)"
    if "world" in ckpt and ckpt["reasoning_world"] != reasoning_signature():
        return ("it was pretrained for another reasoning world (data.py's reasoning skills, "
                "their formats or the thinking mixture have changed since)")
    return check_base(ckpt, settings)


@torch.no_grad()
def measure(model, tok, skill, queries, device, view="plain"):
    """Greedy answers of one skill: {accuracy, trace_rate, mean_tokens}. view 'plain' asks the
    student prompt, graded on the final answer; 'at_once' begins the completion where the trace
    would end (`bux dacb>=`), and is right only if the completion is the answer itself (one that
    thinks after the '=' did not answer at once); 'teacher' puts the answer-only demonstration in
    context, as SDFT's teacher sees it."""
    prompts = {"plain": lambda q: student_prompt(skill, q),
               "at_once": lambda q: at_once_prompt(skill, q),
               "teacher": lambda q: teacher_prompt(skill, q,
                                                   demonstration(skill_answer(skill, q), "own"))}
    outputs = answer(model, tok, [prompts[view](q) for q in queries], device)
    graded = (lambda o: o) if view == "at_once" else final_answer
    return {"accuracy": statistics.mean(graded(o) == skill_answer(skill, q)
                                        for o, q in zip(outputs, queries)),
            "trace_rate": statistics.mean(has_trace(o) for o in outputs),
            "mean_tokens": statistics.mean(len(tok.encode(o)) for o in outputs)}


def prior_average(accuracy):
    return statistics.mean(accuracy[s] for s in PRIOR_SKILLS)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skills", default=",".join(REASONING_NEW),
                        help="comma-separated new reasoning skills, each learned alone")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of every run")
    parser.add_argument("--out", default=None, help="directory for the results (default: "
                        "results/reasoning, or runs/reasoning-quick with --quick)")
    parser.add_argument("--base", default=None, help="the thinking base (default: results/"
                        "base-reasoning/ckpt.pt, pretrained if missing; --quick: OUT/base.pt)")
    parser.add_argument("--jobs", type=int, default=2, help="training runs side by side (one "
                        "thread each: the results do not depend on it)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model and budget: checks the pipeline, shows nothing")
    args = parser.parse_args()
    args.out = args.out or ("runs/reasoning-quick" if args.quick else "results/reasoning")
    base_settings, finetune, rates = THINK_BASE_SETTINGS, FINETUNE, RATES
    if args.quick:
        base_settings = THINK_BASE_SETTINGS | {"steps": 20, "n_layer": 1, "n_head": 2, "n_embd": 32}
        finetune = {"steps": 2, "eval_n": 4, "eval_every": 1, "batch_size": 4}
        rates = {"sft": [3e-4], "sdft": [3e-5]}
    args.base = args.base or (os.path.join(args.out, "base.pt") if args.quick
                              else "results/base-reasoning/ckpt.pt")
    try:
        skills = [s.strip() for s in args.skills.split(",") if s.strip()]
        for s in skills:
            if s not in REASONING_NEW:
                raise ValueError(f"unknown new reasoning skill '{s}' "
                                 f"(known: {', '.join(REASONING_NEW)})")
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated integers, got '{args.seeds}'")
        if not skills or not seeds:
            raise ValueError("--skills and --seeds must each name at least one")
        if args.jobs <= 0:
            raise ValueError(f"--jobs must be positive, got {args.jobs}")
        os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
        if os.path.exists(args.base):
            why_not = why_not_thinking_base(load_checkpoint(args.base)[1], base_settings)
            if why_not:
                raise ValueError(f"{args.base} is not the thinking base: {why_not}")
    except ValueError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: cannot write to --out {args.out} ({e.strerror})")

    torch.set_num_threads(1)  # this process evaluates beside the runs: one thread, as they have
    device, tok, t_start = torch.device("cpu"), Tokenizer(), time.time()
    if not os.path.exists(args.base):
        print(f"pretraining {args.base} ({base_settings['steps']} steps)", flush=True)
        pretrain_base(args.base, base_settings, on_line=every())
    n = finetune["eval_n"]
    test, val = eval_queries("test", n), eval_queries("val", n)

    # the base: with its trace, at once, and as the teacher sees it
    model = load_checkpoint(args.base, device)[0].eval()
    prior_accuracy = evaluate(model, tok, list(PRIOR_SKILLS), device, n=n)
    prior = prior_average(prior_accuracy)
    base_views = {s: {view: measure(model, tok, s, test, device, view)
                      for view in ("plain", "at_once", "teacher")}
                  for s in list(REASONING_PRIOR) + skills}
    records = [{"method": "base", "seed": 0, "skill": s, **base_views[s]["plain"],
                "prior_average": prior, "prior": prior_accuracy, "lr": None, "val_accuracy":
                measure(model, tok, s, val, device)["accuracy"], "chosen": True, "steps": 0}
               for s in skills]

    def train(method, lr, skill, seed):
        """One run of a training script; its record, measured on its final weights."""
        name = f"{method}-lr{lr:g}-{skill}-seed{seed}"
        out = os.path.join(args.out, "runs", name)
        command = ["lab/variants.py", SCRIPTS[method], "--reasoning",  # the reasoning world
                   "--init", args.base, "--skills", skill, "--seed", str(seed),
                   "--lr", str(lr), "--demo-style", "own", *flags(finetune), "--out", out]
        run_once(command, out, on_line=every(prefix=f"  {name}: "),
                 announce=f"{name} ({clock(time.time() - t_start)} elapsed)")
        with open(os.path.join(out, "metrics.jsonl")) as f:
            stage = [json.loads(line) for line in f][-1]  # the end-of-stage evaluation
        trained = load_checkpoint(os.path.join(out, "ckpt.pt"), device)[0].eval()
        return {"method": method, "seed": seed, "skill": skill,
                **measure(trained, tok, skill, test, device),
                "prior_average": prior_average(stage["accuracy"]),
                "prior": {k: stage["accuracy"][k] for k in PRIOR_SKILLS}, "lr": lr,
                "val_accuracy": measure(trained, tok, skill, val, device)["accuracy"],
                "steps": stage["steps"]}

    jobs = [(m, lr, s, seed) for m in SCRIPTS for lr in rates[m] for s in skills for seed in seeds]
    with ThreadPoolExecutor(args.jobs) as pool:  # each run is a process with one thread
        trained = list(pool.map(lambda job: train(*job), jobs))
    # each method's rate: the best mean validation accuracy over its skills and seeds
    sweep = {(m, lr): statistics.mean(r["val_accuracy"] for r in trained
                                      if (r["method"], r["lr"]) == (m, lr))
             for m in SCRIPTS for lr in rates[m]}
    chosen = {m: max(rates[m], key=lambda lr: sweep[m, lr]) for m in SCRIPTS}  # ties: the lower
    records += [r | {"chosen": r["lr"] == chosen[r["method"]]} for r in trained]

    rows = table(records, base_views, sweep, chosen, skills, seeds)
    results = {"config": {"skills": skills, "seeds": seeds, "base": args.base,
                          "base_settings": base_settings, "reasoning_world": reasoning_signature(),
                          "finetune": finetune, "rates": rates, "chosen_rates": chosen,
                          "demonstrations": "answer-only (--demo-style own: the final answer, "
                                            "without the model's trace)",
                          "queries": f"{n} test, {n} validation (data.eval_queries, seed 0)",
                          "decoding": "greedy", "quick": args.quick},
               "base_views": base_views, "runs": records}
    with open(os.path.join(args.out, "results.json.tmp"), "w") as f:
        json.dump(results, f, indent=1)
    os.replace(os.path.join(args.out, "results.json.tmp"), os.path.join(args.out, "results.json"))
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(rows) + "\n")
    draw(records, seeds, os.path.join(args.out, "reasoning.png"))
    print("\n".join(rows) + f"\nwrote {args.out}/results.json, table.md, reasoning.png "
          f"({clock(time.time() - t_start)} elapsed)")


# -----------------------------------------------------------------------------
# tables and plots

def per_seed(records, method, key, seeds):
    """A method's measure per seed, averaged over the skills (its chosen rate's runs)."""
    runs = [r for r in records if r["method"] == method and r["chosen"]]
    if method == "base":  # one base, evaluated once: the same for every seed
        return [statistics.mean(r[key] for r in runs)]
    return [statistics.mean(r[key] for r in runs if r["seed"] == seed) for seed in seeds]


def table(records, base_views, sweep, chosen, skills, seeds):
    rows = ["Reasoning without reasoning data (`python lab/reasoning.py`): each new reasoning "
            "skill learned alone from answer-only demonstrations; test queries, greedy; mean ± sd "
            f"over seeds {','.join(map(str, seeds))} of the mean over {', '.join(skills)}.", "",
            "| method | rate | steps | accuracy | trace_rate | mean_tokens | prior_average "
            "| worst prior skill | the paper: accuracy, tokens per answer |",
            "|---|---|---|---|---|---|---|---|---|"]
    means = {}
    for m in METHODS:
        cells = []
        for key in MEASURES + ["prior_average"]:
            values = per_seed(records, m, key, seeds)
            means[m, key] = statistics.mean(values)
            cells.append(mean_sd(values) if key != "mean_tokens"
                         else f"{means[m, key]:.1f}" + (f" ± {statistics.stdev(values):.1f}"
                                                         if len(values) > 1 else ""))
        rate = "-" if m == "base" else f"{chosen[m]:g}"
        rs = [r for r in records if r["method"] == m and r["chosen"]]
        worst, accuracy = worst_skill([r["prior"] for r in rs], PRIOR_SKILLS)
        cells.append(f"{worst} {accuracy:.2f}")
        steps = f"{statistics.mean(per_seed(records, m, 'steps', seeds)):.0f}"
        rows.append(f"| {LABELS[m]} | {rate} | {steps} | {' | '.join(cells)} "
                    f"| {PAPER[m][0]}%, {PAPER[m][1]} |")
    rows += ["", "Per skill (accuracy / trace_rate / mean_tokens, mean over seeds):", "",
             "| method | " + " | ".join(skills) + " |", "|---|" + "---|" * len(skills)]
    for m in METHODS:
        cells = []
        for s in skills:
            rs = [r for r in records if r["method"] == m and r["chosen"] and r["skill"] == s]
            cells.append(" / ".join(f"{statistics.mean(r[k] for r in rs):.2f}" for k in MEASURES))
        rows.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    rows += ["", "The base thinks, and its trace helps: the same base with its trace, made to "
             "answer at once (the completion begun at `=`, where the trace would end), and shown "
             "the answer-only demonstration as SDFT's teacher is (accuracy, trace_rate in "
             "brackets):", "", "| skill | kind | with its trace | at once | as the teacher |",
             "|---|---|---|---|---|"]
    for s, views in base_views.items():
        kind = "new" if s in REASONING_NEW else "known"
        plain, at_once, teacher = views["plain"], views["at_once"], views["teacher"]
        rows.append(f"| {s} | {kind} | {plain['accuracy']:.2f} ({plain['trace_rate']:.2f}) "
                    f"| {at_once['accuracy']:.2f} "
                    f"| {teacher['accuracy']:.2f} ({teacher['trace_rate']:.2f}) |")
    rows += ["", "Rates (mean validation accuracy over every skill and seed; the best is chosen):",
             "", "| method | rate | validation accuracy | chosen |", "|---|---|---|---|"]
    rows += [f"| {LABELS[m]} | {lr:g} | {v:.3f} | {'yes' if lr == chosen[m] else ''} |"
             for (m, lr), v in sweep.items()]
    base, sft, sdft = ({k: means[m, k] for k in MEASURES + ["prior_average"]} for m in METHODS)
    goals = [(f"SDFT's accuracy beats the base's ({sdft['accuracy']:.2f} vs "
              f"{base['accuracy']:.2f})", sdft["accuracy"] > base["accuracy"]),
             (f"SDFT's accuracy beats SFT's by at least 0.1 ({sdft['accuracy']:.2f} vs "
              f"{sft['accuracy']:.2f})", sdft["accuracy"] >= sft["accuracy"] + 0.1),
             (f"SDFT keeps thinking: trace_rate at least 0.9 of the base's "
              f"({sdft['trace_rate']:.2f} vs {base['trace_rate']:.2f})",
              sdft["trace_rate"] >= 0.9 * base["trace_rate"]),
             (f"SFT's trace_rate and mean_tokens fall ({sft['trace_rate']:.2f}, "
              f"{sft['mean_tokens']:.1f} vs {base['trace_rate']:.2f}, {base['mean_tokens']:.1f})",
              sft["trace_rate"] < base["trace_rate"] and sft["mean_tokens"] < base["mean_tokens"]),
             (f"SDFT's prior average at least 0.9 of the base's ({sdft['prior_average']:.2f} "
              f"vs {base['prior_average']:.2f})",
              sdft["prior_average"] >= 0.9 * base["prior_average"]),
             (f"as in the paper, SFT ends below the base ({sft['accuracy']:.2f} vs "
              f"{base['accuracy']:.2f})", sft["accuracy"] < base["accuracy"])]
    rows += ["", "| goal | met |", "|---|---|"]
    rows += [f"| {g} | {'yes' if ok else 'no'} |" for g, ok in goals]
    return rows


def draw(records, seeds, path):
    """Three panels, base / SFT / SDFT: accuracy beside the paper's, trace rate, and answer length
    relative to the base's beside the paper's (mean over skills; error bars: sd over seeds)."""
    import matplotlib  # imported late: only the plot needs it

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    x = range(len(METHODS))
    base_tokens = statistics.mean(per_seed(records, "base", "mean_tokens", seeds))
    panels = [("accuracy", "accuracy (final answer)", lambda v: v, lambda m: PAPER[m][0] / 100),
              ("trace_rate", "share of answers with a trace", lambda v: v, None),
              ("mean_tokens", "answer length / the base's",
               lambda v: v / base_tokens if base_tokens else 0.0,  # (--quick: empty answers)
               lambda m: PAPER[m][1] / PAPER["base"][1])]
    for ax, (key, ylabel, scale, paper) in zip(axes, panels):
        values = [[scale(v) for v in per_seed(records, m, key, seeds)] for m in METHODS]
        width = 0.38 if paper else 0.6
        ax.bar([i - (width / 2 if paper else 0) for i in x], [statistics.mean(v) for v in values],
               width, yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in values],
               color="tab:blue", label="the toy (mean over skills, sd over seeds)")
        if paper:
            ax.bar([i + width / 2 for i in x], [paper(m) for m in METHODS], width,
                   color="lightgrey", hatch="//", label="the paper (Olmo-3-7B-Think, medical)")
        ax.set_xticks(list(x), [LABELS[m] for m in METHODS])
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.35 * max([1.0] + [statistics.mean(v) for v in values]))  # legend room
    axes[0].set_title("accuracy")
    axes[1].set_title("keeps thinking?")
    axes[2].set_title("answer length")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle("Reasoning without reasoning data: learning from answer-only demonstrations "
                 "(the paper's Table 2, in miniature)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
