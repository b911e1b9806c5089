"""
The toy world: a tokenizer, the skills, the student and teacher prompt formats, and batches.

A *skill* is a named string function, e.g. `rev` maps the query `cabd` to `dbac`.
- student prompt  `rev cabd>`                              completion `dbac<|endoftext|>`
- teacher prompt  `rev cabd:` demonstration `\\n` student prompt, e.g.
                  `rev cabd:d b a c=dbac\\nrev cabd>`       completion `dbac<|endoftext|>`
This is a toy version of the paper's teacher template (question, "This is an example
for a response to the question:", demonstration, "Now answer with a response of your
own"). The teacher prompt *ends* with the student prompt, so both score the same completion.

Demonstrations come in two styles:
- `own`:    exactly the answer, as the model itself answers (`dbac`);
- `expert`: another policy's style, a spelled-out trace then the answer (`d b a c=dbac`).
The grader reads the final answer: the text after the last `=`, if there is one.

Add a skill by adding one line to PRIOR_SKILLS (learned in pretraining, measured for
retention) or NEW_SKILLS (learned later, one at a time) with its rival in RIVALS; every script
accepts it by name, and refuses a new skill that breaks the world's rule (check_new_skills).
"""

import json
import random
import zlib

import tiktoken
import torch

# -----------------------------------------------------------------------------
# tokenizer

EOT = "<|endoftext|>"
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 :=>\n"  # every character the toy writes


class Tokenizer:
    """A thin wrapper over a tiktoken Encoding: encode / decode / eot_id / vocab_size."""

    def __init__(self, name="toy"):
        if name == "toy":
            # One token per character, built in code so it works offline: tiktoken's byte-pair
            # encoder with single-byte ranks and a pattern that splits every character apart.
            ranks = {c.encode(): i for i, c in enumerate(CHARS)}
            self.enc = tiktoken.Encoding(name="sdft-toy", pat_str=r"[\s\S]", mergeable_ranks=ranks,
                                         special_tokens={EOT: len(ranks)})
            self.alphabet = set(CHARS)
        else:
            self.enc = tiktoken.get_encoding(name)  # e.g. "gpt2": downloads its files at first use
            self.alphabet = None
        self.eot_id = self.enc.encode_single_token(EOT)
        self.vocab_size = self.enc.n_vocab

    def encode(self, text):
        if self.alphabet is not None and not set(text) <= self.alphabet:
            raise ValueError("characters outside the toy alphabet: "
                             f"{sorted(set(text) - self.alphabet)}")
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        """Decode up to (not including) the first end-of-text token."""
        ids = list(ids)
        if self.eot_id in ids:
            ids = ids[:ids.index(self.eot_id)]
        return self.enc.decode(ids)


# -----------------------------------------------------------------------------
# skills: query -> answer, on queries of 3..6 distinct letters from a..j

LETTERS = "abcdefghij"
MIN_LEN, MAX_LEN = 3, 6

PRIOR_SKILLS = {
    "copy": lambda q: q,
    "rev": lambda q: q[::-1],
    "rotr": lambda q: q[-1] + q[:-1],  # rotate right by one
    "drop": lambda q: q[1:],  # drop the first letter
    "evens": lambda q: q[::2],  # every second letter
    "ends": lambda q: q[0] + q[-1],  # first and last letter
    "flip": lambda q: q[-1] + q[1:-1] + q[0],  # swap the first and last letter
}

# The new skills are the prior ones written in other alphabets: digits (a->0 ... j->9) or the
# letters k..t (a->k ... j->t), as the paper's new tasks (tool calls, chemistry, medicine) are far
# from each other and from what the model knew. Each has a rival, the prior skill it rewrites,
# that the base answers with where it does not know the new skill (RIVALS, pretrain_examples).
DIGITS, HIGH = str.maketrans(LETTERS, "0123456789"), str.maketrans(LETTERS, "klmnopqrst")
ALPHABETS = [LETTERS, "0123456789", "klmnopqrst"]  # what answers are written in

