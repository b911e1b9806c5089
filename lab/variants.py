"""
The paper's ablations, this project's own variants and the lab's other worlds, each one flag:
this script runs a training script (or eval.py) with a few of its functions replaced, and
passes every other flag on. The main scripts stay the paper's recipe.

    python lab/variants.py train_sdft.py --rollout teacher --teacher base   # offline distillation
    python lab/variants.py train_sdft.py --rollout teacher --teacher base --loss ce
                                                        # SFT on the teacher's samples (Fig. 6)
    python lab/variants.py train_sdft.py --teacher base --teacher-ckpt SFT --teacher-sees query
                                                        # re-invoke (Table 5): no demonstration
    python lab/variants.py train_sdft.py --teacher-sees other     # an unsure teacher (lab/map.py)
    python lab/variants.py train_sdft.py --agreed-prefix          # not in the paper
    python lab/variants.py train_sdft.py --facts 10 --context doc # the knowledge world (Table 1)
    python lab/variants.py train_sft.py --facts 10 --cpt          # continued pretraining on docs
    python lab/variants.py train_sdft.py --reasoning --skills bux # the reasoning world (Table 2)

What each flag replaces, and so changes:
  --rollout, --loss, --teacher-sees, --agreed-prefix
        sdft.sdft_loss, by variant_loss below: who samples, the per-token loss, the teacher's
        prompt, the mask (each a line or two of it)
  --teacher-sees other
        training.examples: the teacher's demonstration is another query's (it must infer the
        skill)
  --teacher-ckpt
        sdft.make_teacher: the teacher's weights come from another checkpoint
  --facts, --context, --cpt
        training.py's world functions, by the knowledge world's (lab/knowledge_world.py)
  --reasoning
        nothing: importing lab/reasoning_world.py adds its skills to data.LAB_SKILLS
These flags are recorded with the script's own in every checkpoint, and --resume checks them.
"""

import argparse
import functools
import importlib
import os
import runpy
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import sdft  # noqa: E402
import training  # noqa: E402
from model import load_checkpoint  # noqa: E402
from sdft import (loss_mask, make_teacher, masked_mean, per_token_divergence,  # noqa: E402
                  rollout, score, step_record)

SCRIPTS = ("train_sdft.py", "train_sft.py", "eval.py")


def sampled_cross_entropy(student_logits, completion):
    """SFT on given tokens, (B, C, V) -> (B, C): -log S(y) at each completion token y. Used on
    the teacher's own samples, it is the paper's "SFT on teacher samples" ablation (Sec. 4.6):
    the student imitates what the teacher wrote, instead of matching what it would say."""
    log_s = student_logits.float().log_softmax(-1)
    return -log_s.gather(-1, completion[..., None]).squeeze(-1)


def agreed_prefix(completion, teacher_logits, completion_mask):
    """Which completion tokens lie on a prefix the teacher would have written: 1 up to and
    including the first token that is not the teacher's most likely one, 0 after it, (B, C).
    After a token the teacher would not write, its targets come from a context it never meets
    (in the toy: it goes on copying the demonstration position by position; results/studies).
    Not in the paper: a variant for the toy's accumulation study."""
    wrong = (completion != teacher_logits.argmax(-1)).long()
    wrong_before = wrong.cumsum(dim=1) - wrong  # tokens the teacher wouldn't write, before each
    return completion_mask * (wrong_before == 0)


def variant_loss(student, teacher, student_ids, student_mask, teacher_ids, teacher_mask,
                 max_new_tokens, eot_id, alpha=0.0, skip=0, generator=None, *,
                 rollout_by="student", loss="kl", teacher_sees="demo", agreed=False):
    """sdft.sdft_loss with the variants' switches; with none of them, the same computation."""
    if teacher_sees == "query":  # re-invoke: the teacher is asked exactly as the student is
        teacher_ids, teacher_mask = student_ids, student_mask
    t0 = time.time()
    sampler = ((getattr(student, "module", student), student_ids, student_mask)
               if rollout_by == "student" else (teacher, teacher_ids, teacher_mask))  # offline
    completion, completion_mask = rollout(*sampler, max_new_tokens, eot_id, generator)
    rollout_s = time.time() - t0
    student_logits, teacher_logits = score(student, teacher, student_ids, student_mask,
                                           teacher_ids, teacher_mask, completion, completion_mask)
    if loss == "kl":
        per_token = per_token_divergence(student_logits, teacher_logits, alpha)
    else:  # the teacher's logits are not used: only its sampled tokens are
        per_token = sampled_cross_entropy(student_logits, completion)
    mask = loss_mask(completion_mask, skip)
    if agreed:
        mask = mask * agreed_prefix(completion, teacher_logits, completion_mask)
    return masked_mean(per_token, mask), step_record(completion, completion_mask, mask,
                                                     student_logits, teacher_logits, per_token,
                                                     rollout_s, eot_id)


