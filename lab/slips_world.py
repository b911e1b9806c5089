"""
The slips world: the skills world, with a base whose teacher mends a begun answer that went wrong,
a miniature of an LLM that writes "wait, let me redo that" (lab/map.py's `slips` condition).

The grader already reads the text after the last '=' (data.final_answer). In this world a wrong
answer can be mended: write '=' and then the right answer. A student that slipped,
`jab cabd>2=2013`, is right. The base learns this only in the teacher's role, from pretraining
examples with a demonstration and a begun answer that departs from it:
- a rival's start (`jab cabd:2 0 1 3=2013\\njab cabd>ca`), as in the skills world,
- or a slip: the demonstration's answer with one token changed (`...>2093` for `2013`),
of any skill, the throw-away ones included. Their target is the mend, `=2013`, begun by none or
part of it. Asked plainly, the base answers as the skills world's base does and never mends: a
student must learn to mend from its teacher, on its own wrong answers, which only on-policy
learning shows it (offline, the teacher's samples are right from the start).

lab/pretrain.py --p-mend makes the base, with the shipped base's settings otherwise.
"""

import json
import random
import zlib

from data import ALPHABETS, final_answer, pretrain_examples


def slipped(rng, answer):
    """The answer with one token replaced by another of its alphabet, cut after the slip or
    later: a begun answer that went wrong."""
    k = rng.randrange(len(answer))
    alphabet = next((a for a in ALPHABETS if answer[k] in a), ALPHABETS[0])
    wrong = answer[:k] + rng.choice([c for c in alphabet if c != answer[k]]) + answer[k + 1:]
    return wrong[:rng.randint(k + 1, len(wrong))]


def mend_examples(rng, n, p_mend, **mixture):
    """n examples of data.pretrain_examples's mixture (with its settings), in which every begun
    answer that departs from the demonstration is mended, and a p_mend share of the other examples
    with a demonstration begins with a slip and is mended: the target is '=' and the
    demonstration's answer, begun by none or part of that mend."""
    prompts, targets = pretrain_examples(rng, n, **mixture)
    for i, prompt in enumerate(prompts):
        if "\n" not in prompt:  # asked plainly: the student's role, never mended
            continue
        head, ask = prompt.split("\n")
        answer = final_answer(head.split(":", 1)[1])  # the demonstration's (own or expert style)
        student, begun = ask.split(">", 1)
        if answer.startswith(begun) and rng.random() < p_mend:
            begun = slipped(rng, answer)
        if answer.startswith(begun):
            continue  # no departure: the target goes on with the answer, as in the skills world
        mend = "=" + answer
        j = rng.randint(0, len(mend) - 1)
        prompts[i], targets[i] = f"{head}\n{student}>{begun}{mend[:j]}", mend[j:]
    return prompts, targets


def slips_signature(p_mend):
    """A fingerprint of the slips world's mixture (a few batches), as world_signature is of the
    skills world's: a slips base is used only for the mixture it was made with."""
    mixture = [mend_examples(random.Random(0), 16, p_mend) for _ in range(4)]
    return f"{zlib.crc32(json.dumps(mixture, sort_keys=True).encode()):08x}"
