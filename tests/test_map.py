"""
Tests of the on-policy map (lab/map.py) and its worlds: the slips world's mended examples
(lab/slips_world.py), the unsure teacher's prompts (lab/variants.py --teacher-sees other), and
the map end to end on a tiny budget.

    python -m pytest -q tests/test_map.py
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conftest import run_each  # noqa: E402
from data import (ALPHABETS, NEW_SKILLS, final_answer, pretrain_examples,  # noqa: E402
                  skill_answer)
from lab.slips_world import mend_examples, slipped  # noqa: E402
from lab.variants import other_query_examples  # noqa: E402


def test_slipped_changes_one_token_in_its_alphabet():
    rng = random.Random(0)
    for answer in ["0213", "klmn", "ab", "7"]:
        for _ in range(50):
            begun = slipped(rng, answer)
            diffs = [i for i, (a, b) in enumerate(zip(begun, answer)) if a != b]
            assert len(diffs) == 1 and diffs[0] == max(diffs)  # one slip, the begun text after it
            k = diffs[0]
            assert any(answer[k] in a and begun[k] in a for a in ALPHABETS)
            assert begun[:k] == answer[:k] and len(begun) <= len(answer)


def test_mend_examples_mend_every_departure_and_never_a_plain_answer():
    """With p_mend 1 every example with a demonstration begins off its answer and its target
    mends it ('=' then the demonstration's answer); plain examples are the skills world's."""
    rng, mended = random.Random(1), 0
    for _ in range(40):
        for prompt, target in zip(*mend_examples(rng, 16, 1.0)):
            if "\n" not in prompt:
                assert "=" not in target and ">" in prompt
                continue
            head, ask = prompt.split("\n")
            answer = final_answer(head.split(":", 1)[1])
            begun = ask.split(">", 1)[1]
            assert not answer.startswith(begun)  # every one went wrong
            assert final_answer(begun + target) == answer  # and is mended
            mended += 1
    assert mended > 100
    # p_mend 0: only the skills world's own departures (a new skill's rival start) are mended
    for seed in range(40):  # the same batch before the mending
        ours = mend_examples(random.Random(seed), 16, 0.0)
        theirs = pretrain_examples(random.Random(seed), 16)
        for (p, t), (p0, t0) in zip(zip(*ours), zip(*theirs)):
            if "\n" not in p0 or final_answer(p0.split("\n")[0].split(":", 1)[1]).startswith(
                    p0.split(">", 1)[1]):
                assert (p, t) == (p0, t0)  # plain, or no departure: as it was
            else:  # a rival's start, mended: the same begun text, then none or part of the mend
                answer = final_answer(p0.split("\n")[0].split(":", 1)[1])
                assert p.startswith(p0) and final_answer(p.split(">", 1)[1] + t) == answer


def test_other_query_teacher_sees_another_querys_demonstration():
    students, demos, teachers = other_query_examples(random.Random(3), "mug", 32, "expert")
    for student, demo, teacher in zip(students, demos, teachers):
        head, ask = teacher.split("\n")
        skill, shown = head.split(":")[0].split(" ")
        query = student.split(" ")[1][:-1]
        assert ask == student and skill == "mug" and shown != query
        assert final_answer(head.split(":", 1)[1]) == skill_answer("mug", shown)
        assert final_answer(demo) == NEW_SKILLS["mug"](query)  # SFT's demonstration: its own


def test_map_end_to_end(tmp_path):
    """Two conditions, one rate, skill and seed, 2 steps: every method is run and measured, the
    unsure condition's SFT on demonstrations is today's run, and the table is written."""
    out = tmp_path / "map"
    r = subprocess.run([sys.executable, "lab/map.py", "--quick", "--conditions", "unsure,slips",
                        "--lrs", "1e-4", "--seeds", "0", "--skills", "jab", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results["conditions"]) == ["unsure", "slips"]
    for c, entry in results["conditions"].items():
        shares = entry["base"]["jab"]["first_step"]
        for who in ("student", "teacher"):
            assert abs(sum(shares[who][k] for k in ("0", "1", "later")) - 1) < 1e-6
        assert set(entry["methods"]) == {"sdft", "offline", "sft-teacher", "sft-demos"}
        for m, e in entry["methods"].items():
            assert e["lr"] == 1e-4 and len(e["runs"]) == 1
            run = e["runs"][0]
            for key in ("test", "temperature_1", "departure", "recovery", "recovery_rival",
                        "prior_average"):
                assert 0 <= run[key] <= 1
            shared = c == "unsure" and m == "sft-demos"
            assert os.path.basename(run["out"]).startswith("today-" if shared else c + "-")
        assert "gap" in entry
    table = (out / "table.md").read_text()
    assert "### unsure" in table and "### slips" in table and "Gap:" in table
    assert (out / "map.png").exists()


def test_map_bad_input_one_line():
    commands = [["lab/map.py", "--conditions", "today,nope"], ["lab/map.py", "--lrs", "x"],
                ["lab/map.py", "--lrs=-1e-4"], ["lab/map.py", "--seeds", ""]]
    for (code, out, err), expected in zip(run_each(commands),
                                          ["nope", "--lrs", "--lrs", "--seeds"]):
        assert code == 1 and expected in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1