def other_query_prompt(rng, skill, query, demo_style):
    """The teacher's prompt with the demonstration of another query of the skill (drawn from the
    training split), then the student's prompt: the teacher must generalise from one example."""
    other = query
    while other == query:
        other = data.sample_query(rng, "train")
    demo = data.demonstration(data.skill_answer(skill, other), demo_style)
    return data.teacher_prompt(skill, other, demo).split("\n")[0] + "\n" + \
        data.student_prompt(skill, query)


def other_query_examples(rng, skill, n, demo_style):
    """training.examples with other_query_prompt as each teacher prompt."""
    students, demos, _ = data.skill_examples(rng, skill, n, demo_style)
    queries = [student.split(" ")[1][:-1] for student in students]  # 'jab cabd>' -> 'cabd'
    return students, demos, [other_query_prompt(rng, skill, q, demo_style) for q in queries]


def teacher_from(teacher_model):
    """make_teacher, with the teacher's weights from another model (a frozen copy of it)."""
    def make(student, kind):
        device = next(student.parameters()).device
        return make_teacher(teacher_model.to(device), kind)  # sdft.py's own
    return make


def use_knowledge(facts, context, cpt):
    """The knowledge world in place of training.py's skills: one stage, 'knowledge', whose
    queries are the facts asked directly (with --cpt, SFT on their documents); validation asks
    them, and each stage ends with them asked directly and through a prior skill."""
    from lab.knowledge_world import (document_examples, fact_examples, knowledge_accuracy,
                                     longest_fact_prompt)

    def examples(rng, skill, n, demo_style):
        if cpt:  # continued pretraining: all of the documents' text is the target
            return (*document_examples(rng, facts, n), None)
        return fact_examples(rng, facts, n, context, demo_style)

    def stage_accuracies(model, base, tok, skill, device, n):
        accuracy, val_accuracy = training.every_skill_accuracy(model, tok, device, n)
        accuracy |= {kind: knowledge_accuracy(model, tok, facts, device, kind)
                     for kind in ("direct", "indirect")}  # the OOD column: indirect
        return accuracy, val_accuracy, None

    training.parse_skills = lambda args: ["knowledge"]
    training.examples = examples
    training.longest_teacher_prompt = lambda tok, skills, style: longest_fact_prompt(
        tok, facts, context, style)
    training.validation_accuracy = lambda model, tok, skill, device, n: knowledge_accuracy(
        model, tok, facts, device, "direct")
    training.stage_accuracies = stage_accuracies


