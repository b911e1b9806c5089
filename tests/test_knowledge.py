"""
The knowledge world (lab/knowledge_world.py), lab/variants.py's --facts, --cpt and --context,
and lab/knowledge.py, with a tiny model and budget: the formats the student and the teacher see, the
splits (no evaluation entity or document in pretraining), bad input, and the first step's loss of
each method recomputed here.

    python -m pytest -q tests/test_knowledge.py
"""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conftest import run_each  # noqa: E402
import data  # noqa: E402
import lab.knowledge_world as world  # noqa: E402
from data import SKILLS, Tokenizer, encode_prompts, pretrain_examples, sft_batch  # noqa: E402
from lab.knowledge_world import (CONTEXTS, FACTS_PER_DOC, INDIRECT_SKILLS,  # noqa: E402
                                 KNOWN_FACTS, MAX_FACTS, document_examples, documents,
                                 entity_split, fact_examples, fact_prompts, knowledge_facts,
                                 knowledge_pretrain_examples, knowledge_questions)
from lab.variants import agreed_prefix  # noqa: E402
from model import load_checkpoint  # noqa: E402
from sdft import loss_mask, masked_mean, per_token_divergence, rollout, score  # noqa: E402

TOK = Tokenizer()
FACTS = [("zorpxl", "cabd"), ("qtuvwk", "hgf"), ("nmlkos", "jide"), ("wyxvus", "bdf")]
# an entity: 6 letters of k..z, one of u..z, which no skill writes
ENTITY = re.compile(r"\b(?=[k-z]*[u-z])[k-z]{6}\b")


def env():  # one thread per script: on 2 shared cores, more make these runs far slower
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def start(*args):
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# -----------------------------------------------------------------------------
# the world: formats and splits

def test_formats_what_the_student_and_the_teacher_see():
    # a fact each
    assert documents(FACTS) == ["zorpxl is cabd", "qtuvwk is hgf", "nmlkos is jide",
                                "wyxvus is bdf"]
    # pretraining's, of 1 to 3 facts
    assert world.document(FACTS[:2]) == "zorpxl is cabd\nqtuvwk is hgf"
    student, answer, _ = fact_prompts(FACTS, None)[1]
    assert (student, answer) == ("what qtuvwk>", "hgf")
    teachers = {c: fact_prompts(FACTS, c)[1][2] for c in CONTEXTS}
    assert teachers == {"doc+answer": "qtuvwk is hgf\nwhat qtuvwk:hgf\nwhat qtuvwk>",
                        "doc": "qtuvwk is hgf\nwhat qtuvwk>",
                        "answer": "what qtuvwk:hgf\nwhat qtuvwk>"}
    assert all(t.endswith(student) for t in teachers.values())  # both score the same completion
    # expert pairs: SFT's target and the teacher's demonstration are the spelled-out value
    student, answer, teacher = fact_prompts(FACTS, "doc+answer", "expert")[1]
    assert (student, answer, teacher) == ("what qtuvwk>", "h g f=hgf",
                                          "qtuvwk is hgf\nwhat qtuvwk:h g f=hgf\nwhat qtuvwk>")
    # indirect: a prior skill on the value, recalled first; the grader reads the text after '='
    prompts, expected = knowledge_questions(FACTS[:1], "indirect")
    assert prompts == [f"{s} zorpxl>" for s in INDIRECT_SKILLS] and "copy" not in INDIRECT_SKILLS
    assert expected == [SKILLS[s]("cabd") for s in INDIRECT_SKILLS]
    assert world.fact_answer("rev", "cabd") == "cabd=dbac"
    # the oracle
    assert knowledge_questions(FACTS[:1], "indirect", "doc")[0][0] == "zorpxl is cabd\nrev zorpxl>"
    assert knowledge_questions(FACTS, "direct") == ([f"what {e}>" for e, _ in FACTS],
                                                    [v for _, v in FACTS])
    # CPT: the documents are the whole target, with no prompt
    assert document_examples(random.Random(0), FACTS, 3)[0] == ["", "", ""]
    assert set(document_examples(random.Random(0), FACTS, 20)[1]) == set(documents(FACTS))
    with pytest.raises(ValueError, match="unknown context"):
        fact_prompts(FACTS, "answer+doc")


def test_teacher_prompts_fit_the_model():
    facts = knowledge_facts(3 * FACTS_PER_DOC, 0)
    longest = max(len(TOK.encode(t)) for c in CONTEXTS for _, _, t in fact_prompts(facts, c))
    # with train_sdft.py's default --max-new-tokens, in the model's block_size
    assert longest + 32 <= 128
    for _ in range(20):
        prompts, targets = knowledge_pretrain_examples(random.Random(_), 32)
        assert max(len(TOK.encode(p + t)) + 1 for p, t in zip(prompts, targets)) <= 128


