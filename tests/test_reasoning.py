"""
The reasoning world (lab/reasoning_world.py), lab/pretrain.py --p-think and lab/reasoning.py,
with a tiny model and budget: the formats the student, the teacher and "at once" see, that the
teacher's demonstration holds no trace, the thinking base's mixture, the signature check of a
thinking base, bad input, and the driver end to end (--quick).

    python -m pytest -q tests/test_reasoning.py
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conftest import run_each  # noqa: E402
import data  # noqa: E402
from data import (PRIOR_SKILLS, SKILLS, Tokenizer, final_answer, known_letters,  # noqa: E402
                  parse_skills, skill_answer, skill_examples, student_prompt)
from lab.knowledge_world import knowledge_signature  # noqa: E402
from lab.reasoning_world import (REASONING_NEW, REASONING_PRIOR, REASONING_RIVALS,  # noqa: E402
                                 REASONING_SKILLS, at_once_prompt, has_trace,
                                 reasoning_plain_answer, reasoning_pretrain_examples,
                                 reasoning_signature, reasoning_trace)
from lab.reasoning import why_not_thinking_base  # noqa: E402

TOK = Tokenizer()


def env():  # one thread per script: on 2 shared cores, more make these runs far slower
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def start(*args):
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# -----------------------------------------------------------------------------
# the world: formats

def test_formats_what_the_student_the_teacher_and_at_once_see():
    # sort the letters, then the skill's prior skill; the trace is the sorted letters
    assert reasoning_trace("bux", "dacb") == "abcd=ac"  # evens
    assert reasoning_trace("kaw", "dacb") == "abcd=bcd"  # drop
    assert reasoning_trace("jug", "dacb") == "abcd=dbca"  # flip
    assert reasoning_trace("hak", "dacb") == "abcd=dabc"  # rotr, a known one
    assert reasoning_trace("bux", "dacb", step="rotr") == "abcd=dabc"  # the rival's second step
    assert skill_answer("bux", "dacb") == REASONING_SKILLS["bux"]("dacb") == "ac"
    assert skill_answer("rev", "dacb") == SKILLS["rev"]("dacb") == "bcad"  # the skills world's
    assert final_answer(reasoning_trace("bux", "dacb")) == "ac"  # what the grader reads
    assert at_once_prompt("bux", "dacb") == "bux dacb>="  # begun where the trace would end
    assert has_trace("abcd=ac") and not has_trace("ac") and not has_trace("=ac")
    for s in REASONING_SKILLS:  # every trace is the sorted letters, the answer after it
        for q in data.eval_queries("test", 20):
            middle, answer = reasoning_trace(s, q).split("=")
            assert middle == "".join(sorted(q)) and answer == skill_answer(s, q)


def test_the_teachers_demonstration_holds_no_trace():
    """--demo-style own, for a reasoning skill, is the final answer alone: SFT's target and the
    teacher's demonstration carry no trace, while the model's own answer does."""
    for s in REASONING_NEW:
        students, demos, teachers = skill_examples(random.Random(0), s, 50, "own")
        for student, demo, teacher in zip(students, demos, teachers):
            query = student[len(s) + 1:-1]
            assert student == student_prompt(s, query) and teacher.endswith("\n" + student)
            assert demo == skill_answer(s, query) and "=" not in demo
            assert demo != "".join(sorted(query))  # not the trace either
            assert teacher == f"{s} {query}:{demo}\n{student}"
            assert has_trace(reasoning_trace(s, query))


def test_the_skills_world_is_unchanged(monkeypatch):
    assert (data.world_signature(), knowledge_signature()) == ("e7a06f33", "745d448f")
    assert not set(REASONING_SKILLS) & set(SKILLS)  # a separate registry: data.LAB_SKILLS
    assert not set("".join(REASONING_NEW)) & set("".join(PRIOR_SKILLS))  # the names' rule
    assert parse_skills("bux,jab") == ["bux", "jab"]  # importing the world added its skills
    monkeypatch.setattr(data, "LAB_SKILLS", {})
    with pytest.raises(ValueError, match="unknown skill 'bux'"):
        parse_skills("bux")  # where a script did not ask for the reasoning world


def test_the_thinking_mixture():
    """Prior skills answered at once, every other skill with its trace; a reasoning skill's
    demonstration is its answer alone; a new skill begun as the base's plain answer goes on with
    the skill's own answer until the begun text departs from it, then as begun."""
    rng, seen = random.Random(0), set()
    for _ in range(60):
        prompts, targets = reasoning_pretrain_examples(rng, 32)
        assert max(len(TOK.encode(p + t)) + 1 for p, t in zip(prompts, targets)) <= 128
        for prompt, target in zip(prompts, targets):
            head, _, student = prompt.rpartition("\n")
            skill, query = student.split(">")[0].split(" ")
            begun = student.split(">", 1)[1]
            if skill in PRIOR_SKILLS:
                seen.add("prior")
                assert target == PRIOR_SKILLS[skill](query)  # at once
                continue
            if skill in REASONING_NEW:
                plain = reasoning_plain_answer(skill, query, 0.4)
                own = reasoning_trace(skill, query)
                if not head:  # asked plainly: right on its known letters, the rival's elsewhere
                    assert target == plain
                    seen.add("new known" if plain == own else "new rival")
                else:
                    assert plain.startswith(begun)
                    assert begun + target == (own if own.startswith(begun) else plain)
                    seen.add("new begun")
            elif skill in REASONING_PRIOR:
                assert target == reasoning_trace(skill, query)
                seen.add("known")
            else:  # throw-away: only with a demonstration, read after the trace
                assert head and target == "".join(sorted(query)) + "=" + head.split(":")[1]
                seen.add("random")
            if head and skill in REASONING_SKILLS:  # the demonstration: the answer alone
                assert head == f"{skill} {query}:{skill_answer(skill, query)}"
    assert seen == {"prior", "new known", "new rival", "new begun", "known", "random"}
    assert reasoning_pretrain_examples(random.Random(3), 8) == \
        reasoning_pretrain_examples(random.Random(3), 8)
    for s in REASONING_NEW:  # the rival starts elsewhere after the trace, on every query
        for q in data.eval_queries("train", 200, seed="rule"):
            assert skill_answer(s, q)[0] != PRIOR_SKILLS[REASONING_RIVALS[s]]("".join(sorted(q)))[0]
        assert len(known_letters(s, 0.4)) == 4


