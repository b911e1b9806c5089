"""
Tests of data.py: the tokenizer, the skills and prompt formats, the SFT batch masks, the
query splits, and reproducible example streams.

    python -m pytest -q tests/test_data.py
"""

import itertools
import random

import pytest
import torch

from data import (CHARS, LETTERS, MAX_LEN, MIN_LEN, NEW_SKILLS, PRIOR_SKILLS, RIVALS, SKILLS, demonstration,
                  encode_prompts, eval_queries, final_answer, parse_skills, pretrain_examples,
                  random_skill, sample_query, sft_batch, skill_examples, split_of, student_prompt,
                  teacher_prompt)

QUERIES = ["abc", "cabd", "jihgfed", "aaaa", "badcfe"]


def parse_student(prompt):
    """'rev cabd>' -> ('rev', 'cabd')"""
    assert prompt.endswith(">")
    skill, query = prompt[:-1].split(" ")
    return skill, query


def parse_teacher(prompt):
    """'rev cabd:d b a c=dbac\\nrev cabd>' -> ('rev', 'cabd', 'd b a c=dbac'), checking the
    teacher prompt ends with the student prompt for the same question."""
    head, student = prompt.split("\n")
    question, demo = head.split(":", 1)
    skill, query = question.split(" ")
    assert student == student_prompt(skill, query)
    return skill, query, demo


# -----------------------------------------------------------------------------
# tokenizer

def every_toy_string():
    texts = list(CHARS) + [CHARS]
    for skill, fn in SKILLS.items():
        for q in QUERIES:
            texts.append(student_prompt(skill, q))
            texts.append(fn(q))
            for style in ("own", "expert"):
                texts.append(demonstration(fn(q), style))
                texts.append(teacher_prompt(skill, q, demonstration(fn(q), style)))
    rng = random.Random(0)
    for _ in range(10):  # both batch formats turn up in 10 batches (p_plain 0.6)
        prompts, targets = pretrain_examples(rng, 16)
        texts += prompts + targets
    students, demos, teachers = skill_examples(random.Random(1), "swap", 8, "expert")
    return texts + students + demos + teachers


def test_tokenizer_round_trip(tok):
    texts = every_toy_string()
    assert any("\n" in t for t in texts) and any(":" in t for t in texts)  # teacher prompts are in there
    for text in texts:
        ids = tok.encode(text)
        assert len(ids) == len(text)  # one token per character
        assert all(0 <= i < tok.vocab_size and i != tok.eot_id for i in ids)
        assert tok.decode(ids) == text


def test_tokenizer_vocabulary(tok):
    """One id per character of CHARS, all different, plus end-of-text: 42 tokens."""
    ids = [tok.encode(c) for c in CHARS]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == len(CHARS)
    assert tok.vocab_size == len(CHARS) + 1 == 42
    assert tok.eot_id == len(CHARS)


@pytest.mark.parametrize("text", ["A", "abc!", "é", "rev abc>\t", "<|endoftext|>", "abc.def"])
def test_encode_rejects_characters_outside_the_alphabet(tok, text):
    with pytest.raises(ValueError, match="outside the toy alphabet"):
        tok.encode(text)


def test_decode_stops_at_eot(tok):
    ids = tok.encode("dbac") + [tok.eot_id] + tok.encode("xyz")
    assert tok.decode(ids) == "dbac"
    assert tok.decode([tok.eot_id] + tok.encode("abc")) == ""
    assert tok.decode(torch.tensor(tok.encode("ab") + [tok.eot_id, tok.eot_id]).tolist()) == "ab"


# -----------------------------------------------------------------------------
# batches

def test_sft_batch_masks(tok):
    """loss_mask is 1 exactly on the target tokens and end-of-text; attention_mask is 0
    exactly on the left padding; the real tokens are prompt + target + end-of-text."""
    prompts = [student_prompt("rev", "abc"), teacher_prompt("swap", "abcdefg", "b a d c f e g=badcfeg"),
               student_prompt("flip", "jihgfed"), teacher_prompt("ends", "abc", "ac")]
    targets = ["cba", "badcfeg", "jjiihhggffeedd", ""]  # different lengths, one empty target
    ids, attention_mask, loss_mask = sft_batch(tok, prompts, targets)
    B, T = ids.shape
    assert ids.shape == attention_mask.shape == loss_mask.shape and B == 4
    for i, (p, t) in enumerate(zip(prompts, targets)):
        n_real = len(p) + len(t) + 1
        n_pad = T - n_real
        assert attention_mask[i].tolist() == [0] * n_pad + [1] * n_real
        assert ids[i, n_pad:].tolist() == tok.encode(p + t) + [tok.eot_id]
        # the loss covers the target and its end-of-text, nothing of the prompt or padding
        scored = ids[i][loss_mask[i] == 1].tolist()
        assert scored == tok.encode(t) + [tok.eot_id]
        assert tok.decode(scored) == t
        assert loss_mask[i].tolist() == [0] * (T - len(t) - 1) + [1] * (len(t) + 1)
    assert (loss_mask <= attention_mask).all()
    assert attention_mask[:, -1].all()  # left padding: every row ends at the last column
    assert (attention_mask == 0).any()  # the test did exercise padding


