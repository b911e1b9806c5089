"""
The knowledge world: facts about made-up entities, learned from documents (the paper's Table 1).
lab/knowledge.py runs the study; lab/variants.py --facts puts this world in place of the
training scripts' skills (training.py's world functions); lab/pretrain.py --p-knowledge
teaches a base to read a document.
"""

import json
import math
import random
import zlib

from eval import answer as model_answers
from data import (ALPHABETS, LETTERS, MAX_LEN, MIN_LEN, PRIOR_SKILLS, demonstration, final_answer,
                  student_prompt, teacher_prompt)

#
# An entity is a made-up name of 6 distinct letters from k..z, one of them from u..z: never a
# skill query (a..j), a skill's answer (a..j, 0..9, k..t), or a skill's or random skill's name
# (3-5 letters). Its fact is a value, a query of 3..6 distinct letters. A document states
# facts, one a line (FACTS_PER_DOC); a question asks one:
# - document           `zorpxl is cabd` (in pretraining also `zorpxl is cabd\nqtuvwk is hgf`)
# - direct question    `what zorpxl>`   completion `cabd`
# - indirect question  `rev zorpxl>`    completion `cabd=dbac`: a prior skill applied to the
#                      value, recalled first and then transformed (the grader reads `dbac`)
# The indirect questions are the OOD column: answering one needs the new fact and an old skill,
# and no method trains on them. A tiny model cannot recall and transform in one token, as an
# LLM would not without reasoning, so the model's own answer writes the value first.
# The question-answer pairs a run learns from come in the skills' demonstration styles: `own`
# (`cabd`) or `expert` (`c a b d=cabd`, written by another policy, as the paper's pairs were).

NAME_LETTERS, NAME_LEN = "klmnopqrstuvwxyz", 6
# A run's document states one fact. The base pretrained on documents of 1 to PRETRAIN_DOC_FACTS
# facts (throw-away ones) answers from a one-fact document (1.00 direct, 0.82 indirect), but from
# one of three it found the right line a third of the time (0.20-0.32: the last line's value),
# also when pretrained on three-fact documents only: finding the entity's line is beyond this base.
FACTS_PER_DOC, PRETRAIN_DOC_FACTS = 1, 3
DIRECT = "what"
INDIRECT_SKILLS = [s for s in PRIOR_SKILLS if s != "copy"]  # copy would ask the value itself
CONTEXTS = ["doc+answer", "doc", "answer"]  # what the teacher sees (the paper's App. A.2 ablation)
# Distinct values keep two entities from sharing an answer: a run can learn at most this many facts.
MAX_FACTS = sum(math.perm(len(LETTERS), k) for k in range(MIN_LEN, MAX_LEN + 1))
# facts the base knows from pretraining, asked without a document (the LLM's world knowledge)
N_KNOWN = 100


def entity_split(entity):
    """'eval' (learned and evaluated in fine-tuning) or 'pretrain' (throw-away and known
    entities) by a fixed hash, as split_of splits queries: an evaluation entity never occurs in
    pretraining."""
    return "eval" if zlib.crc32(entity.encode()) % 10 == 0 else "pretrain"


def sample_entity(rng, split):
    """A name of the split with a letter of u..z, which no skill writes (new skills write k..t)."""
    while True:
        entity = "".join(rng.sample(NAME_LETTERS, NAME_LEN))
        if entity_split(entity) == split and set(entity) - set(ALPHABETS[2]):
            return entity


def sample_facts(rng, n, split, exclude=()):
    """n distinct entities of the split, each with its own distinct value: [(entity, value)]."""
    entities, values = dict.fromkeys(exclude), set()
    facts = []
    while len(facts) < n:
        entity, value = (sample_entity(rng, split),
                         "".join(rng.sample(LETTERS, rng.randint(MIN_LEN, MAX_LEN))))
        if entity not in entities and value not in values:
            entities[entity] = None
            values.add(value)
            facts.append((entity, value))
    return facts


def knowledge_facts(n_facts, seed):
    """The n_facts facts a run learns: evaluation entities only, the same for the same seed."""
    if not 1 <= n_facts <= MAX_FACTS:
        raise ValueError(f"the knowledge world makes 1 to {MAX_FACTS} distinct facts, "
                         f"not {n_facts}")
    return sample_facts(random.Random(f"facts-{seed}"), n_facts, "eval")


KNOWN_FACTS = sample_facts(random.Random("known"), N_KNOWN, "pretrain")
# never throw-away entities: a known fact has one value
KNOWN_ENTITIES = {entity for entity, _ in KNOWN_FACTS}


def document(facts):
    return "\n".join(f"{entity} is {value}" for entity, value in facts)


def documents(facts):
    """The run's documents: the facts in order, FACTS_PER_DOC to a document."""
    return [document(facts[i:i + FACTS_PER_DOC]) for i in range(0, len(facts), FACTS_PER_DOC)]


def fact_answer(kind, value):
    """The model's own answer to a question of this kind: the value (direct), or the value, '='
    and the prior skill applied to it (indirect)."""
    return value if kind == DIRECT else f"{value}={PRIOR_SKILLS[kind](value)}"