def test_facts_are_distinct_reproducible_and_bounded():
    facts = knowledge_facts(200, 1)
    assert facts == knowledge_facts(200, 1) and facts != knowledge_facts(200, 2)
    assert len({e for e, _ in facts}) == len({v for _, v in facts}) == 200
    assert all(ENTITY.fullmatch(e) and len(set(e)) == 6 and 3 <= len(v) <= 6
               and set(v) <= set(data.LETTERS)
               for e, v in facts)
    for n in (0, -1, MAX_FACTS + 1):
        with pytest.raises(ValueError, match="distinct facts"):
            knowledge_facts(n, 0)


def test_splits_do_not_overlap_and_evaluation_never_occurs_in_pretraining():
    evaluation = {e for seed in range(3) for e, _ in knowledge_facts(200, seed)}
    assert all(entity_split(e) == "eval" for e in evaluation)
    assert all(entity_split(e) == "pretrain" for e, _ in KNOWN_FACTS)
    rng, texts = random.Random(0), []
    for _ in range(100):  # the knowledge batches of pretraining, and the skills mixture beside them
        texts += sum(knowledge_pretrain_examples(rng, 32), [])
        skills_texts = sum(pretrain_examples(rng, 32), [])
        assert not any(ENTITY.search(t) for t in skills_texts)  # no 6-letter k..z word there at all
    seen = {e for t in texts for e in ENTITY.findall(t)}
    assert seen and all(entity_split(e) == "pretrain" for e in seen)
    assert {e for e, _ in KNOWN_FACTS} <= seen  # the base meets its known facts
    lines = {line for d in documents(knowledge_facts(200, 0)) for line in d.splitlines()}
    # nor a line of an evaluation document
    assert not any(line in t for line in lines for t in texts)
    # the skills world, and so its shipped base, unchanged
    assert data.world_signature() == "e7a06f33"


# -----------------------------------------------------------------------------
# the scripts and the driver, on a tiny base made by lab/knowledge.py --quick