NEW_SKILLS = {
    "jab": lambda q: PRIOR_SKILLS["copy"](q).translate(DIGITS),
    "mug": lambda q: PRIOR_SKILLS["rev"](q).translate(DIGITS),
    "hub": lambda q: PRIOR_SKILLS["drop"](q).translate(DIGITS),
    "zag": lambda q: PRIOR_SKILLS["evens"](q).translate(HIGH),
    "max": lambda q: PRIOR_SKILLS["rotr"](q).translate(HIGH),
}
RIVALS = {"jab": "copy", "mug": "rev", "hub": "drop", "zag": "evens", "max": "rotr"}
SEQUENCE = list(NEW_SKILLS)[:3]  # the headline's sequence: three, as the paper's sequential run has

SKILLS = {**PRIOR_SKILLS, **NEW_SKILLS}
# Skills of the lab's other worlds, by name -> answer (lab/reasoning_world.py adds its own): the
# scripts learn and evaluate them like any skill, but they are not SKILLS, so this world, its
# signature and its base stay as they are.
LAB_SKILLS = {}


def skill_answer(skill, query):
    """The answer of any skill a script can learn: this world's, or a lab world's."""
    return SKILLS[skill](query) if skill in SKILLS else LAB_SKILLS[skill](query)


# How far apart new skills must be: two of them write the same first token on at most this share
# of queries, and a new skill's rival writes its first token on at most this share.
MAX_SHARED_START = 0.1


def check_new_skills(new=NEW_SKILLS, rivals=RIVALS):
    """Raise ValueError, in one sentence naming the skill, if a new skill has no rival prior
    skill, starts like its rival (the base would be right where it answers with it), starts
    like another new skill on more than MAX_SHARED_START of queries (learning one would then
    bend the other's first step, which the paper's far-apart tasks do not do), or has a name
    that shares a letter with a prior skill's (learning it then bends that skill:
    results/NOTES.md)."""
    queries = eval_queries("train", 500, seed="rule")
    share = lambda f, g: sum(f(q)[:1] == g(q)[:1] for q in queries) / len(queries)
    prior_letters = set("".join(PRIOR_SKILLS))
    for name, fn in new.items():
        if rivals.get(name) not in PRIOR_SKILLS:
            raise ValueError(f"new skill '{name}' has no rival prior skill in data.RIVALS")
        if set(name) & prior_letters:
            shared = "".join(sorted(set(name) & prior_letters))
            raise ValueError(f"new skill '{name}' shares the letters {shared} "
                             "with the prior skills' names")
        if share(fn, PRIOR_SKILLS[rivals[name]]) > MAX_SHARED_START:
            raise ValueError(f"new skill '{name}' starts as its rival '{rivals[name]}' does")
    names = list(new)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if share(new[a], new[b]) > MAX_SHARED_START:
                raise ValueError(f"new skills '{a}' and '{b}' write the same first token on "
                                 f"{share(new[a], new[b]):.0%} of queries "
                                 f"(at most {MAX_SHARED_START:.0%})")


def parse_skills(text):
    """'jab,mug' -> ['jab', 'mug']; raises ValueError naming an unknown skill, or a new skill
    that breaks the world's rule (check_new_skills). A lab world's skills (LAB_SKILLS) count."""
    check_new_skills()
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ValueError("no skill given")
    known = list(SKILLS) + list(LAB_SKILLS)
    for name in names:
        if name not in known:
            raise ValueError(f"unknown skill '{name}' (known: {', '.join(known)})")
    return names


def random_name_and_positions(rng, taken):
    """A throw-away skill's random name, none of `taken`, and the query positions its answer
    reads, in a random order; at least one exists in the shortest query."""
    while True:
        name = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 5)))
        if name not in taken:
            break
    while True:
        positions = rng.sample(range(MAX_LEN), rng.randint(1, MAX_LEN))
        if min(positions) < MIN_LEN:
            return name, positions


