"""
When does on-policy learning matter? The paper's Fig. 6 (SDFT ~70, offline distillation ~64,
SFT on the teacher's samples ~62) redone under several conditions, each with the measurements
that explain it.

    python lab/map.py           # 5 conditions x 4 methods x 5 rates x 3 skills x 3 seeds (~1 h)
    python lab/map.py --quick   # two conditions, one rate, skill and seed, 2 steps: the pipeline

The methods, each learning one new skill from a base with the same queries, batch and step budget
(so the same number of generated answers per step, none for SFT on the demonstrations), the
whole budget run (no stopping), each at the rate of the sweep with the best validation score
over skills and seeds: the mean of the new skill's accuracy and the prior skills' average,
greedy (so a rate that learns the skill by forgetting the others is not chosen):

  sdft         SDFT: forward KL to the EMA teacher, on the student's own samples
  offline      offline distillation: forward KL to the frozen teacher, on the teacher's samples
  sft-teacher  SFT on the teacher's samples (cross-entropy on its tokens)
  sft-demos    SFT on the expert's demonstrations

The conditions, each a miniature of something an LLM meets:

  today    the toy world as the headline learns it (60 steps)
  short    a budget meant to be too short to fit the skill (10 steps, warmup 3)
  small    a smaller student (4 layers x 64, 0.21M parameters; results/studies/size), 60 steps
  unsure   the teacher is shown a demonstration of another query of the skill, so it must
           infer the skill in context (lab/variants.py --teacher-sees other), 60 steps
  slips    a wrong answer can be mended: '=' and the answer again (the grader reads after the
           last '='); the base's teacher mends, its student never does (lab/slips_world.py;
           its base is made where missing, ~10 min), 60 steps

Each method is evaluated on test queries greedy and at temperature 1, with the prior skills'
average. Each condition also reports its mechanism, on test queries:
  departure   how often the student's sampled answers (temperature 1) leave the teacher's path:
              some token is not the teacher's most likely one (for the base, and after each
              method)
  recovery    after a forced slip (one answer token replaced by another of its alphabet, at a
              random position), how often the student's greedy continuation still ends right;
              and after a forced rival start (the first token of the rival prior skill's
              answer: the base's own mistake)
  first step  where the first SDFT step's divergence sits: its share at answer position 0, 1
              and later, on the student's samples (on-policy) and on the teacher's (offline)

Writes OUT/results.json (every run and measurement, every setting), OUT/table.md and OUT/map.png.
"""

import argparse
import json
import os
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data import (ALPHABETS, PRIOR_SKILLS, RIVALS, SEQUENCE, SKILLS, Tokenizer,  # noqa: E402
                  demonstration, encode_prompts, eval_queries, final_answer, parse_skills,
                  skill_answer, student_prompt, teacher_prompt)
from eval import MAX_NEW_TOKENS, accuracy, answer  # noqa: E402
from model import load_checkpoint  # noqa: E402
from runner import (BASE_SETTINGS, clock, ensure_base, every, flags, mean_sd,  # noqa: E402
                    run_once)
from sdft import sdft_loss  # noqa: E402
from lab.slips_world import slips_signature  # noqa: E402
from lab.variants import other_query_prompt, variant_loss  # noqa: E402

BASE, SMALL = "results/base/ckpt.pt", "results/studies/size/base-4x64.pt"
P_MEND = 0.3  # the slips base's share of mended slips (lab/pretrain.py --p-mend)
SLIPS, SLIPS_SETTINGS = "results/base-slips/ckpt.pt", BASE_SETTINGS | {"p_mend": P_MEND}
CONDITIONS = {  # name: (label, settings)
    "today": ("today's world", {"base": BASE, "steps": 60}),
    "short": ("a short budget (10 steps)", {"base": BASE, "steps": 10, "warmup": 3}),
    "small": ("a smaller student (4x64, 0.21M)", {"base": SMALL, "steps": 60}),
    "unsure": ("a teacher shown another query's demonstration",
               {"base": BASE, "steps": 60, "teacher_sees": "other"}),
    "slips": ("a world where a wrong answer can be mended", {"base": SLIPS, "steps": 60}),
}
VSDFT = "lab/variants.py train_sdft.py"
OFFLINE = {"rollout": "teacher", "teacher": "base"}
METHODS = {  # name: (script, flags, label)
    "sdft": ("train_sdft.py", {}, "SDFT"),
    "offline": (VSDFT, OFFLINE, "offline distillation"),
    "sft-teacher": (VSDFT, OFFLINE | {"loss": "ce"}, "SFT on the teacher's samples"),
    "sft-demos": ("train_sft.py", {}, "SFT on the demonstrations"),
}
COLORS = {"sdft": "tab:blue", "offline": "tab:green", "sft-teacher": "tab:purple",
          "sft-demos": "tab:red"}

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", default=None, help="directory (default: results/map; with --quick "
                    "runs/map-quick)")