@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("knowledge")
    r = subprocess.run([sys.executable, "lab/knowledge.py", "--quick", "--facts", "3",
                        "--seeds", "0", "--out", out],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_knowledge_writes_one_record_per_run(quick):
    runs = json.loads((quick / "results.json").read_text())["runs"]
    assert {(r["method"], r["context"], r["variant"]) for r in runs} == {
        ("base", "-", "-"), ("oracle", "-", "-"), ("cpt", "-", "-"), ("sft", "-", "-"),
        ("sdft", "doc+answer", "agreed-prefix"), ("sdft", "doc+answer", "frozen-teacher")
    } | {("sdft", c, "-") for c in CONTEXTS}
    for r in runs:
        assert r["n_facts"] == 3 and r["seed"] == 0
        # the pairs' style, the default
        assert r["demo"] == ("expert" if r["method"] in ("sft", "sdft") else "-")
        assert all(0 <= r[k] <= 1 for k in ("direct", "indirect", "prior_average"))
    assert (quick / "table.md").read_text().startswith("| facts | method")
    assert (quick / "knowledge.png").stat().st_size > 0


def first_loss(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line][0]


def sft_loss(model, prompts, targets):
    ids, mask, target_mask = sft_batch(TOK, prompts, targets)
    with torch.no_grad():
        logits = model(ids[:, :-1], mask[:, :-1])
    token_loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    weights = target_mask[:, 1:].float()
    return ((token_loss * weights).sum() / weights.sum()).item()


def sdft_loss(model, facts, context, seed, agreed=False):
    students, _, teachers = fact_examples(random.Random(seed), facts, 4, context, "expert")
    s_ids, s_mask = encode_prompts(TOK, students)
    t_ids, t_mask = encode_prompts(TOK, teachers)
    with torch.no_grad():  # at step 0 the EMA teacher is the student
        completion, completion_mask = rollout(model, s_ids, s_mask, 32, TOK.eot_id,
                                              torch.Generator().manual_seed(seed))
        student_logits, teacher_logits = score(model, model, s_ids, s_mask, t_ids, t_mask,
                                               completion, completion_mask)
    mask = loss_mask(completion_mask, 0)
    if agreed:
        mask = mask * agreed_prefix(completion, teacher_logits, completion_mask)
    return masked_mean(per_token_divergence(student_logits, teacher_logits), mask).item()


def test_scripts_compute_what_they_say(quick):
    """The first logged loss of lab/knowledge.py's runs, SFT (the direct pairs), CPT (the documents)
    and SDFT under each --context, equals the loss computed here from the same facts (3, seed 0),
    data stream and rollouts (batches of 4: lab/knowledge.py --quick; expert pairs, its default)."""
    model, facts, seed = load_checkpoint(str(quick / "base.pt"))[0].eval(), knowledge_facts(3, 0), 0
    run = lambda name: quick / "runs" / (f"{name}-3facts-seed0" if name == "cpt"
                                         else f"{name}-expert-3facts-seed0")
    assert first_loss(run("sft")) == pytest.approx(
        sft_loss(model, *fact_examples(random.Random(seed), facts, 4, None, "expert")[:2]),
        rel=1e-5)
    assert first_loss(run("cpt")) == pytest.approx(
        sft_loss(model, *document_examples(random.Random(seed), facts, 4)), rel=1e-5)
    losses = [first_loss(run(f"sdft-{c}")) for c in CONTEXTS]
    assert losses == pytest.approx([sdft_loss(model, facts, c, seed) for c in CONTEXTS],
                                   rel=1e-5, abs=1e-6)
    assert len(set(losses)) == len(losses)  # what the teacher sees changes the loss
    agreed = first_loss(run("sdft-doc+answer-agreed-prefix"))
    assert agreed == pytest.approx(sdft_loss(model, facts, "doc+answer", seed, agreed=True),
                                   rel=1e-5, abs=1e-6)
    # the mask changes what is counted
    assert agreed != pytest.approx(losses[CONTEXTS.index("doc+answer")])
    # at the first step, the frozen teacher is the EMA one
    frozen = first_loss(run("sdft-doc+answer-frozen-teacher"))
    assert frozen == pytest.approx(losses[CONTEXTS.index("doc+answer")], rel=1e-6)
    stage = json.loads((run("sft") / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"direct", "indirect", "rev"} <= set(stage["accuracy"]) and stage["kl_from_base"] is None


BAD_INPUTS = [  # (script and flags, text the error line must contain)
    (["lab/variants.py", "train_sdft.py", "--facts", "3", "--context", "docs"],
     "unknown --context 'docs'"),
    (["lab/variants.py", "train_sdft.py", "--facts", str(MAX_FACTS + 1)], "distinct facts"),
    (["lab/variants.py", "train_sft.py", "--cpt"], "--cpt needs --facts"),
    (["lab/variants.py", "train_sdft.py", "--facts", "3", "--cpt"], "--cpt needs --facts"),
    (["lab/pretrain.py", "--p-knowledge", "1.5"], "--p-knowledge"),
    (["lab/knowledge.py", "--facts", f"10,{MAX_FACTS + 1}"], "distinct facts"),
    (["lab/knowledge.py", "--facts", "ten"], "comma-separated integers"),
    (["lab/knowledge.py", "--jobs", "0"], "--jobs must be positive"),
]


def test_bad_input_is_one_error_line(tmp_path):
    """Each bad input: non-zero exit, one line on stderr starting with 'error:', no traceback."""
    done = run_each([[*command, "--out", tmp_path / "bad"] for command, _ in BAD_INPUTS])
    for (command, needle), (returncode, _, stderr) in zip(BAD_INPUTS, done):  # one process
        lines = stderr.strip().splitlines()
        assert returncode != 0 and "Traceback" not in stderr, (command, stderr)
        assert (len(lines) == 1 and lines[0].startswith("error:")
                and needle in lines[0]), (command, stderr)
    assert not (tmp_path / "bad" / "ckpt.pt").exists()


def test_base_of_another_knowledge_world_is_refused(quick, tmp_path):
    """A knowledge base made before the knowledge world changed (its formats or facts) is refused,
    and left as it was: knowledge_signature, as data.world_signature is for the skills."""
    ckpt = torch.load(quick / "base.pt", weights_only=True)
    assert ckpt["knowledge_world"] == world.knowledge_signature()
    ckpt["knowledge_world"] = "0" * 8
    base = tmp_path / "base.pt"
    torch.save(ckpt, base)
    before = base.read_bytes()
    proc = subprocess.run([sys.executable, "lab/knowledge.py", "--quick", "--base", base,
                           "--out", tmp_path / "out"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert (proc.returncode != 0 and len(lines) == 1
            and "another knowledge world" in lines[0]), proc.stderr
    assert base.read_bytes() == before
