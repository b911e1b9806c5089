"""
Tests of data.py: the tokenizer, the skills and prompt formats, the SFT batch masks, the
query splits, and reproducible example streams.

    python -m pytest -q tests/test_data.py
"""

import itertools
import random

import pytest
import torch

from data import (ALPHABETS, CHARS, LETTERS, MAX_LEN, MIN_LEN, NEW_SKILLS, PRIOR_SKILLS, RIVALS,
                  SKILLS, check_new_skills, demonstration, encode_prompts, eval_queries,
                  final_answer, known_letters, parse_skills, plain_answer, pretrain_examples,
                  random_skill, sample_query, sft_batch, skill_examples, split_of, student_prompt,
                  teacher_prompt)

QUERIES = ["abc", "cabd", "jihgfed", "aaaa", "badcfe"]


def parse_student(prompt):
    """'rev cabd>' -> ('rev', 'cabd')"""
    assert prompt.endswith(">")
    skill, query = prompt[:-1].split(" ")
    return skill, query


def parse_teacher(prompt, with_start=False):
    """'rev cabd:d b a c=dbac\\nrev cabd>' -> ('rev', 'cabd', 'd b a c=dbac'), checking the
    teacher prompt ends with the student prompt for the same question (with_start: and then
    an answer begun, returned fourth)."""
    head, student = prompt.split("\n")
    question, demo = head.split(":", 1)
    skill, query = question.split(" ")
    prompt_end = len(student_prompt(skill, query))
    assert student[:prompt_end] == student_prompt(skill, query)
    assert with_start or len(student) == prompt_end
    return (skill, query, demo, student[prompt_end:]) if with_start else (skill, query, demo)


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
    students, demos, teachers = skill_examples(random.Random(1), "mug", 8, "expert")
    return texts + students + demos + teachers