parser.add_argument("--conditions", default=",".join(CONDITIONS), help="comma-separated")
parser.add_argument("--lrs", default="1e-5,3e-5,1e-4,3e-4,1e-3",
                    help="the rate sweep of every method (lab/decomposition.py's)")
parser.add_argument("--seeds", default="0,1,2", help="comma-separated fine-tuning seeds")
parser.add_argument("--skills", default=",".join(SEQUENCE), help="new skills, each learned alone")
parser.add_argument("--n", type=int, default=100, help="queries per measurement")
parser.add_argument("--jobs", type=int, default=2, help="runs side by side (one thread each)")
parser.add_argument("--quick", action="store_true", help="a tiny budget: checks the pipeline")
args = parser.parse_args()
try:
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown or not conditions:
        raise ValueError(f"unknown --conditions '{args.conditions}' ({', '.join(CONDITIONS)})")
    lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    skills = parse_skills(args.skills)
    if not lrs or min(lrs) <= 0 or not seeds or args.n <= 0 or args.jobs <= 0:
        raise ValueError("--lrs must list positive rates, --seeds at least one seed, "
                         "--n and --jobs be positive")
except ValueError as e:
    sys.exit(f"error: {e}" if "could not convert" not in str(e) and "invalid literal" not in str(e)
             else "error: --lrs and --seeds must be comma-separated numbers")
args.out = args.out or ("runs/map-quick" if args.quick else "results/map")
for c in conditions:
    if CONDITIONS[c][1]["base"] == SLIPS:
        ensure_base(SLIPS, SLIPS_SETTINGS, on_line=every(60))  # checked, or made where missing
        if load_checkpoint(SLIPS)[1].get("slips_world") != slips_signature(P_MEND):
            sys.exit(f"error: {SLIPS} was made for another slips world (lab/slips_world.py has "
                     "changed since): remove it to make it again")
    elif not os.path.exists(CONDITIONS[c][1]["base"]):
        sys.exit(f"error: condition '{c}' needs its base {CONDITIONS[c][1]['base']}, which is "
                 "missing (python lab/studies.py size makes the small one)")
FINETUNE = {"eval_n": args.n, "stop_at": 1}  # validated at step 0 only: the whole budget runs
if args.quick:
    for c in CONDITIONS:
        CONDITIONS[c][1]["steps"] = 2
    FINETUNE["eval_n"] = args.n = 4
device, tok = torch.device("cpu"), Tokenizer()
torch.set_num_threads(1)  # the measurements repeat exactly, as the runs do
t_start = time.time()


# -----------------------------------------------------------------------------
# runs

def run_dir(condition, method, skill, seed, lr):
    # SFT on the demonstrations has no teacher: a teacher condition shares today's runs
    if method == "sft-demos" and "teacher_sees" in CONDITIONS[condition][1]:
        condition = "today"
    return os.path.join(args.out, "runs", f"{condition}-{method}-{skill}-seed{seed}-lr{lr:g}")