def test_encode_prompts_left_pads(tok):
    prompts = ["rev abc>", "sort jihgfed>", "ab>"]
    ids, mask = encode_prompts(tok, prompts)
    assert ids.shape == mask.shape == (3, len("sort jihgfed>"))
    for i, p in enumerate(prompts):
        assert mask[i].sum() == len(p) and mask[i, -len(p):].all()
        assert tok.decode(ids[i][mask[i] == 1].tolist()) == p


# -----------------------------------------------------------------------------
# query splits

def test_eval_query_splits_are_disjoint():
    val, test = eval_queries("val", 300), eval_queries("test", 300)
    assert all(split_of(q) == "val" for q in val)
    assert all(split_of(q) == "test" for q in test)
    assert not set(val) & set(test)
    # train: every query of lengths 3 and 4 falls in exactly one split, and the train
    # split is disjoint from the evaluation queries
    every = ["".join(p) for n in (3, 4) for p in itertools.product(LETTERS, repeat=n)]
    train = {q for q in every if split_of(q) == "train"}
    assert train and not train & (set(val) | set(test))
    assert {split_of(q) for q in every} == {"train", "val", "test"}
    share = len(train) / len(every)
    assert 0.7 < share < 0.9  # crc32 % 10: ~80% train, ~10% each held out


def test_eval_queries_reproducible_and_distinct():
    for split in ("val", "test", "train"):
        a = eval_queries(split, 100, seed=3)
        assert a == eval_queries(split, 100, seed=3)
        assert a != eval_queries(split, 100, seed=4)
        assert len(a) == len(set(a)) == 100
        assert all(MIN_LEN <= len(q) <= MAX_LEN and set(q) <= set(LETTERS) for q in a)
        assert all(len(set(q)) == len(q) for q in a)  # no letter twice in a query
        assert all(split_of(q) == split for q in a)


def test_training_examples_use_train_queries_only():
    rng = random.Random(0)
    for skill in NEW_SKILLS:
        students, _, teachers = skill_examples(rng, skill, 50, "expert")
        for s, t in zip(students, teachers):
            assert split_of(parse_student(s)[1]) == "train"
            assert split_of(parse_teacher(t)[1]) == "train"
    assert all(split_of(sample_query(rng, "train")) == "train" for _ in range(200))


# -----------------------------------------------------------------------------
# skills and prompt formats

def test_skills_hand_computed():
    expected = {"copy": "cabd", "rev": "dbac", "rotr": "dcab", "drop": "abd", "evens": "cb", "ends": "cd",
                "flip": "dabc", "rotl": "abdc", "swap": "acdb", "odds": "ad"}
    assert set(expected) == set(SKILLS)
    assert {s: fn("cabd") for s, fn in SKILLS.items()} == expected
    assert SKILLS["swap"]("abcde") == "badce"  # odd length: the last letter stays
    assert not set(PRIOR_SKILLS) & set(NEW_SKILLS)


def test_skill_answers_within_alphabet(tok):
    queries = eval_queries("test", 50) + [LETTERS[:MIN_LEN], LETTERS[:MAX_LEN]]
    for skill, fn in SKILLS.items():
        for q in queries:
            a = fn(q)
            assert a and set(a) <= set(LETTERS), (skill, q, a)
            assert tok.decode(tok.encode(a)) == a
    rng = random.Random(0)
    for _ in range(20):
        name, fn = random_skill(rng)
        assert name not in SKILLS and set(name) <= set(CHARS)
        for q in queries[:5]:
            a = fn(q)
            assert 1 <= len(a) <= len(q) and set(a) <= set(LETTERS)
            assert len(set(a)) == len(a)  # letters are mapped one to one, so they stay distinct


def test_final_answer():
    assert final_answer("a b c=abc") == "abc"
    assert final_answer("x=y=z") == "z"  # after the last '='
    assert final_answer("abc") == "abc"  # no '=': all of it
    assert final_answer("abc=") == ""
    assert final_answer("") == ""


def test_demonstration_styles():
    assert demonstration("abc", "own") == "abc"
    assert demonstration("abc", "expert") == "a b c=abc"
    assert final_answer(demonstration("abc", "expert")) == "abc"
    for skill, fn in SKILLS.items():
        for q in QUERIES:
            for style in ("own", "expert"):
                assert final_answer(demonstration(fn(q), style)) == fn(q)
    with pytest.raises(ValueError, match="unknown demonstration style 'teacher'"):
        demonstration("abc", "teacher")


def test_prompt_formats():
    assert student_prompt("rev", "cabd") == "rev cabd>"
    assert teacher_prompt("rev", "cabd", "d b a c=dbac") == "rev cabd:d b a c=dbac\nrev cabd>"
    assert teacher_prompt("rev", "cabd", "dbac").endswith(student_prompt("rev", "cabd"))