def random_skill(rng):
    """A throw-away skill for pretraining only: a random name, then its answer picks letters
    of the query at random positions, in a random order, and writes them in one of the
    alphabets, in order or through a random table. Answers come in every length and follow
    no pattern the model could learn to recognise, so the only way to answer is to copy the
    demonstration: this is what teaches the model to use one."""
    name, positions = random_name_and_positions(rng, SKILLS)
    alphabet = rng.choice(ALPHABETS)  # in order half of the time (a->a, a->0, a->k), else shuffled
    table = dict(zip(LETTERS,
                     rng.sample(alphabet, len(alphabet)) if rng.random() < 0.5 else alphabet))
    return name, lambda q: "".join(table[q[i]] for i in positions if i < len(q))


# -----------------------------------------------------------------------------
# queries: train / validation / test by a fixed hash, so the splits never overlap

def split_of(query):
    h = zlib.crc32(query.encode()) % 10
    return "test" if h == 0 else "val" if h == 1 else "train"


def sample_query(rng, split):
    """A random query of the split. Its letters are distinct, so a letter's position in the
    query is unambiguous: a model this small confuses repeated letters (`hihei` -> `hhiei`)."""
    while True:
        q = "".join(rng.sample(LETTERS, rng.randint(MIN_LEN, MAX_LEN)))
        if split_of(q) == split:
            return q


def eval_queries(split, n, seed=0):
    """n distinct queries of one split, the same for the same seed."""
    rng, seen = random.Random(f"{split}-{seed}"), {}
    while len(seen) < n:
        seen[sample_query(rng, split)] = None
    return list(seen)


# -----------------------------------------------------------------------------
# prompt formats

def student_prompt(skill, query):
    return f"{skill} {query}>"


def demonstration(answer, style):
    """own: the answer itself; expert: a spelled-out trace, then '=' and the answer."""
    if style == "own":
        return answer
    if style == "expert":
        return " ".join(answer) + "=" + answer
    raise ValueError(f"unknown demonstration style '{style}' (own, expert)")


def teacher_prompt(skill, query, demo):
    """The question, a demonstration for it, then the student's prompt again."""
    return f"{skill} {query}:{demo}\n" + student_prompt(skill, query)


def final_answer(text):
    """What the grader reads: the text after the last '=', or all of it."""
    return text.rsplit("=", 1)[-1]


# -----------------------------------------------------------------------------
# batches

def left_pad(seqs, pad_id):
    """Token lists -> (ids, attention_mask), both (B, T), padded on the left."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, T - len(s):] = 1
    return ids, mask


def encode_prompts(tok, prompts):
    """Left-padded prompts for generation and scoring: (ids, attention_mask), (B, T)."""
    return left_pad([tok.encode(p) for p in prompts], tok.eot_id)


def sft_batch(tok, prompts, targets):
    """Prompt + target + end-of-text, left-padded. Returns (ids, attention_mask, loss_mask),
    all (B, T); loss_mask is 1 exactly on the target tokens and the end-of-text token."""
    seqs, n_target = [], []
    for p, t in zip(prompts, targets):
        target = tok.encode(t) + [tok.eot_id]
        seqs.append(tok.encode(p) + target)
        n_target.append(len(target))
    ids, mask = left_pad(seqs, tok.eot_id)
    loss_mask = torch.zeros_like(mask)
    for i, n in enumerate(n_target):
        loss_mask[i, -n:] = 1  # left padding: every row ends at the last column
    return ids, mask, loss_mask


# The paper's base models already solved 30-43% of their new tasks before fine-tuning. A new
# skill the base has never met forces every method to move far from the base to learn it, and
# both methods then forget (results/NOTES.md). So the toy's base meets each new skill in
# pretraining and knows it on a visible part of the query space: on queries whose first letter
# is one of its known letters it answers right, elsewhere with its rival. The start is then a
# share of the letters, the same for every pretraining seed, not a coin the base may learn or not.

def known_letters(skill, p_right):
    """The first letters on which the base knows a new skill: round(p_right x 10) of a..j, drawn
    once from the skill's name, so a skill keeps its letters whatever else is added."""
    return set(random.Random(f"known-{skill}").sample(LETTERS, round(p_right * len(LETTERS))))


def plain_answer(skill, query, p_right):
    """What the base is taught to answer plainly: a new skill's answer on its known letters, its
    rival's elsewhere; any other skill's own answer."""
    if skill in NEW_SKILLS and query[0] not in known_letters(skill, p_right):
        return SKILLS[RIVALS[skill]](query)
    return SKILLS[skill](query)


