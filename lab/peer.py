"""
A peer check of the whole SDFT loop: TRL's SDFTTrainer learns `jab` from the shipped base, on
the same queries, prompts, schedule and stop rule as `python train_sdft.py --skills jab`.

    pip install -r requirements.txt -r lab/requirements-speed.txt  # TRL 1.16, transformers 5.24
    python lab/peer.py                   # seeds 0,1,2 into results/peer: ~5 min on 2 CPU cores
    python lab/peer.py --quick           # every part on a tiny budget, into runs/peer-quick

1. Conversion: results/base/ckpt.pt (model.py's GPT) becomes a transformers GPT2LMHeadModel
   with the same logits (checked on a left-padded batch of real prompts), and back, exactly.
2. Runs, for each seed: ours (train_sdft.py, through subprocess); TRL's trainer as shipped;
   and TRL's trainer with position ids from the attention mask in its scoring pass
   (score_with_mask_positions: the one change made to TRL).
3. Every run's final weights, in our GPT, evaluated with eval.py on every skill's test split.
Writes OUT/results.json (every setting that changes a run, per-step logs) and OUT/table.md.

The pitfall it measures: GPT-2 has learned absolute position embeddings, and transformers'
GPT2Model numbers positions 0..T-1 when it is given no position_ids, whatever the attention mask
says. TRL's generation passes positions from the mask (transformers' generate does), but its
scoring pass (SDFTTrainer._forward_logits) does not, so each left-padded row is scored at
shifted positions, the student's and the teacher's alike.

Not matched, by design: the rollouts' random numbers (transformers' sampler, not ours), and
TRL's loss averages each completion's tokens and then the completions (ours: every token of the
batch at once). CPU only: these runs take seconds to minutes.
"""

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from functools import partial

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository root
from data import (CHARS, EOT, NEW_SKILLS, PRIOR_SKILLS, Tokenizer, demonstration, encode_prompts,
                  eval_queries, skill_answer, skill_examples, student_prompt, teacher_prompt)
from eval import answer, evaluate, kl_from_base
from model import GPT, GPTConfig, cosine_lr, load_checkpoint

CPU = torch.device("cpu")  # the toy's runs take seconds to minutes on a CPU
NEED_TRL = "lab/peer.py needs TRL: pip install -r requirements.txt -r lab/requirements-speed.txt"

# -----------------------------------------------------------------------------
# settings: train_sdft.py's defaults, one source of truth for both trainers. run_ours checks
# them against the arguments train_sdft.py saves in its checkpoint.

SETTINGS = {
    "skills": "jab", "init": "results/base/ckpt.pt", "demo_style": "expert",
    "steps": 300, "batch_size": 32, "lr": 3e-5, "warmup": 10, "grad_clip": 1.0,
    "eval_every": 10, "eval_n": 100, "stop_at": 0.95,
    "alpha": 0.0, "teacher": "ema", "ema_rate": 0.01, "skip": 0, "max_new_tokens": 32,
}
# Fixed in train_sdft.py rather than flags (training.Run.optimizer, sdft.rollout): matched too.
FIXED = {"betas": (0.9, 0.95), "weight_decay": 0.0, "adam_eps": 1e-8, "temperature": 1.0,
         "completions_per_prompt": 1}
QUICK = {"steps": 12, "batch_size": 8, "eval_n": 20, "eval_every": 4, "warmup": 2}


# -----------------------------------------------------------------------------
# 1. conversion: our GPT <-> transformers' GPT2LMHeadModel

def gpt2_config(config, eot_id):
    """The GPT2Config of our GPTConfig: our blocks are GPT-2's, minus dropout and the biases of
    the linear layers (those stay zero in the converted model, and frozen while it trains)."""
    import transformers
    return transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head,
        activation_function="gelu",  # exact erf GELU, as F.gelu (GPT-2's default is the tanh one)
        layer_norm_epsilon=1e-5,  # nn.LayerNorm's
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # GPT-2's default dropout is 0.1
        tie_word_embeddings=True,  # one matrix embeds and unembeds, as ours
        bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id)