def train(condition, method, skill, seed, lr):
    """One run, reused when its directory holds the same finished command; its stage record."""
    settings = dict(CONDITIONS[condition][1])
    base = settings.pop("base")
    script, method_flags, _ = METHODS[method]
    if method == "sft-demos":
        settings.pop("teacher_sees", None)
    elif "teacher_sees" in settings:
        script = VSDFT  # SDFT with the condition's teacher prompt
    out = run_dir(condition, method, skill, seed, lr)
    command = [*script.split(), *flags(method_flags | settings), "--init", base, "--skills", skill,
               "--seed", str(seed), "--lr", str(lr),
               *flags(FINETUNE | {"eval_every": settings["steps"]}), "--out", out]
    run_once(command, out)
    stage = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][-1]
    return {"command": command, "out": out, "steps": stage["steps"],
            "test": stage["accuracy"][skill], "val": stage["val_accuracy"][skill],
            "prior_average": statistics.mean(stage["accuracy"][s] for s in PRIOR_SKILLS),
            "prior_val": statistics.mean(stage["val_accuracy"][s] for s in PRIOR_SKILLS),
            "kl_from_base": stage["kl_from_base"]}


# -----------------------------------------------------------------------------
# measurements

def teacher_prompts(condition, skill, queries, seed=0):
    """The teacher's prompts for these queries under the condition (the expert's style)."""
    rng = random.Random(f"other-{seed}")
    if CONDITIONS[condition][1].get("teacher_sees") == "other":
        return [other_query_prompt(rng, skill, q, "expert") for q in queries]
    return [teacher_prompt(skill, q, demonstration(skill_answer(skill, q), "expert"))
            for q in queries]


def encoded(prompts):
    return encode_prompts(tok, prompts)


def temperature_1(model, skill, queries, seed):
    torch.manual_seed(seed)  # the sampling stream of eval's generate
    return accuracy(model, tok, skill, queries, device, temperature=1.0)[0]


@torch.no_grad()
def departure(student, teacher, condition, skill, queries, seed):
    """Share of the student's sampled answers (temperature 1) with a token that is not the
    teacher's most likely one there."""
    generator = torch.Generator().manual_seed(seed)
    _, step = sdft_loss(student, teacher, *encoded([student_prompt(skill, q) for q in queries]),
                        *encoded(teacher_prompts(condition, skill, queries)), MAX_NEW_TOKENS,
                        tok.eot_id, 0.0, 0, generator)
    off = (step["completion"] != step["teacher_logits"].argmax(-1)) & step["mask"].bool()
    return off.any(1).float().mean().item()


def forced_slip(model, skill, queries, seed, rival=False, asked=None):
    """Share of queries answered right after one answer token is replaced by another of its
    alphabet, at a random position (rival: the first token is the rival skill's), the rest
    greedy. asked: the prompts the begun answer follows (default: the student's)."""
    rng, prompts, expected = random.Random(f"slip-{seed}"), [], []
    asked = asked or [student_prompt(skill, q) for q in queries]
    for q, prompt in zip(queries, asked):
        right = skill_answer(skill, q)
        k = rng.randrange(len(right))
        alphabet = next(a for a in ALPHABETS if right[k] in a)
        slip = rng.choice([c for c in alphabet if c != right[k]])
        if rival:
            k, slip = 0, SKILLS[RIVALS[skill]](q)[0]
        prompts.append(prompt + right[:k] + slip)
        expected.append((right[:k] + slip, right))
    outputs = answer(model, tok, prompts, device)
    return statistics.mean(final_answer(begun + out) == right
                           for (begun, right), out in zip(expected, outputs))


@torch.no_grad()
def first_step(base, condition, skill, queries, seed):
    """Where one SDFT step's summed divergence sits, by answer position (0, 1, later), from the
    base as student and teacher: on the student's samples and on the teacher's."""
    shares = {}
    for who in ("student", "teacher"):
        generator = torch.Generator().manual_seed(seed)
        _, step = variant_loss(base, base, *encoded([student_prompt(skill, q) for q in queries]),
                               *encoded(teacher_prompts(condition, skill, queries)),
                               MAX_NEW_TOKENS, tok.eot_id, generator=generator, rollout_by=who)
        by_position = (step["per_token"] * step["mask"]).sum(0)
        total = by_position.sum().item() or 1.0
        shares[who] = {"0": by_position[0].item() / total, "1": by_position[1].item() / total,
                       "later": by_position[2:].sum().item() / total,
                       "nats_per_answer": by_position.sum().item() / len(queries)}
    return shares