# -----------------------------------------------------------------------------
# the thinking base and the driver

@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """lab/reasoning.py --quick: a tiny thinking base, one skill, one seed, a rate each."""
    out = tmp_path_factory.mktemp("reasoning")
    r = subprocess.run([sys.executable, "lab/reasoning.py", "--quick", "--skills", "bux",
                        "--seeds", "0", "--out", out], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_driver_writes_one_record_per_run(quick):
    results = json.loads((quick / "results.json").read_text())
    runs = results["runs"]
    assert [r["method"] for r in runs] == ["base", "sft", "sdft"]
    for r in runs:
        assert r["skill"] == "bux" and r["seed"] == 0 and r["chosen"]
        assert {"accuracy", "trace_rate", "mean_tokens", "prior_average"} <= set(r)
        assert all(0 <= r[k] <= 1 for k in ("accuracy", "trace_rate", "prior_average"))
        assert set(r["prior"]) == set(PRIOR_SKILLS)  # each prior skill, for the worst one
        assert abs(sum(r["prior"].values()) / len(r["prior"]) - r["prior_average"]) < 1e-9
    config = results["config"]
    assert config["reasoning_world"] == reasoning_signature() and config["quick"]
    assert config["rates"] == {"sft": [3e-4], "sdft": [3e-5]}
    assert "answer-only" in config["demonstrations"]
    command = json.loads((quick / "runs" / "sdft-lr3e-05-bux-seed0" / "command.json").read_text())
    assert command["command"][command["command"].index("--demo-style") + 1] == "own"
    assert (quick / "table.md").read_text().startswith("Reasoning without reasoning data")
    assert (quick / "reasoning.png").stat().st_size > 0


def test_the_thinking_base_records_its_world(quick, tiny_base):
    """A thinking base records reasoning_signature(); a base of the skills world, or of
    another reasoning world, is not one."""
    settings = {"steps": 20, "n_layer": 1, "n_head": 2, "n_embd": 32, "p_think": 1.0}
    ckpt = torch.load(quick / "base.pt", weights_only=True)
    assert ckpt["reasoning_world"] == reasoning_signature()
    assert why_not_thinking_base(ckpt, settings) is None
    skills_base = torch.load(tiny_base, weights_only=True)
    assert skills_base["reasoning_world"] is None
    assert "not a thinking base" in why_not_thinking_base(skills_base, settings)
    ckpt["reasoning_world"] = "0" * 8
    assert "another reasoning world" in why_not_thinking_base(ckpt, settings)


BAD_INPUTS = [  # (script and flags, text the error line must contain)
    (["lab/reasoning.py", "--skills", "jab"], "unknown new reasoning skill 'jab'"),
    (["lab/reasoning.py", "--seeds", "x"], "comma-separated integers"),
    (["lab/pretrain.py", "--p-think", "1.5"], "--p-think"),
]


def test_bad_input_and_other_bases_are_refused_in_one_line(quick, tiny_base, tmp_path):
    """Each bad input, and a base of the skills world or of another reasoning world: non-zero
    exit, one line on stderr starting with 'error:', no traceback, the base left as it was.
    Beside them (all side by side), lab/pretrain.py --p-think 0, the default, draws nothing of
    the reasoning world: it makes the skills world's base, bit for bit."""
    ckpt = torch.load(quick / "base.pt", weights_only=True)
    ckpt["reasoning_world"] = "0" * 8
    other, again = tmp_path / "other.pt", tmp_path / "again.pt"
    torch.save(ckpt, other)
    before = other.read_bytes()
    cases = BAD_INPUTS + [(["lab/reasoning.py", "--quick", "--base", other],
                           "another reasoning world"),
                          (["lab/reasoning.py", "--quick", "--base", tiny_base],
                           "not a thinking base")]
    pretrain = start("lab/pretrain.py", "--steps", "3", "--n-layer", "1", "--n-head", "2",
                     "--n-embd", "32", "--device", "cpu", "--p-think", "0", "--out", again)
    done = run_each([[*command, "--out", tmp_path / "bad"] for command, _ in cases])  # 1 process
    for (command, needle), (returncode, _, stderr) in zip(cases, done):
        lines = stderr.strip().splitlines()
        assert returncode != 0 and "Traceback" not in stderr, (command, stderr)
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], stderr
    assert other.read_bytes() == before
    assert pretrain.wait(timeout=120) == 0
    weights = torch.load(again, weights_only=True)["model"]
    skills_base = torch.load(tiny_base, weights_only=True)["model"]
    assert all(torch.equal(weights[k], v) for k, v in skills_base.items())