def test_tokenizer_round_trip(tok):
    texts = every_toy_string()
    # teacher prompts are in there
    assert any("\n" in t for t in texts) and any(":" in t for t in texts)
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
    prompts = [student_prompt("rev", "abc"),
               teacher_prompt("mug", "abcdefg", "b a d c f e g=badcfeg"),
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
    expected = {"copy": "cabd", "rev": "dbac", "rotr": "dcab", "drop": "abd", "evens": "cb",
                "ends": "cd", "flip": "dabc", "jab": "2013", "mug": "3102", "hub": "013",
                "zag": "ml", "max": "nmkl"}
    assert set(expected) == set(SKILLS)
    assert {s: fn("cabd") for s, fn in SKILLS.items()} == expected
    assert SKILLS["zag"]("abcde") == "kmo"  # every second letter from the first, a->k ... j->t
    assert not set(PRIOR_SKILLS) & set(NEW_SKILLS)


def test_skill_answers_within_alphabet(tok):
    """Prior skills write letters a..j, each new skill one alphabet, random skills any one of
    them."""
    queries = eval_queries("test", 50) + [LETTERS[:MIN_LEN], LETTERS[:MAX_LEN]]
    for skill, fn in SKILLS.items():
        written = set()
        for q in queries:
            a = fn(q)
            written |= set(a)
            assert a and tok.decode(tok.encode(a)) == a
        assert any(written <= set(alphabet) for alphabet in ALPHABETS[skill in NEW_SKILLS:]), skill
    rng, alphabets = random.Random(0), set()
    for _ in range(40):
        name, fn = random_skill(rng)
        assert name not in SKILLS and set(name) <= set(CHARS)
        for q in queries[:5]:
            a = fn(q)
            assert 1 <= len(a) <= len(q) and any(set(a) <= set(alphabet) for alphabet in ALPHABETS)
            assert len(set(a)) == len(a)  # letters are mapped one to one, so they stay distinct
            alphabets |= {i for i, alphabet in enumerate(ALPHABETS) if set(a) <= set(alphabet)}
    assert alphabets == {0, 1, 2}


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
    assert parse_skills("jab,mug") == ["jab", "mug"]
    assert parse_skills(" jab , mug ,") == ["jab", "mug"]
    assert parse_skills(",".join(SKILLS)) == list(SKILLS)
    with pytest.raises(ValueError, match="unknown skill 'nope'"):
        parse_skills("jab,nope")
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
    """Every target is the answer to its prompt. Plainly: a prior skill's answer, or a new
    skill's plain_answer (right on its known letters, its rival's elsewhere). With a
    demonstration: the demonstration's final answer, except for a new skill whose plain answer is
    begun in the prompt, which the target goes on with. A batch is one format throughout, both
    formats occur, and demonstrations are of prior, random and new skills."""
    rng = random.Random(0)
    formats, demo_skills, new_right, begun = set(), set(), [], []
    for _ in range(200):
        prompts, targets = pretrain_examples(rng, 16)
        assert len(prompts) == len(targets) == 16
        plain = ["\n" not in p for p in prompts]
        assert len(set(plain)) == 1  # one format per batch
        formats.add(plain[0])
        for p, t in zip(prompts, targets):
            if "\n" in p:
                skill, query, demo, start = parse_teacher(p, with_start=True)
                demo_skills.add("prior" if skill in PRIOR_SKILLS
                                else "new" if skill in SKILLS else "random")
                if skill in NEW_SKILLS and start:
                    assert final_answer(demo) == NEW_SKILLS[skill](query)
                    assert start + t == plain_answer(skill, query, 0.4)
                    begun.append(not NEW_SKILLS[skill](query).startswith(start))
                else:
                    assert final_answer(demo) == t and not start
                if skill in PRIOR_SKILLS:
                    assert t == PRIOR_SKILLS[skill](query)
            else:
                skill, query = parse_student(p)
                assert t == plain_answer(skill, query, 0.4)
                if skill in NEW_SKILLS:
                    new_right.append(t == NEW_SKILLS[skill](query))
            assert split_of(query) == "train"
    assert formats == {True, False}
    assert demo_skills == {"prior", "random", "new"}
    # p_plain 0.5 x p_new 0.06 x 5 new skills of 3200 examples: about 480
    assert 300 < len(new_right) < 700
    assert 0.3 < sum(new_right) / len(new_right) < 0.5  # 4 known letters of 10
    assert 0.3 < sum(begun) / len(begun) < 0.8  # starts that leave the demonstration: the rival's


def test_known_letters_and_plain_answer():
    """A new skill is known on round(p_right x 10) first letters, fixed by its name, and answered
    as its rival elsewhere; a prior skill is always its own answer."""
    for skill in NEW_SKILLS:
        known = known_letters(skill, 0.4)
        assert len(known) == 4 and known <= set(LETTERS) and known == known_letters(skill, 0.4)
        for q in eval_queries("train", 100):
            right = q[0] in known
            assert plain_answer(skill, q, 0.4) == (NEW_SKILLS if right else PRIOR_SKILLS)[
                skill if right else RIVALS[skill]](q)
        assert known_letters(skill, 0.0) == set() and known_letters(skill, 1.0) == set(LETTERS)
    assert len({frozenset(known_letters(s, 0.4)) for s in NEW_SKILLS}) > 1  # not one region for all
    assert plain_answer("rev", "cabd", 0.0) == "dbac"


def test_new_skills_rule(monkeypatch):
    """The shipped new skills keep the rule; a new skill without a rival, one that starts as its
    rival, or one that starts as another new skill is refused, in one sentence naming it, by
    every script's parse_skills."""
    import data
    check_new_skills()
    for name, fn, rival, message in [
            ("gawk", lambda q: data.PRIOR_SKILLS["flip"](q).translate(data.HIGH), "flip",
             "'max' and 'gawk'"),
            ("buzz", lambda q: q[1:].translate(data.HIGH), None, "'buzz' has no rival"),
            ("jamb", lambda q: q[::-1][:2], "rev", "'jamb' starts as its rival 'rev'"),
            ("hop", lambda q: q[1:].translate(data.HIGH), "drop", "'hop' shares the letters op")]:
        with monkeypatch.context() as m:
            m.setitem(data.NEW_SKILLS, name, fn)
            m.setitem(data.SKILLS, name, fn)
            if rival:
                m.setitem(data.RIVALS, name, rival)
            with pytest.raises(ValueError, match=message):
                parse_skills("jab")
    # one that keeps the rule is accepted: the README's example of adding a skill
    with monkeypatch.context() as m:
        hug = lambda q: data.PRIOR_SKILLS["drop"](q).translate(data.HIGH)
        m.setitem(data.NEW_SKILLS, "hug", hug)
        m.setitem(data.SKILLS, "hug", hug)
        m.setitem(data.RIVALS, "hug", "drop")
        assert parse_skills("hug,jab") == ["hug", "jab"]


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
        return sum(p.startswith(skill + " ")
                   for _ in range(400) for p in pretrain_examples(rng, 16)[0])

    before = count("jab")
    hug = lambda q: data.PRIOR_SKILLS["drop"](q).translate(data.HIGH)
    monkeypatch.setitem(data.NEW_SKILLS, "hug", hug)
    monkeypatch.setitem(data.SKILLS, "hug", hug)
    monkeypatch.setitem(data.RIVALS, "hug", "drop")
    assert 0.8 < count("jab") / before < 1.2  # about 0.06 of 6400 examples either way: 384
    assert 0.8 < count("hug") / before < 1.2


def test_skill_examples_reproducible():
    a = skill_examples(random.Random(2), "jab", 12, "expert")
    assert a == skill_examples(random.Random(2), "jab", 12, "expert")
    assert a != skill_examples(random.Random(3), "jab", 12, "expert")
    students, demos, teachers = a
    assert len(students) == len(demos) == len(teachers) == 12
    for s, d, t in zip(students, demos, teachers):
        skill, query = parse_student(s)
        assert skill == "jab"
        assert d == demonstration(SKILLS["jab"](query), "expert")
        assert t == teacher_prompt("jab", query, d)
    own = skill_examples(random.Random(2), "jab", 12, "own")
    assert own[0] == students  # the style changes the demonstrations, not the queries
    assert own[1] == [final_answer(d) for d in demos]



def test_world_signature_sees_skills_and_mixture(monkeypatch):
    """A base is used only for its world: adding a new skill, or changing the pretraining
    mixture (here: nothing begun in a new skill's answers), changes the fingerprint."""
    import data
    before = data.world_signature()
    assert data.world_signature() == before
    with monkeypatch.context() as m:
        hug = lambda q: data.PRIOR_SKILLS["drop"](q).translate(data.HIGH)
        m.setitem(data.NEW_SKILLS, "hug", hug)
        m.setitem(data.SKILLS, "hug", hug)
        m.setitem(data.RIVALS, "hug", "drop")
        assert data.world_signature() != before
    original = data.pretrain_examples
    with monkeypatch.context() as m:
        m.setattr(data, "pretrain_examples", lambda rng, n: original(rng, n, p_right=1.0))
        assert data.world_signature() != before
    assert data.world_signature() == before