def pretrain_examples(rng, n, p_plain=0.5, p_random=0.5, p_new=0.06, p_right=0.4):
    """n examples of the base model's mixture. With probability p_plain the whole batch is
    asked plainly, else every example has a demonstration (own or expert style). Each example is
    a given new skill with probability p_new (answered as plain_answer says), otherwise a prior
    skill, or (with a demonstration, probability p_random) a random throw-away skill.
    A new skill with a demonstration has its plain answer begun in the prompt, from no token to
    all of it, and the target goes on with it (with none begun, it is the demonstration's
    answer). Where the base would answer with the rival, the begun answer differs from the
    demonstration and still goes on as begun: so the teacher goes on with a student's wrong
    start instead of copying the demonstration over it, as an LLM teacher reads a student's start.
    One format per batch keeps padding low: plain prompts are a third as long.
    The target is always in the model's own style."""
    plain = rng.random() < p_plain
    prompts, targets = [], []
    for _ in range(n):
        query, start = sample_query(rng, "train"), ""
        # p_new per new skill, so adding one leaves how often the base meets the others as it was
        if p_new and rng.random() < p_new * len(NEW_SKILLS):  # (p_new 0 draws nothing)
            skill = rng.choice(list(NEW_SKILLS))
            answer = plain_answer(skill, query, p_right)
            demo = SKILLS[skill](query)
            # begun with k tokens of the plain answer; none: the demonstration's answer
            if not plain:
                k = rng.randint(0, len(answer))
                start, answer = answer[:k], answer[k:] if k else demo
        elif plain or rng.random() >= p_random:
            skill = rng.choice(list(PRIOR_SKILLS))
            answer = demo = PRIOR_SKILLS[skill](query)
        else:
            skill, fn = random_skill(rng)
            answer = demo = fn(query)
        if plain:
            prompts.append(student_prompt(skill, query))
        else:
            style = rng.choice(["own", "expert"])
            prompts.append(teacher_prompt(skill, query, demonstration(demo, style)) + start)
        targets.append(answer)
    return prompts, targets


def skill_examples(rng, skill, n, demo_style):
    """n training queries of one skill: (student prompts, demonstrations, teacher prompts)."""
    queries = [sample_query(rng, "train") for _ in range(n)]
    demos = [demonstration(skill_answer(skill, q), demo_style) for q in queries]
    students = [student_prompt(skill, q) for q in queries]
    teachers = [teacher_prompt(skill, q, d) for q, d in zip(queries, demos)]
    return students, demos, teachers


def world_signature():
    """A fingerprint of the toy world that a base model is pretrained for: the skills (their
    names, and their answers to a few probe queries), the rivals, the alphabet, the prompt
    formats and a few batches of the pretraining mixture. A base is used only for the world it
    was made for, so a base pretrained before a skill, or the mixture, was added or changed is
    never taken for one that has met it (benchmark.py)."""
    probes = [LETTERS[:n] for n in range(MIN_LEN, MAX_LEN + 1)] + [LETTERS[::-1][:MAX_LEN]]
    rng = random.Random(0)
    world = {"prior": {s: [fn(q) for q in probes] for s, fn in PRIOR_SKILLS.items()},
             "new": {s: [fn(q) for q in probes] for s, fn in NEW_SKILLS.items()},
             "rivals": RIVALS, "formats": [teacher_prompt(s, q, demonstration(SKILLS[s](q), style))
                                           for s in SKILLS for q in probes[:1]
                                           for style in ("own", "expert")],
             "mixture": [pretrain_examples(rng, 16) for _ in range(4)]}
    return f"{zlib.crc32(json.dumps(world, sort_keys=True).encode()):08x}"


def longest_teacher_prompt(tok, skills, style):
    """The most tokens a teacher prompt of these skills takes: the student's rollout must fit
    after it in the model's context."""
    query = LETTERS[:MAX_LEN]  # a longest query
    return max(len(tok.encode(teacher_prompt(s, query, demonstration(skill_answer(s, query),
                                                                     style))))
               for s in skills)