# Our names -> GPT-2's, per block. GPT-2's Conv1D stores a linear layer's weight transposed.
BLOCK_NAMES = {"ln1": "ln_1", "ln2": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
               "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
LINEARS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


def name_pairs(n_layer):
    """(our name, GPT-2's name, transposed?) for every tensor but the head (wte's in both). q, k
    and v split qkv's output into thirds and heads alike in both: weights copy as they are."""
    pairs = [(name, f"transformer.{name}", False)
             for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")]
    for i in range(n_layer):
        for ours, theirs in BLOCK_NAMES.items():
            a, b = f"blocks.{i}.{ours}", f"transformer.h.{i}.{theirs}"
            if ours in LINEARS:
                pairs.append((a + ".weight", b + ".weight", True))
            else:  # a LayerNorm
                pairs += [(a + ".weight", b + ".weight", False), (a + ".bias", b + ".bias", False)]
    return pairs


def linear_biases(n_layer):
    """GPT-2's names of the linear layers' biases, which our GPT does not have."""
    return [f"transformer.h.{i}.{BLOCK_NAMES[name]}.bias"
            for i in range(n_layer) for name in LINEARS]


def to_hf(model, eot_id):
    """Our GPT -> a GPT2LMHeadModel with the same logits, its linear biases zero."""
    import transformers
    hf = transformers.GPT2LMHeadModel(gpt2_config(model.config, eot_id))
    ours, theirs = model.state_dict(), hf.state_dict()
    new = {b: ours[a].t() if t else ours[a] for a, b, t in name_pairs(model.config.n_layer)}
    new |= {b: torch.zeros_like(theirs[b]) for b in linear_biases(model.config.n_layer)}
    missing = hf.load_state_dict(new, strict=False).missing_keys
    assert set(missing) <= {"lm_head.weight"}, missing  # the head is wte's: no key of its own
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr(), "head not tied"
    return hf.eval()


def from_hf(hf):
    """A GPT2LMHeadModel of to_hf's shape -> our GPT (the exact inverse of to_hf). Raises
    ValueError if a linear layer's bias is not zero: our model has nowhere to put it."""
    c = hf.config
    model = GPT(GPTConfig(vocab_size=c.vocab_size, block_size=c.n_positions, n_layer=c.n_layer,
                          n_head=c.n_head, n_embd=c.n_embd))
    theirs = {k: v.detach().cpu() for k, v in hf.state_dict().items()}
    for name in linear_biases(c.n_layer):
        if theirs[name].any():
            raise ValueError(f"{name} is not zero: our GPT has no biases")
    new = {a: theirs[b].t().contiguous() if t else theirs[b] for a, b, t in name_pairs(c.n_layer)}
    model.load_state_dict(new | {"lm_head.weight": new["wte.weight"]})  # tied
    return model.eval()


def mask_positions(attention_mask):
    """Position ids that count real tokens only, as model.py's forward does: (B, T)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def hf_logits(hf, ids, mask, positions=True):
    """transformers' logits, (B, T, V): with position ids from the mask, or (positions=False)
    without any, as TRL's scoring pass calls the model."""
    position_ids = mask_positions(mask) if positions else None
    return hf(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits


@torch.no_grad()
def logit_difference(model, hf, ids, mask, positions=True):
    """The largest |our logit - transformers' logit| over the real (not padding) positions."""
    diff = (model(ids, mask) - hf_logits(hf, ids, mask, positions)).abs().amax(-1)  # (B, T)
    return diff[mask.bool()].max().item()  # a padding position's output is never used


def round_trip_exact(model, eot_id):
    """Our GPT -> transformers -> our GPT gives back every tensor bit for bit."""
    back = from_hf(to_hf(model, eot_id)).state_dict()
    return all(torch.equal(v, back[k]) for k, v in model.state_dict().items())


def real_prompts(skills, n=4):
    """A batch of real prompts of many lengths: every skill's student and teacher prompt on a
    few validation queries, so most rows are left-padded."""
    prompts = []
    for skill in skills:
        for q in eval_queries("val", n):
            demo = demonstration(skill_answer(skill, q), "expert")
            prompts += [student_prompt(skill, q), teacher_prompt(skill, q, demo)]
    return prompts


@torch.no_grad()
def teacher_right(hf, tok, skill, positions, n=100):
    """How often the teacher's top-1 token is the right answer's next token, scoring teacher
    prompt + right answer + end-of-text in one left-padded batch of n validation queries, with
    or without position ids. This is what the teacher's targets rest on."""
    queries = eval_queries("val", n)
    texts = [teacher_prompt(skill, q, demonstration(skill_answer(skill, q), "expert"))
             for q in queries]
    answers = [tok.encode(skill_answer(skill, q)) + [tok.eot_id] for q in queries]
    ids, mask = encode_prompts(tok, texts)
    A = max(len(a) for a in answers)  # right-padded answers after the left-padded prompts
    answer_ids = torch.full((n, A), tok.eot_id)
    answer_mask = torch.zeros((n, A), dtype=torch.long)
    for i, a in enumerate(answers):
        answer_ids[i, :len(a)], answer_mask[i, :len(a)] = torch.tensor(a), 1
    ids, mask = torch.cat([ids, answer_ids], 1), torch.cat([mask, answer_mask], 1)
    logits = hf_logits(hf, ids[:, :-1], mask[:, :-1], positions)[:, -A:]  # (n, A, V)
    right = (logits.argmax(-1) == answer_ids) & answer_mask.bool()  # (n, A)
    return (right.sum() / answer_mask.sum()).item()


def check_conversion(model, tok):
    """The conversion on the base: logit differences on a left-padded batch of real prompts
    (asserted small with positions from the mask), the round trip, and the teacher's targets."""
    hf = to_hf(model, tok.eot_id)
    ids, mask = encode_prompts(tok, real_prompts(list(PRIOR_SKILLS) + list(NEW_SKILLS)))
    result = {"batch": list(ids.shape), "padded_rows": int((mask == 0).any(1).sum()),
              "max_abs_logit_diff": logit_difference(model, hf, ids, mask),
              "max_abs_logit_diff_no_position_ids": logit_difference(model, hf, ids, mask, False),
              "round_trip_exact": round_trip_exact(model, tok.eot_id),
              "teacher_top1_right_jab": {
                  "positions from the mask": teacher_right(hf, tok, "jab", True),
                  "no position_ids": teacher_right(hf, tok, "jab", False)}}
    print(f"conversion: {result['batch'][0]} prompts, {result['padded_rows']} left-padded; "
          f"max |our logit - HF logit| {result['max_abs_logit_diff']:.2e} with positions from "
          f"the mask, {result['max_abs_logit_diff_no_position_ids']:.2f} without; "
          f"round trip exact: {result['round_trip_exact']}")
    right = result["teacher_top1_right_jab"]
    print(f"  the teacher's top-1 is the right jab token: {right['positions from the mask']:.3f} "
          f"with positions from the mask, {right['no position_ids']:.3f} without")
    assert result["max_abs_logit_diff"] < 1e-4 and result["round_trip_exact"]
    return result


# -----------------------------------------------------------------------------
# 2. the runs: ours (train_sdft.py) and TRL's SDFTTrainer

def final_metrics(model, base, tok):
    """What the table reports of a run's final weights: every skill's test accuracy (eval.py),
    the prior skills' mean, the KL from the base on jab (as train_sdft.py logs it), and a few
    answers to jab and rev prompts, greedy and sampled as rollouts are, to see what it writes."""
    accuracy = evaluate(model, tok, list(PRIOR_SKILLS) + list(NEW_SKILLS), CPU, "test", n=100)
    prompts = [student_prompt(s, q) for s in ("jab", "rev") for q in eval_queries("test", 4)]
    return {"accuracy": accuracy, "prior_mean": statistics.mean(accuracy[s] for s in PRIOR_SKILLS),
            "kl_from_base": kl_from_base(model, base, tok, "jab", CPU, n=100),
            "greedy": dict(zip(prompts, answer(model, tok, prompts, CPU))),
            "sampled": dict(zip(prompts, answer(model, tok, prompts, CPU, temperature=1.0,
                                                generator=torch.Generator().manual_seed(0))))}


def ours_command(settings, seed, out):
    """train_sdft.py with every setting spelled out (the defaults, unless --quick)."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    return [sys.executable, "train_sdft.py", *flags, f"--seed={seed}", f"--out={out}",
            "--device=cpu", "--ckpt-every=0"]


def run_ours(settings, seed, out, base, tok):
    """Run train_sdft.py (a few seconds) and read back its log and final weights."""
    command = ours_command(settings, seed, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # 2 shared cores
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        sys.exit(f"error: train_sdft.py failed: {last}")
    model, ckpt = load_checkpoint(os.path.join(ROOT, out, "ckpt.pt"))
    for key, value in settings.items():  # SETTINGS are what train_sdft.py ran with
        assert ckpt["args"][key] == value, (key, ckpt["args"][key], value)
    with open(os.path.join(ROOT, out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [r for r in records if "kl" in r]  # one record per step
    stage = next(r for r in records if "steps" in r)  # the stage's end
    kl, length = [r["kl"] for r in steps], [r["length"] for r in steps]
    return {"command": " ".join(command[1:]), "steps": stage["steps"], "kl": kl,
            "length": length, "lr": [r["lr"] for r in steps], "seconds": stage["seconds"],
            "mean_kl": statistics.mean(kl), "mean_length": statistics.mean(length),
            "val_acc": [[r["step"], r["val_acc"]] for r in records if "val_acc" in r],
            **final_metrics(model, base, tok)}


def import_trl():
    """TRL and friends, imported late: they are an extra (lab/requirements-speed.txt). Stops
    with one error line when they are missing."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # everything is built locally: never reach for the Hub
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"  # we know trl.experimental is experimental
    try:
        import trl  # first: it imports the others
        import trl.experimental.sdft  # noqa: F401 (the trainer: experimental, so checked too)
        import datasets
        import transformers
    except (ImportError, NameError):  # NameError: trl 1.13's sdft module without peft
        sys.exit(f"error: {NEED_TRL}")
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' v6 renamings
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    return {"trl": trl.__version__, "transformers": transformers.__version__}


def hf_tokenizer(tok):
    """Our tokenizer as a transformers one: a token per character, the same ids, end-of-text
    pads, and no special tokens added."""
    import transformers
    from tokenizers import Regex, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    vocab = {tok.enc.decode([i]): i for i in range(tok.vocab_size)}  # EOT included
    inner = HFTokenizer(models.WordLevel(vocab, unk_token=EOT))
    inner.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=inner, eos_token=EOT, pad_token=EOT)
    assert hf(CHARS)["input_ids"] == tok.encode(CHARS)  # every character, the same ids, no extras
    return hf


def trl_dataset(settings, seed):
    """The queries train_sdft.py draws, step by step: micro-batch 0's stream, random.Random(seed).
    TRL composes the teacher prompt as "{privileged_context}{prompt}", so the privileged context
    is data.teacher_prompt's text before the student prompt: the teacher sees our prompt."""
    import datasets
    rng, rows = random.Random(seed), {"prompt": [], "privileged_context": []}
    for _ in range(settings["steps"]):
        students, _, teachers = skill_examples(rng, settings["skills"], settings["batch_size"],
                                               settings["demo_style"])
        for s, t in zip(students, teachers):
            assert t.endswith(s)
            rows["prompt"].append(s)
            rows["privileged_context"].append(t[:-len(s)])
    return datasets.Dataset.from_dict(rows)


def score_with_mask_positions(trainer):
    """The fix, and the only change to TRL: SDFTTrainer._forward_logits (its scoring pass, for
    the student and the teacher) calls the model with input_ids and attention_mask only; here
    the model it calls also gets position ids from the attention mask. The rest is TRL's."""
    forward_logits = trainer._forward_logits  # TRL's method, bound

    def with_positions(model, input_ids, attention_mask, logits_to_keep):
        model = partial(model, position_ids=mask_positions(attention_mask))  # (B, T)
        return forward_logits(model, input_ids, attention_mask, logits_to_keep)

    trainer._forward_logits = with_positions


def trl_config(settings, seed):
    """SDFTConfig's arguments for train_sdft.py's settings (output_dir aside). The optimizer and
    schedule are passed in as objects (trl_optimizer): the HF learning-rate flags do nothing."""
    return dict(
        seed=seed, use_cpu=True, bf16=False, report_to="none",
        per_device_train_batch_size=settings["batch_size"], gradient_accumulation_steps=1,
        max_steps=settings["steps"], max_grad_norm=settings["grad_clip"],
        logging_steps=1, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        shuffle_dataset=False,  # the batches in train_sdft.py's order
        activation_checkpointing=False,  # recomputing activations: slower, the same math
        num_generations=1, temperature=FIXED["temperature"], top_p=1.0, top_k=0,  # plain sampling
        max_completion_length=settings["max_new_tokens"], max_prompt_length=None,
        distillation_mode="full_logits", distillation_alpha=settings["alpha"],  # forward KL
        teacher_model_kind=settings["teacher"], teacher_update_rate=settings["ema_rate"],
        teacher_sync_steps=1, num_loss_tokens_to_skip=settings["skip"],
        distillation_is_clip=None,  # no importance-sampling correction: ours has none
        teacher_prompt_template="{privileged_context}{prompt}")


def trl_optimizer(model, settings):
    """train_sdft.py's AdamW and schedule (linear warmup, cosine to 10% of the peak: model.py's
    cosine_lr), over the trainable parameters only (the zero biases stay frozen)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings["lr"], betas=FIXED["betas"],
                                  eps=FIXED["adam_eps"], weight_decay=FIXED["weight_decay"])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_lr(step, 1.0, settings["warmup"], settings["steps"]))
    return optimizer, schedule


def stop_callback(settings, tok, record, dataset):
    """A TrainerCallback doing train_sdft.py's bookkeeping: validate every eval_every steps
    with eval.py on the model converted back, stop at stop_at; log each step's KL, rate and
    length; and check, step by step, that TRL's student and teacher prompts are ours."""
    from transformers import TrainerCallback
    B = settings["batch_size"]
    students = dataset["prompt"]
    teachers = [c + s for c, s in zip(dataset["privileged_context"], students)]

    class StopAtValidation(TrainerCallback):
        def on_generation_prompts_selected(self, args, state, control, generation_prompts,
                                           **_):
            step = state.global_step  # the step about to be taken
            assert generation_prompts == students[step * B:(step + 1) * B], step

        def on_self_distillation_batch_prepared(self, args, state, control, teacher_input_ids,
                                                teacher_attention_mask, **_):
            step = state.global_step
            for i, (ids, mask) in enumerate(zip(teacher_input_ids, teacher_attention_mask)):
                prompt = tok.encode(teachers[step * B + i])
                real = ids[mask.bool()].tolist()  # the teacher's prompt, then the completion
                assert real[:len(prompt)] == prompt, (step, i)

        def on_step_begin(self, args, state, control, optimizer=None, **_):
            record["lr"].append(optimizer.param_groups[0]["lr"])  # this step's rate

        def on_log(self, args, state, control, logs=None, **_):
            if "sdft/distillation_loss" in logs:  # the step's token-mean KL, as ours logs it
                record["kl"].append(logs["sdft/distillation_loss"])
                record["length"].append(logs["completions/mean_length"])

        def on_step_end(self, args, state, control, model=None, **_):
            record["steps"] = state.global_step
            if state.global_step % settings["eval_every"] == 0:
                if validate(model, tok, settings, record, state.global_step):
                    control.should_training_stop = True

    return StopAtValidation()


def validate(hf, tok, settings, record, step):
    """train_sdft.py's validation: the skill's accuracy on eval_n validation queries, measured
    by eval.py on the model converted back. True when the run should stop."""
    skill = settings["skills"]
    val_acc = evaluate(from_hf(hf), tok, [skill], CPU, "val", settings["eval_n"])[skill]
    record["val_acc"].append([step, val_acc])
    print(f"  step {step} | val_acc {val_acc:.2f}")
    return val_acc >= settings["stop_at"]


def run_trl(settings, seed, base, tok, fix_positions):
    """TRL's SDFTTrainer from the converted base, as shipped or with score_with_mask_positions;
    returns what run_ours returns, read off the callback, and the final weights converted back."""
    import transformers
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer
    record = {"steps": 0, "kl": [], "length": [], "lr": [], "val_acc": []}
    with tempfile.TemporaryDirectory() as tmp:
        # SDFTTrainer builds its EMA teacher from the student's path: the converted base, saved
        path = os.path.join(tmp, "base")
        to_hf(base, tok.eot_id).save_pretrained(path)
        student = transformers.GPT2LMHeadModel.from_pretrained(path)
        frozen = linear_biases(student.config.n_layer)
        for name, p in student.named_parameters():
            if name in frozen:
                p.requires_grad_(False)  # our GPT has no biases: theirs stay zero
        dataset = trl_dataset(settings, seed)
        config = SDFTConfig(output_dir=tmp, **trl_config(settings, seed))
        trainer = SDFTTrainer(model=student, args=config,
                              train_dataset=dataset, processing_class=hf_tokenizer(tok),
                              optimizers=trl_optimizer(student, settings),
                              callbacks=[stop_callback(settings, tok, record, dataset)])
        trainer.remove_callback(transformers.PrinterCallback)  # its log dicts: ours print less
        if fix_positions:
            score_with_mask_positions(trainer)
        # step 0's validation, before any update, as train_sdft.py's loop starts with it
        t0 = time.time()
        if not validate(student, tok, settings, record, 0):
            trainer.train()
        record["seconds"] = time.time() - t0  # validations included, as ours' stage time
        model = from_hf(trainer.model)
    expected = [cosine_lr(s, settings["lr"], settings["warmup"], settings["steps"])
                for s in range(len(record["lr"]))]
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(record["lr"], expected))
    return {**record, "mean_kl": statistics.mean(record["kl"]) if record["kl"] else None,
            "mean_length": statistics.mean(record["length"]) if record["length"] else None,
            **final_metrics(model, base, tok)}


# -----------------------------------------------------------------------------
# 3. the table

RUNS = {"ours": "ours (train_sdft.py)", "trl_positions": "TRL, positions from mask",
        "trl_shipped": "TRL as shipped"}


def table(results):
    """Markdown: one row per seed and run, then each run's mean over the seeds."""
    skill, stop_at = results["settings"]["skills"], results["settings"]["stop_at"]
    columns = [  # header, value of a run, format
        ("steps to stop", lambda r: r["steps"], "{:.0f}"),
        (f"{skill} test", lambda r: r["accuracy"][skill], "{:.2f}"),
        ("prior mean", lambda r: r["prior_mean"], "{:.2f}"),
        ("mean KL", lambda r: r["mean_kl"], "{:.3f}"),  # logged per step
        ("length", lambda r: r["mean_length"], "{:.1f}"),  # of the rollouts, end-of-text included
        ("KL from base", lambda r: r["kl_from_base"], "{:.3f}"),  # on the skill, after the stage
        ("seconds", lambda r: r["seconds"], "{:.0f}")]
    lines = ["| seed | run | " + " | ".join(c[0] for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]

    def row(seed, name, values, note=""):
        cells = [fmt.format(v) for (_, _, fmt), v in zip(columns, values)]
        cells[0] += note
        return f"| {seed} | {RUNS[name]} | " + " | ".join(cells) + " |"

    for seed, runs in results["seeds"].items():
        for name, r in runs.items():
            stopped = r["val_acc"][-1][1] >= stop_at
            lines.append(row(seed, name, [f(r) for _, f, _ in columns],
                             "" if stopped else " (no stop)"))
    for name in RUNS:
        runs = [runs[name] for runs in results["seeds"].values()]
        lines.append(row("mean", name, [statistics.mean(f(r) for r in runs)
                                        for _, f, _ in columns]))
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds (default 0,1,2; with --quick, 0)")
    parser.add_argument("--out", default=None,
                        help="directory for results.json and table.md (default results/peer; "
                             "with --quick, runs/peer-quick)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a tiny budget to check that every part runs: {QUICK}")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for TRL and evaluation (ours: OMP_NUM_THREADS=1)")
    args = parser.parse_args(argv)
    args.out = args.out or ("runs/peer-quick" if args.quick else "results/peer")
    seeds = args.seeds or ("0" if args.quick else "0,1,2")
    try:
        args.seeds = [int(s) for s in seeds.split(",")]
    except ValueError:
        sys.exit(f"error: --seeds must be comma-separated integers, got '{seeds}'")
    if args.threads < 1:
        sys.exit(f"error: --threads must be positive, got {args.threads}")
    return args


def main():
    args = parse_args()
    versions = import_trl()  # first, so a missing TRL stops before any work
    settings = {**SETTINGS, **(QUICK if args.quick else {})}
    torch.set_num_threads(args.threads)
    try:
        base, _ = load_checkpoint(os.path.join(ROOT, settings["init"]))
    except ValueError as e:
        sys.exit(f"error: {e}")
    tok = Tokenizer()
    results = {"versions": versions, "settings": settings, "fixed": FIXED,
               "trl_config": trl_config(settings, "S"),  # S: each run's seed
               "conversion": check_conversion(base, tok), "seeds": {}}
    prefix = "runs/peer-quick-ours" if args.quick else "runs/peer-ours"
    for seed in args.seeds:
        print(f"seed {seed}: ours")
        runs = {"ours": run_ours(settings, seed, f"{prefix}-{seed}", base, tok)}
        for name, fix in (("trl_positions", True), ("trl_shipped", False)):
            print(f"seed {seed}: {RUNS[name]}")
            runs[name] = run_trl(settings, seed, base, tok, fix)
        for name, r in runs.items():
            print(f"  {RUNS[name]}: {r['steps']} steps, {settings['skills']} "
                  f"{r['accuracy'][settings['skills']]:.2f}, prior {r['prior_mean']:.2f}, "
                  f"mean kl {r['mean_kl']:.4f}")
        results["seeds"][str(seed)] = runs
    os.makedirs(os.path.join(ROOT, args.out), exist_ok=True)
    with open(os.path.join(ROOT, args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(ROOT, args.out, "table.md"), "w") as f:
        f.write(table(results))
    print(table(results), end="")
    print(f"wrote {args.out}/results.json and {args.out}/table.md")


if __name__ == "__main__":
    main()
