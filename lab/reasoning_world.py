"""
The reasoning world: skills that take two steps, a base that thinks before it answers, and
demonstrations that hold the answer alone (the paper's Table 2, Olmo-3-7B-Think on medicine).
lab/reasoning.py runs the study. Importing this module adds the world's skills to
data.LAB_SKILLS, so that the training scripts learn them by name (lab/variants.py
--reasoning); lab/pretrain.py --p-think makes the thinking base.
"""

import json
import random
import zlib

from data import (LAB_SKILLS, PRIOR_SKILLS, SKILLS, demonstration, final_answer, known_letters,
                  random_name_and_positions, sample_query, skill_answer, student_prompt,
                  teacher_prompt)

# demonstrations that hold the answer alone (the paper's Table 2, Olmo-3-7B-Think on medicine)
#
# A reasoning skill sorts the query's letters, then applies a prior skill to the sorted letters:
# two steps in turn. The model's own answer carries a short trace, the first step's result, then
# '=' and the answer, which is what the grader reads (final_answer):
# - student prompt  `bux dacb>`              own answer `abcd=ac` (sorted, then evens)
# - at once         `bux dacb>=`             the completion starts where the trace would end
# - teacher prompt  `bux dacb:ac\nbux dacb>` the demonstration is the answer alone, as the
#                   paper's medical answers hold no reasoning (demonstration(answer, "own"))
# At once, the answer needs each letter's rank among the query's (the second smallest, every
# second one); with the trace, each token is one easy step from the last. The base never answers
# these skills at once (lab/reasoning.py measures what it does when made to, and SFT on answers
# alone how fast it learns to).
# The base (lab/pretrain.py --p-think 1) meets the prior skills, which it answers at once, the
# known reasoning skills, always with the trace, and each new one on 4 of 10 first letters
# (data.known_letters; elsewhere its answer is its rival's second step). With an answer-only
# demonstration it still thinks first, then writes the demonstration's answer: throw-away
# reasoning skills that only appear with one teach it to. Every skill that is not a prior skill
# thinks. These skills are not in SKILLS: the skills world, its signature and its base stay
# as they were.

# name -> the prior skill applied to the sorted letters
REASONING_PRIOR = {"qam": "copy", "wub": "rev", "hak": "rotr", "jaw": "ends"}  # known to the base
REASONING_NEW = {"bux": "evens", "kaw": "drop", "jug": "flip"}  # learned later, answer-only
# the second step the base takes where it does not know a new skill: its answer starts elsewhere
REASONING_RIVALS = {"bux": "rotr", "kaw": "copy", "jug": "ends"}


def reasoning_trace(skill, query, step=None):
    """A reasoning skill's own answer, `abcd=ac`: the query's letters sorted, '=', then the
    skill's prior skill (or `step`, a rival's) applied to them."""
    middle = "".join(sorted(query))
    return f"{middle}={PRIOR_SKILLS[step or (REASONING_PRIOR | REASONING_NEW)[skill]](middle)}"


# name -> final answer, as SKILLS holds the skills world's
REASONING_SKILLS = {s: lambda q, s=s: final_answer(reasoning_trace(s, q))
                    for s in REASONING_PRIOR | REASONING_NEW}
LAB_SKILLS.update(REASONING_SKILLS)  # importing this world lets every script learn its skills


def has_trace(text):
    """Whether an answer thinks first: something, then '=' (an answer at once has no '=')."""
    return "=" in text and not text.startswith("=")


def at_once_prompt(skill, query):
    """The student prompt with the completion begun where the trace would end: `bux dacb>=`."""
    return student_prompt(skill, query) + "="


def reasoning_plain_answer(skill, query, p_right):
    """What the base is taught to answer plainly: with the rival's second step where it does not
    know a new skill (as plain_answer does for the skills world), else the skill's own."""
    if skill in REASONING_NEW and query[0] not in known_letters(skill, p_right):
        return reasoning_trace(skill, query, REASONING_RIVALS[skill])
    return reasoning_trace(skill, query)


def random_reasoning_skill(rng):
    """A throw-away reasoning skill, for pretraining with a demonstration only: a random name; its
    second step picks the sorted letters at random positions, in order. Its answer can only be
    read off the demonstration, after the trace."""
    name, positions = random_name_and_positions(rng, {**SKILLS, **REASONING_SKILLS})
    positions = sorted(positions)  # read in the sorted letters' order

    def trace(q):
        middle = "".join(sorted(q))
        return f"{middle}=" + "".join(middle[i] for i in positions if i < len(q))
    return name, trace


def reasoning_pretrain_examples(rng, n, p_plain=0.5, p_prior=0.4, p_random=0.5, p_new=0.06,
                                p_right=0.4):
    """n examples of the thinking base's mixture. With probability p_plain the whole batch is asked
    plainly, else every example has a demonstration. Each is a given new reasoning skill with
    probability p_new (answered as reasoning_plain_answer says), else a prior skill with
    probability p_prior (answered at once; its demonstration own or expert), else a known
    reasoning skill or (with a demonstration, probability p_random) a throw-away one. A reasoning
    skill's demonstration is its final answer alone, and its target the trace and the answer:
    shown the answer, the model still thinks first. A new skill with a demonstration has its plain
    answer begun, from no token to all of it: the target writes the skill's own answer while the
    begun text agrees with it and goes on as begun after it departs (as pretrain_examples does:
    the teacher reads a student's start)."""
    plain = rng.random() < p_plain
    prompts, targets = [], []
    for _ in range(n):
        query, start, style = sample_query(rng, "train"), "", "own"
        if rng.random() < p_new * len(REASONING_NEW):
            skill = rng.choice(list(REASONING_NEW))
            answer = reasoning_plain_answer(skill, query, p_right)
            own = reasoning_trace(skill, query)
            if not plain:  # begun with k tokens of the plain answer
                k = rng.randint(0, len(answer))
                start, answer = answer[:k], (own if own.startswith(answer[:k]) else answer)[k:]
            demo = final_answer(own)
        elif rng.random() < p_prior:
            skill = rng.choice(list(PRIOR_SKILLS))
            answer = demo = PRIOR_SKILLS[skill](query)  # prior skills are answered at once
            style = rng.choice(["own", "expert"])
        elif plain or rng.random() >= p_random:
            skill = rng.choice(list(REASONING_PRIOR))
            answer = reasoning_trace(skill, query)
            demo = final_answer(answer)
        else:
            skill, trace = random_reasoning_skill(rng)
            answer = trace(query)
            demo = final_answer(answer)
        if plain:
            prompts.append(student_prompt(skill, query))
        else:
            prompts.append(teacher_prompt(skill, query, demonstration(demo, style)) + start)
        targets.append(answer)
    return prompts, targets


def reasoning_signature():
    """A fingerprint of the reasoning world, as world_signature is of the skills world's: the
    skills, their traces and formats on a probe, and a few batches of the thinking base's
    mixture. A thinking base is used only for the world it was made for (lab/reasoning.py)."""
    probe = "dacbfe"
    world = {"prior": REASONING_PRIOR, "new": REASONING_NEW, "rivals": REASONING_RIVALS,
             "formats": [[reasoning_trace(s, probe), at_once_prompt(s, probe),
                          teacher_prompt(s, probe, demonstration(skill_answer(s, probe), "own"))]
                         for s in REASONING_SKILLS],
             "mixture": [reasoning_pretrain_examples(random.Random(0), 16) for _ in range(4)]}
    return f"{zlib.crc32(json.dumps(world, sort_keys=True).encode()):08x}"