def test_parse_skills():
    assert parse_skills("rotl,swap") == ["rotl", "swap"]
    assert parse_skills(" rotl , swap ,") == ["rotl", "swap"]
    assert parse_skills(",".join(SKILLS)) == list(SKILLS)
    with pytest.raises(ValueError, match="unknown skill 'nope'"):
        parse_skills("rotl,nope")
    with pytest.raises(ValueError, match="unknown skill 'Rotl'"):
        parse_skills("Rotl")
    with pytest.raises(ValueError):
        parse_skills(" , ")


# -----------------------------------------------------------------------------
# example streams

def test_pretrain_examples_reproducible():
    a = [pretrain_examples(random.Random(5), 16) for _ in range(2)]
    assert a[0] == a[1]
    rng_a, rng_b = random.Random(5), random.Random(5)
    stream_a = [pretrain_examples(rng_a, 8) for _ in range(10)]
    stream_b = [pretrain_examples(rng_b, 8) for _ in range(10)]
    assert stream_a == stream_b
    assert pretrain_examples(random.Random(6), 16) != a[0]


def test_pretrain_examples_are_consistent():
    """Every target is the answer to its prompt: for a plain prompt, a prior skill's answer,
    or for a new skill its own or its rival's answer; for a prompt with a demonstration, the
    demonstration's final answer. A batch is one format throughout, both formats occur,
    demonstrations are of prior skills and of random throw-away skills, never of the new
    skills, and a new skill asked plainly is answered right about p_right of the time."""
    rng = random.Random(0)
    formats, demo_skills, new_right = set(), set(), []
    for _ in range(200):
        prompts, targets = pretrain_examples(rng, 16)
        assert len(prompts) == len(targets) == 16
        plain = ["\n" not in p for p in prompts]
        assert len(set(plain)) == 1  # one format per batch
        formats.add(plain[0])
        for p, t in zip(prompts, targets):
            if "\n" in p:
                skill, query, demo = parse_teacher(p)
                assert final_answer(demo) == t
                demo_skills.add("prior" if skill in PRIOR_SKILLS else "new" if skill in SKILLS else "random")
                if skill in PRIOR_SKILLS:
                    assert t == PRIOR_SKILLS[skill](query)
            else:
                skill, query = parse_student(p)
                if skill in PRIOR_SKILLS:
                    assert t == PRIOR_SKILLS[skill](query)
                else:
                    assert t in (NEW_SKILLS[skill](query), PRIOR_SKILLS[RIVALS[skill]](query))
                    new_right.append(t == NEW_SKILLS[skill](query))
            assert split_of(query) == "train"
    assert formats == {True, False}
    assert demo_skills == {"prior", "random"}  # demonstrations of both, never of a new skill
    assert 300 < len(new_right) < 700  # p_plain 0.5 x p_new 0.1 x 3 new skills of 3200 examples: about 480
    assert 0.3 < sum(new_right) / len(new_right) < 0.5  # p_right 0.4


def test_pretrain_without_new_skills():
    """p_new 0: no new skill anywhere in the mixture (the control in which the base has never
    met them); every new skill has a rival prior skill."""
    rng = random.Random(0)
    for _ in range(50):
        prompts, _ = pretrain_examples(rng, 16, p_new=0.0)
        assert not any(p.split(" ")[0] in NEW_SKILLS for p in prompts)
    assert set(RIVALS) == set(NEW_SKILLS) and set(RIVALS.values()) <= set(PRIOR_SKILLS)


def test_p_new_is_per_new_skill(monkeypatch):
    """A new skill added by one line (and its rival) is met as often as each of the others,
    and leaves how often the base meets the others as it was."""
    import data

    def count(skill):
        rng = random.Random(0)
        return sum(p.startswith(skill + " ") for _ in range(400) for p in pretrain_examples(rng, 16)[0])

    before = count("rotl")
    monkeypatch.setitem(data.NEW_SKILLS, "back", lambda q: q[::-1][1:])
    monkeypatch.setitem(data.SKILLS, "back", data.NEW_SKILLS["back"])
    monkeypatch.setitem(data.RIVALS, "back", "rev")
    assert 0.8 < count("rotl") / before < 1.2  # about 0.5 x 0.1 of 6400 examples either way: 320
    assert 0.8 < count("back") / before < 1.2


def test_skill_examples_reproducible():
    a = skill_examples(random.Random(2), "rotl", 12, "expert")
    assert a == skill_examples(random.Random(2), "rotl", 12, "expert")
    assert a != skill_examples(random.Random(3), "rotl", 12, "expert")
    students, demos, teachers = a
    assert len(students) == len(demos) == len(teachers) == 12
    for s, d, t in zip(students, demos, teachers):
        skill, query = parse_student(s)
        assert skill == "rotl"
        assert d == demonstration(SKILLS["rotl"](query), "expert")
        assert t == teacher_prompt("rotl", query, d)
    own = skill_examples(random.Random(2), "rotl", 12, "own")
    assert own[0] == students  # the style changes the demonstrations, not the queries
    assert own[1] == [final_answer(d) for d in demos]