def knowledge_prompt(kind, entity, demo, doc, context):
    """What the teacher sees, ending with the student's prompt `kind entity>`: the document and
    a demonstration of the answer ('doc+answer'), the document ('doc'), or the demonstration alone
    ('answer': the skills' teacher prompt); None: the student's prompt alone."""
    if context not in CONTEXTS + [None]:
        raise ValueError(f"unknown context '{context}' ({', '.join(CONTEXTS)})")
    question = student_prompt(kind, entity)
    with_answer = teacher_prompt(kind, entity, demo)
    return {None: question, "doc": f"{doc}\n{question}", "answer": with_answer,
            "doc+answer": f"{doc}\n{with_answer}"}[context]


def fact_prompts(facts, context, style="own"):
    """Every fact asked directly: [(student prompt, demonstration, teacher prompt)], in the facts'
    order; the demonstration (SFT's target) is the value in the style ('own' or 'expert')."""
    docs = documents(facts)
    demos = [demonstration(v, style) for _, v in facts]
    return [(student_prompt(DIRECT, e), d,
             knowledge_prompt(DIRECT, e, d, docs[i // FACTS_PER_DOC], context))
            for i, ((e, v), d) in enumerate(zip(facts, demos))]


def fact_examples(rng, facts, n, context, style="own"):
    """n of the facts, drawn with replacement, asked directly: (student prompts,
    demonstrations, teacher prompts)."""
    prompts = fact_prompts(facts, context, style)
    picks = [rng.choice(prompts) for _ in range(n)]
    return tuple(list(column) for column in zip(*picks))


def document_examples(rng, facts, n):
    """n of the run's documents, drawn with replacement: CPT's text, all of it the target."""
    docs = documents(facts)
    return [""] * n, [rng.choice(docs) for _ in range(n)]


def knowledge_questions(facts, kind, context=None):
    """The evaluation: every fact asked directly ('direct') or through every indirect skill
    ('indirect'), plainly or (context 'doc': the oracle) after its document. (prompts, expected
    final answers)."""
    docs = documents(facts)
    kinds = [DIRECT] if kind == "direct" else INDIRECT_SKILLS
    asked = [(k, e, v, docs[i // FACTS_PER_DOC]) for i, (e, v) in enumerate(facts) for k in kinds]
    return ([knowledge_prompt(k, e, fact_answer(k, v), doc, context) for k, e, v, doc in asked],
            [final_answer(fact_answer(k, v)) for k, e, v, _ in asked])


def longest_fact_prompt(tok, facts, context, style):
    """The most tokens a teacher prompt of these facts takes (data.longest_teacher_prompt's
    counterpart): the student's rollout must fit after it in the model's context."""
    return max(len(tok.encode(t)) for _, _, t in fact_prompts(facts, context, style))


def knowledge_signature():
    """A fingerprint of the knowledge world, as world_signature is of the skills': the question,
    answer and document formats, the known facts, and a few examples of the base's knowledge
    mixture. A knowledge base is used only for the world it was made for (knowledge.py)."""
    probe = [("zorpxl", "cabd")]
    formats = [knowledge_prompt(kind, "zorpxl", demonstration(fact_answer(kind, "cabd"), style),
                                document(probe), context)
               for kind in [DIRECT] + INDIRECT_SKILLS for context in CONTEXTS + [None]
               for style in ("own", "expert")]
    world = {"formats": formats, "known": KNOWN_FACTS, "facts": knowledge_facts(3, 0),
             "per_doc": FACTS_PER_DOC, "mixture": knowledge_pretrain_examples(random.Random(0), 16)}
    return f"{zlib.crc32(json.dumps(world).encode()):08x}"


def knowledge_pretrain_examples(rng, n, p_known=0.3):
    """n knowledge examples for the base. With probability p_known, a known fact (KNOWN_FACTS)
    asked plainly, of any kind: the base answers from its weights, as an LLM answers about what it
    read in pretraining. Otherwise a question about fresh throw-away facts with their document,
    a demonstration or both in context (the teacher's views): answers cannot be remembered, only
    read, which teaches the base to use a document, as random skills teach it to use a
    demonstration (of a direct question in either style, as the skills' are). Evaluation
    entities never occur (entity_split). The target is always the answer in the model's
    own style."""
    prompts, targets = [], []
    for _ in range(n):
        kind = rng.choice([DIRECT] + INDIRECT_SKILLS)
        if rng.random() < p_known:
            entity, value = rng.choice(KNOWN_FACTS)
            answer = fact_answer(kind, value)
            prompts.append(student_prompt(kind, entity))
        else:
            facts = sample_facts(rng, rng.randint(1, PRETRAIN_DOC_FACTS), "pretrain",
                                 exclude=KNOWN_ENTITIES)
            entity, value = rng.choice(facts)
            answer = fact_answer(kind, value)
            demo = demonstration(answer, rng.choice(["own", "expert"]) if kind == DIRECT else "own")
            prompts.append(knowledge_prompt(kind, entity, demo, document(facts),
                                            rng.choice(CONTEXTS)))
        targets.append(answer)
    return prompts, targets


def knowledge_accuracy(model, tok, facts, device, kind, context=None):
    """Fraction of the facts' questions answered right, greedily: kind 'direct' (the value) or
    'indirect' (every prior skill but copy applied to it); context 'doc' puts each fact's document
    before its question (the oracle). knowledge_questions has the formats."""
    was_training = model.training
    model.eval()
    prompts, expected = knowledge_questions(facts, kind, context)
    outputs = model_answers(model, tok, prompts, device)
    model.train(was_training)
    return sum(final_answer(o) == e for o, e in zip(outputs, expected)) / len(expected)