def measure(model, teacher, condition, skill, queries, seed):
    return {"temperature_1": temperature_1(model, skill, queries, seed),
            "departure": departure(model, teacher, condition, skill, queries, seed),
            "recovery": forced_slip(model, skill, queries, seed),
            "recovery_rival": forced_slip(model, skill, queries, seed, rival=True)}


# -----------------------------------------------------------------------------
# the map

def choose(runs, condition, method):
    """The rate with the best validation score over skills and seeds (a tie: the lower): the
    mean of the new skill's accuracy and the prior skills' average."""
    score = lambda r: (r["val"] + r["prior_val"]) / 2
    val = {lr: statistics.mean(score(runs[(condition, method, s, seed, lr)])
                               for s in skills for seed in seeds) for lr in lrs}
    return max(lrs, key=lambda lr: (val[lr], -lr)), val


def main():
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    keys = [(c, m, s, seed, lr) for c in conditions for m in METHODS for s in skills
            for seed in seeds for lr in lrs]
    jobs = list({run_dir(*key): key for key in keys}.values())  # each run once
    print(f"{len(jobs)} runs, {args.jobs} at a time", flush=True)
    done = [0]

    def one(job):
        result = train(*job)
        done[0] += 1
        if done[0] % 20 == 0:
            print(f"  {done[0]}/{len(jobs)} runs, {clock(time.time() - t_start)}", flush=True)
        return result
    with ThreadPoolExecutor(args.jobs) as pool:
        by_dir = {run_dir(*job): result for job, result in zip(jobs, pool.map(one, jobs))}
    runs = {key: by_dir[run_dir(*key)] for key in keys}
    test_queries = eval_queries("test", args.n)
    records = {"settings": {"conditions": {c: CONDITIONS[c] for c in conditions},
                            "methods": METHODS, "lrs": lrs, "seeds": seeds, "skills": skills,
                            "finetune": FINETUNE, "n": args.n, "quick": args.quick},
               "conditions": {}}
    for c in conditions:
        base_path = CONDITIONS[c][1]["base"]
        base = load_checkpoint(base_path)[0].eval()
        entry = {"label": CONDITIONS[c][0], "base": {}, "methods": {}}
        for skill in skills:
            entry["base"][skill] = {
                "greedy": accuracy(base, tok, skill, test_queries, device)[0],
                "teacher_greedy": statistics.mean(
                    final_answer(o) == skill_answer(skill, q) for o, q in zip(
                        answer(base, tok, teacher_prompts(c, skill, test_queries), device),
                        test_queries)),
                # the teacher's role: does it mend a rival start (the slips world's does)?
                "teacher_recovery_rival": forced_slip(base, skill, test_queries, 0, rival=True,
                                                      asked=teacher_prompts(c, skill,
                                                                            test_queries)),
                **measure(base, base, c, skill, test_queries, 0),
                "first_step": first_step(base, c, skill, test_queries, 0)}
        for m in METHODS:
            lr, val = choose(runs, c, m)
            per_run = []
            for skill in skills:
                for seed in seeds:
                    r = runs[(c, m, skill, seed, lr)]
                    model = load_checkpoint(os.path.join(r["out"], "ckpt.pt"))[0].eval()
                    per_run.append({"skill": skill, "seed": seed, **r,
                                    **measure(model, base, c, skill, test_queries, seed)})
            entry["methods"][m] = {"lr": lr, "val_by_lr": val, "runs": per_run,
                                   "every_rate": {f"{x:g}": [
                                       {k: runs[(c, m, s, seed, x)][k] for k in
                                        ("test", "val", "prior_average", "prior_val")}
                                       | {"skill": s}
                                       for s in skills for seed in seeds] for x in lrs}}
        entry["gap"] = gap(entry)
        records["conditions"][c] = entry
        print(f"{c}: measured, {clock(time.time() - t_start)}", flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(records, f, indent=1)
    table = write_table(records)
    print(table)
    plot(records)


def gap(entry):
    """SDFT minus the better offline variant, greedy and at temperature 1 (means over runs)."""
    mean = lambda m, key: statistics.mean(r[key] for r in entry["methods"][m]["runs"])
    return {key: mean("sdft", key) - max(mean("offline", key), mean("sft-teacher", key))
            for key in ("test", "temperature_1")}


def column(runs, key):
    return mean_sd([r[key] for r in runs])


def write_table(records):
    lines = [f"{len(seeds)} seeds x skills {', '.join(skills)}, each learned alone; test accuracy "
             "after the whole budget, each method at its rate chosen on validation (greedy). "
             "Gap: SDFT minus the better offline variant (offline distillation, SFT on the "
             "teacher's samples). Rates chosen on the mean of the new skill's and the prior "
             "skills' validation accuracy.", ""]
    for c, entry in records["conditions"].items():
        b = entry["base"].values()
        mean = lambda key: statistics.mean(x[key] for x in b)
        shares = lambda who: {k: statistics.mean(x["first_step"][who][k] for x in b)
                              for k in ("0", "1", "later")}
        on, off = shares("student"), shares("teacher")
        lines += [f"### {c}: {entry['label']}", "",
                  f"Base: plain {mean('greedy'):.2f} greedy, {mean('temperature_1'):.2f} at T=1; "
                  f"teacher {mean('teacher_greedy'):.2f}; departure {mean('departure'):.2f}; "
                  f"recovery after a forced slip {mean('recovery'):.2f}, after a rival start "
                  f"{mean('recovery_rival'):.2f} (the teacher: "
                  f"{mean('teacher_recovery_rival'):.2f}). First step's "
                  f"divergence at positions 0 / 1 / later: {on['0']:.2f} / {on['1']:.2f} / "
                  f"{on['later']:.2f} on the student's samples, {off['0']:.2f} / {off['1']:.2f} / "
                  f"{off['later']:.2f} on the teacher's.", "",
                  "| method | lr | greedy | T=1 | prior average | departure | recovery: slip | "
                  "recovery: rival start | kl_from_base |", "|---|---|---|---|---|---|---|---|---|"]
        for m, e in entry["methods"].items():
            rs = e["runs"]
            lines.append(f"| {METHODS[m][2]} | {e['lr']:g} | {column(rs, 'test')} | "
                         f"{column(rs, 'temperature_1')} | {column(rs, 'prior_average')} | "
                         f"{column(rs, 'departure')} | {column(rs, 'recovery')} | "
                         f"{column(rs, 'recovery_rival')} | "
                         f"{column(rs, 'kl_from_base')} |")
        g = entry["gap"]
        lines += ["", f"Gap: {g['test']:+.2f} greedy, {g['temperature_1']:+.2f} at T=1.", ""]
    table = "\n".join(lines)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    return table


def plot(records):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cs = list(records["conditions"])
    fig, axes = plt.subplots(1, len(cs), figsize=(3.2 * len(cs), 3.2), sharey=True, squeeze=False)
    for ax, c in zip(axes[0], cs):
        entry = records["conditions"][c]
        for i, m in enumerate(METHODS):
            rs = entry["methods"][m]["runs"]
            for j, key in enumerate(("test", "temperature_1")):
                values = [r[key] for r in rs]
                ax.bar(i + 0.4 * j, statistics.mean(values), 0.38, color=COLORS[m],
                       alpha=1.0 if j == 0 else 0.45,
                       yerr=statistics.stdev(values) if len(values) > 1 else 0,
                       label=METHODS[m][2] if j == 0 and c == cs[0] else None)
        ax.set_xticks([i + 0.2 for i in range(len(METHODS))])
        ax.set_xticklabels(["SDFT", "offline", "SFT-T", "SFT-D"], fontsize=8)
        ax.set_title(f"{c}:\n{entry['label']}", fontsize=8)
        ax.set_ylim(0, 1.05)
    axes[0][0].set_ylabel("new skill, test (dark: greedy, light: T=1)")
    axes[0][0].legend(fontsize=6, loc="lower left")
    fig.suptitle(f"When does on-policy learning matter? (the paper's Fig. 6 under {len(cs)} "
                 "conditions)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "map.png"), dpi=120)


if __name__ == "__main__":
    main()