def main():
    parser = argparse.ArgumentParser(description=__doc__, add_help=False, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("script", choices=SCRIPTS, help="the script to run with the variants")
    add("--rollout", default="student", choices=["student", "teacher"], help="who samples the "
        "answers: the student (on-policy, SDFT) or the teacher (offline: the paper's ablations)")
    add("--loss", default="kl", choices=["kl", "ce"], help="kl: the divergence of --alpha over "
        "the full vocabulary; ce: cross-entropy on the sampled tokens (SFT on them)")
    add("--teacher-sees", default="demo", choices=["demo", "query", "other"], help="the "
        "teacher's prompt: the query with a demonstration (SDFT), the query alone (re-invoke), "
        "or another query's demonstration then the query (an unsure teacher)")
    add("--teacher-ckpt", default=None, help="with --teacher base: the teacher's weights from "
        "this checkpoint instead of --init (SFT + re-invoke: the base teaches the SFT model)")
    add("--agreed-prefix", action="store_true", help="count only the tokens up to and "
        "including the first one that is not the teacher's most likely (not in the paper)")
    add("--facts", type=int, default=0, help="learn this many facts of the knowledge world "
        "(knowledge_facts of --seed) instead of --skills (0: skills)")
    add("--context", default="doc+answer", help="with --facts: what the teacher sees before "
        "the question, doc+answer, doc or answer (the paper's App. A.2 ablation)")
    add("--cpt", action="store_true", help="with --facts and train_sft.py: continued "
        "pretraining, next-token training on the facts' documents")
    add("--reasoning", action="store_true", help="the reasoning world's skills too")
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        parser.print_help()
        return
    lab_args, rest = parser.parse_known_args()
    # the script's own flags that the checks below need (they stay in `rest`)
    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    peek.add_argument("--teacher", default="ema")
    peek.add_argument("--alpha", type=float, default=0.0)
    peek.add_argument("--seed", type=int, default=0)
    peek.add_argument("--init", default="results/base/ckpt.pt")
    script, _ = peek.parse_known_args(rest)
    try:
        facts, teacher_model = check(lab_args, script)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if lab_args.rollout != "student" or lab_args.loss != "kl" or \
            lab_args.teacher_sees == "query" or lab_args.agreed_prefix:
        sdft.sdft_loss = functools.partial(variant_loss, rollout_by=lab_args.rollout,
                                           loss=lab_args.loss, teacher_sees=lab_args.teacher_sees,
                                           agreed=lab_args.agreed_prefix)
    if lab_args.teacher_ckpt:
        sdft.make_teacher = teacher_from(teacher_model)
    if lab_args.teacher_sees == "other":
        training.examples = other_query_examples
    if lab_args.facts:
        use_knowledge(facts, lab_args.context, lab_args.cpt)
    if lab_args.reasoning:
        importlib.import_module("lab.reasoning_world")  # adds its skills to data.LAB_SKILLS
    training.LAB_SETTINGS.update({k: v for k, v in vars(lab_args).items()  # the ones set
                                  if k != "script" and v != parser.get_default(k)})
    sys.argv = [lab_args.script, *rest]
    runpy.run_path(os.path.join(ROOT, lab_args.script), run_name="__main__")


def check(lab_args, script):
    """Raise ValueError (one sentence) for a combination that is not a variant; return the
    facts of --facts and the model of --teacher-ckpt (each None without its flag)."""
    sdft_only = (lab_args.rollout != "student" or lab_args.loss != "kl" or lab_args.agreed_prefix
                 or lab_args.teacher_sees != "demo" or lab_args.teacher_ckpt
                 or lab_args.context != "doc+answer")
    if sdft_only and lab_args.script != "train_sdft.py":
        raise ValueError("--rollout, --loss, --teacher-sees, --teacher-ckpt, --agreed-prefix and "
                         "--context change train_sdft.py: name it")
    if lab_args.loss == "ce" and (lab_args.rollout == "student" or script.alpha != 0):
        raise ValueError("--loss ce needs --rollout teacher, not --rollout student (the student "
                         "would imitate its own samples), and has no --alpha (no divergence)")
    if (lab_args.teacher_ckpt or lab_args.teacher_sees == "query") and script.teacher != "base":
        raise ValueError("--teacher-ckpt and --teacher-sees query need --teacher base")
    if lab_args.cpt and not (lab_args.facts and lab_args.script == "train_sft.py"):
        raise ValueError("--cpt trains on the facts' documents: --cpt needs --facts and "
                         "train_sft.py")
    if lab_args.facts and lab_args.script == "eval.py":
        raise ValueError("--facts runs a training script, not eval.py")
    teacher = None
    if lab_args.teacher_ckpt:
        teacher, student = (load_checkpoint(p)[0] for p in (lab_args.teacher_ckpt, script.init))
        if teacher.config.vocab_size != student.config.vocab_size:
            raise ValueError(f"--teacher-ckpt {lab_args.teacher_ckpt} has another vocabulary "
                             "than --init: the teacher must score the student's tokens")
    from lab.knowledge_world import CONTEXTS, knowledge_facts
    if lab_args.context not in CONTEXTS:  # checked here, not by argparse: one error line
        raise ValueError(f"unknown --context '{lab_args.context}' ({', '.join(CONTEXTS)})")
    if lab_args.context != "doc+answer" and not lab_args.facts:
        raise ValueError("--context is what the teacher sees of a fact: --context needs --facts")
    return knowledge_facts(lab_args.facts, script.seed) if lab_args.facts else None, teacher


if __name__ == "__main__":
    main()
