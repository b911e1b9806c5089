"""
Benchmark: how fast generation and an SDFT step run, where the step's time goes, and how
it compares with SFT and with TRL's SDFTTrainer on the same work.

    python lab/speed.py                          # CPU: about 30 s (--threads 1 if the cores
                                                   are shared)
    python lab/speed.py --skip-trl --device cuda # GPU, without the TRL side-by-side
    pip install -r lab/requirements-speed.txt    # TRL and its dependencies, for the side-by-side

Each figure is the median over --repeats timed runs, after --warmup untimed ones; what is
compared takes turns run by run, so that other load on the machine hits both sides alike:
1. generation with the KV cache vs the plain path (the whole sequence recomputed for every
   token): tokens/s at batch 64, 32 new tokens;
2. one SDFT step (train_sdft.py's: batch, sdft.sdft_loss (rollout, teacher and student passes),
   update, EMA) vs one SFT step (train_sft.py's) on the same queries, and the SDFT step's
   phases;
3. the model FLOPs of each phase, counted from the model's shapes, and the FLOP/s achieved,
   against a large matmul on the same device (the practical ceiling);
4. TRL's SDFTTrainer on a GPT-2 of the same size doing the same work: completions/s.
The last line reads `cache_speedup=X sdft_over_sft=Y trl_speedup=Z` (trl_speedup=nan
without TRL or with --skip-trl).

Simplified relative to training: a freshly initialised model of train_sft.py's default size
(speed does not depend on the weights once lengths are fixed), and rollouts of a fixed length
(end-of-text does not end them), so that every run, and both implementations, do the same work.
"""

import argparse
import contextlib
import io
import os
import random
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

# the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import CHARS, EOT, Tokenizer, encode_prompts, sft_batch, skill_examples
from model import GPT, GPTConfig, autocast, get_device
from sdft import ema_update, make_teacher, sdft_loss

# -----------------------------------------------------------------------------
# arguments

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
# run
parser.add_argument("--device", default=None,
                    help="cuda, mps or cpu (default: the best available)")
parser.add_argument("--threads", type=int, default=None,
                    help="CPU threads for PyTorch (default: PyTorch's own choice)")
parser.add_argument("--repeats", type=int, default=10,
                    help="timed runs per measurement; the median is reported")
parser.add_argument("--warmup", type=int, default=2, help="untimed runs before each measurement")
parser.add_argument("--seed", type=int, default=0,
                    help="seeds the model, the queries and the samples")
parser.add_argument("--skip-trl", action="store_true",
                    help="leave out the side-by-side with TRL's SDFTTrainer")
# work
parser.add_argument("--gen-batch-size", type=int, default=64,
                    help="prompts per batch in the generation benchmark")
parser.add_argument("--gen-tokens", type=int, default=32,
                    help="new tokens per prompt in the generation benchmark")
parser.add_argument("--batch-size", type=int, default=32,
                    help="queries per SDFT, SFT and TRL step (one rollout each)")
parser.add_argument("--new-tokens", type=int, default=16,
                    help="rollout length, fixed, in the SDFT and TRL steps")
args = parser.parse_args()

try:
    for flag in ("repeats", "gen_batch_size", "gen_tokens", "batch_size", "new_tokens"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, "
                             f"got {getattr(args, flag)}")
    if args.warmup < 0 or (args.threads is not None and args.threads <= 0):
        raise ValueError("--warmup must be non-negative and --threads positive")
    device = get_device(args.device)
except ValueError as e:
    sys.exit(f"error: {e}")
if args.threads:
    torch.set_num_threads(args.threads)

# -----------------------------------------------------------------------------
# setup

random.seed(args.seed)
torch.manual_seed(args.seed)
tok = Tokenizer()
config = GPTConfig(vocab_size=tok.vocab_size)  # train_sft.py's default size
model = GPT(config).to(device)
data_rng = random.Random(args.seed)
generator = torch.Generator(device).manual_seed(args.seed)
print(f"model: {model.num_params() / 1e6:.2f}M parameters, {config.n_layer} layers, "
      f"width {config.n_embd}, {config.n_head} heads, vocab {config.vocab_size} | {device}, "
      f"{torch.get_num_threads()} threads | torch {torch.__version__} "
      f"| median of {args.repeats} runs after {args.warmup}")
# other work on the cores skews timings
load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
print(f"load average before the start: {load:.2f} on {os.cpu_count()} cores")
if load >= 1 and torch.get_num_threads() > 1:
    print("warning: with other processes on the cores, more than one thread per process can make "
          "small ops many times slower (a waiting thread waits for its core); try --threads 1")


def sync():
    """Wait for the device: GPU work is asynchronous, and a timer must not stop before it ends."""
    if device.type == "cuda":
        torch.cuda.synchronize()


class Clock:
    """Seconds per named phase of one step. The device is synced at each boundary, so GPU work
    is charged to the phase that launched it."""

    def __init__(self):
        sync()
        self.phases, self.t = {}, time.perf_counter()

    def lap(self, name):
        sync()
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self.t
        self.t = now


def median_phases(*steps):
    """For each step function, the median seconds of each phase and of the whole step over
    --repeats steps after --warmup. The functions take turns, one step each, so that a burst
    of other load on the machine hits them alike."""
    for _ in range(args.warmup):
        for step in steps:
            step()
    runs = [[step() for step in steps] for _ in range(args.repeats)]
    return [medians_of([run[i] for run in runs]) for i in range(len(steps))]


def medians_of(runs):
    """Median of each phase, and of the total, over a list of {phase: seconds} runs."""
    medians = {name: statistics.median(run[name] for run in runs) for name in runs[0]}
    medians["total"] = statistics.median(sum(run.values()) for run in runs)
    return medians


def median_seconds(*fns):
    """median_phases for plain functions: the median seconds of each fn(), taking turns."""
    def timed(fn):
        clock = Clock()
        fn()
        clock.lap("run")
        return clock.phases
    return [medians["total"]
            for medians in median_phases(*(lambda fn=fn: timed(fn) for fn in fns))]


# -----------------------------------------------------------------------------
# FLOPs from the model's shapes

# Weights that take part in a matmul: per block qkv (3 C^2), proj (C^2) and the MLP (8 C^2), plus
# the output head (V C, tied to the token embedding, whose lookup costs nothing). Positions are
# lookups too.
C, L = config.n_embd, config.n_layer
N_MATMUL = L * 12 * C * C + config.vocab_size * C
FLOPS_FORMULA = (f"forward = 2 N per token + 4 L C per (query, key) pair, "
                 f"with N = {N_MATMUL / 1e6:.2f}M matmul weights and attention counted dense; "
                 f"forward+backward = 3x forward; optimizer not counted")


def forward_flops(rows, tokens, context):
    """Forward FLOPs for `rows` sequences of `tokens` positions each attending to `context` keys:
    2 per weight per token, plus attention's QK^T and AV, 2 * 2 * C per layer per (query, key)
    pair, counted dense (the masked-out scores are computed too)."""
    return rows * tokens * (2 * N_MATMUL + 4 * L * C * context)


def generation_flops(rows, prompt_len, new_tokens, use_cache):
    """The prompt's prefill, then one forward per further token: of the newest token alone with
    the cache, of the whole sequence so far without it."""
    flops = forward_flops(rows, prompt_len, prompt_len)
    for length in range(prompt_len + 1, prompt_len + new_tokens):
        flops += forward_flops(rows, 1 if use_cache else length, length)
    return flops


def gflops(flops, seconds):
    return flops / seconds / 1e9


# -----------------------------------------------------------------------------
# the ceiling: one large matmul, in the precision the model computes in

n = 8192 if device.type == "cuda" else 2048
# autocast runs matmuls in bf16 on CUDA
dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
a, b = (torch.randn(n, n, device=device, dtype=dtype),
        torch.randn(n, n, device=device, dtype=dtype))
ceiling = gflops(2 * n ** 3, median_seconds(lambda: a @ b)[0])
del a, b
print(f"\nmatmul ceiling: {ceiling:.1f} GFLOP/s ({n}x{n} @ {n}x{n}, {dtype})")

# -----------------------------------------------------------------------------
# 1. generation: KV cache vs plain path

students, _, _ = skill_examples(data_rng, "jab", args.gen_batch_size, "expert")
gen_ids, gen_mask = [t.to(device) for t in encode_prompts(tok, students)]
model.eval()


def generate(use_cache):
    # No eot_id: no row ever finishes, so both paths produce exactly --gen-tokens tokens per row.
    with autocast(device):
        model.generate(gen_ids, gen_mask, args.gen_tokens, temperature=1.0, generator=generator,
                       use_cache=use_cache)


print(f"\n1. generation: {args.gen_batch_size} prompts of up to {gen_ids.shape[1]} tokens, "
      f"{args.gen_tokens} new tokens each, sampled at temperature 1")
print(f"  {'':8s} {'tokens/s':>9s} {'ms':>8s} {'GFLOP':>7s} {'GFLOP/s':>8s} {'/ceiling':>9s}")
gen_seconds = dict(zip(("KV cache", "plain"),
                       median_seconds(lambda: generate(True), lambda: generate(False))))
for use_cache in (True, False):
    name = "KV cache" if use_cache else "plain"
    seconds = gen_seconds[name]
    flops = generation_flops(args.gen_batch_size, gen_ids.shape[1], args.gen_tokens, use_cache)
    print(f"  {name:8s} {args.gen_batch_size * args.gen_tokens / seconds:9.0f} "
          f"{seconds * 1000:8.1f} {flops / 1e9:7.2f} {gflops(flops, seconds):8.2f} "
          f"{gflops(flops, seconds) / ceiling:9.1%}")
cache_speedup = gen_seconds["plain"] / gen_seconds["KV cache"]
print(f"  KV cache: {cache_speedup:.1f}x the plain path's tokens/s")

# -----------------------------------------------------------------------------
# 2. one SDFT step vs one SFT step on the same queries; 3. their FLOPs

# passed as the end-of-text id: no token is -1, so every rollout runs --new-tokens tokens
NEVER = -1
students, demos, teachers = skill_examples(data_rng, "jab", args.batch_size, "expert")
teacher = make_teacher(model, "ema")
sdft_optimizer = torch.optim.AdamW(model.parameters(), lr=3e-5, betas=(0.9, 0.95),
                                   weight_decay=0.0)
sft_optimizer = torch.optim.AdamW(model.parameters(), lr=3e-5, betas=(0.9, 0.95),
                                  weight_decay=0.0)
model.train()


def sdft_step():
    """train_sdft.py's step with its defaults (sdft.sdft_loss: forward KL, no first tokens
    skipped; then the update and the EMA teacher at 0.01), timed by phase."""
    clock = Clock()
    student_ids, student_mask, teacher_ids, teacher_mask = [
        t.to(device) for t in (*encode_prompts(tok, students), *encode_prompts(tok, teachers))]
    clock.lap("batch")
    with autocast(device):
        loss, step = sdft_loss(model, teacher, student_ids, student_mask, teacher_ids,
                               teacher_mask, args.new_tokens, NEVER, generator=generator)
    clock.lap("sdft_loss")  # the rollout (timed inside sdft_loss), then both forward passes
    forward = clock.phases.pop("sdft_loss") - step["rollout_s"]
    clock.phases |= {"generation": step["rollout_s"], "teacher and student forward": forward}
    assert torch.isfinite(loss)  # train_sdft.py checks this before every update
    sdft_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clock.lap("student backward")
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    sdft_optimizer.step()
    ema_update(teacher, model, rate=0.01)
    clock.lap("optimizer + EMA")
    return clock.phases


def sft_step():
    """train_sft.py's loop body (loss on the demonstration tokens only), timed by phase."""
    clock = Clock()
    ids, mask, target_mask = [t.to(device) for t in sft_batch(tok, students, demos)]
    clock.lap("batch")
    with autocast(device):
        logits = model(ids[:, :-1], mask[:, :-1])  # (B, T-1, V): predicts ids[:, 1:]
    token_loss = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:],
                                 reduction="none")  # (B, T-1)
    weights = target_mask[:, 1:].float()
    loss = (token_loss * weights).sum() / weights.sum()  # mean over target tokens
    assert torch.isfinite(loss)
    sft_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clock.lap("forward+backward")
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    sft_optimizer.step()
    clock.lap("optimizer")
    return clock.phases


# Sequence lengths as the passes see them (left-padded to the batch's longest).
B, N = args.batch_size, args.new_tokens
P_student, P_teacher = (encode_prompts(tok, prompts)[0].shape[1]
                        for prompts in (students, teachers))
T_sft = sft_batch(tok, students, demos)[0].shape[1]
# completion_logits drops the last token
student_len, teacher_len = P_student + N - 1, P_teacher + N - 1
sdft_flops = {"generation": generation_flops(B, P_student, N, use_cache=True),
              "teacher and student forward": (forward_flops(B, teacher_len, teacher_len)
                                              + forward_flops(B, student_len, student_len)),
              "student backward": 2 * forward_flops(B, student_len, student_len)}
sft_flops = {"forward+backward": 3 * forward_flops(B, T_sft - 1, T_sft - 1)}

sdft_seconds, sft_seconds = median_phases(sdft_step, sft_step)
sdft_over_sft = sdft_seconds["total"] / sft_seconds["total"]


def print_phases(label, seconds, flops):
    for name, s in seconds.items():
        f = sum(flops.values()) if name == "total" else flops.get(name)
        rate = (f"{f / 1e9:7.2f} {gflops(f, s):8.2f} {gflops(f, s) / ceiling:9.1%}" if f
                else f"{'-':>7s} {'-':>8s} {'-':>9s}")
        print(f"  {label:5s} {name:25s} {s * 1000:8.1f} {s / seconds['total']:6.0%} {rate}")
        label = ""


print(f"\n2. one step on the same {B} queries (jab, expert demonstrations): "
      f"SFT on prompt + demonstration ({T_sft} tokens); SDFT with {N}-token rollouts "
      f"(student {P_student + N}, teacher {P_teacher + N} tokens)")
print(f"  {'':5s} {'phase':25s} {'ms':>8s} {'share':>6s} "
      f"{'GFLOP':>7s} {'GFLOP/s':>8s} {'/ceiling':>9s}")
print_phases("SDFT", sdft_seconds, sdft_flops)
print_phases("SFT", sft_seconds, sft_flops)
print(f"  SDFT step / SFT step: {sdft_over_sft:.2f}x wall-clock, "
      f"{sum(sdft_flops.values()) / sum(sft_flops.values()):.2f}x FLOPs")
print(f"3. FLOPs: {FLOPS_FORMULA}")

# -----------------------------------------------------------------------------
# 4. TRL's SDFTTrainer on the same work


def trl_seconds():
    """Median seconds of TRL's SDFT step, of its generation, and of its SFT step (SFTTrainer), on
    a GPT-2 of our model's depth, width, heads and vocabulary, over the same queries and
    demonstrations, each TRL step followed by one of ours (sdft_step, sft_step), whose median
    phases come back too; None when TRL is not installed. A TRL step is timed from the
    trainer's step-begin to its step-end callback, the EMA teacher update included."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # everything is built locally: never reach for the Hub
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"  # we know trl.experimental is experimental
    try:  # imported here: TRL is a benchmark-only extra (lab/requirements-speed.txt)
        import datasets
        import transformers
        import trl
        from tokenizers import Regex, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer
        from trl import SFTConfig, SFTTrainer
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer
    except (ImportError, NameError) as e:  # NameError: trl 1.13's sdft module without peft
        print(f"\n4. TRL: not available ({type(e).__name__}: {e}); "
              "pip install -r lab/requirements-speed.txt")
        return None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)

    # Our tokenizer as a Hugging Face one: one token per character, the same ids, end-of-text pads.
    vocab = {c: tok.encode(c)[0] for c in CHARS} | {EOT: tok.eot_id}
    hf_tok = HFTokenizer(models.WordLevel(vocab, unk_token=EOT))
    hf_tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=hf_tok, eos_token=EOT,
                                                     pad_token=EOT)
    assert tokenizer(teachers)["input_ids"] == [tok.encode(t) for t in teachers]

    class StepTimer(transformers.TrainerCallback):
        """Times each of the trainer's steps, then runs one of ours (`our_step`): the two
        implementations alternate step by step, so a burst of other load hits both alike."""

        def __init__(self, our_step):
            self.seconds, self.our_step, self.ours = [], our_step, []

        def on_step_begin(self, *_, **__):
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            sync()
            self.seconds.append(time.perf_counter() - self.t0)
            self.ours.append(self.our_step())

    def median_steps(trainer, our_step):
        """Train --warmup + --repeats steps, each followed by one our_step(); the median seconds
        of the trainer's last --repeats steps, and the median phases of ours."""
        timer = StepTimer(our_step)
        trainer.add_callback(timer)  # after the trainer's own callbacks, so after the EMA update
        with contextlib.redirect_stdout(io.StringIO()):  # the trainer's end-of-training summary
            trainer.train()
        return (statistics.median(timer.seconds[args.warmup:]),
                medians_of(timer.ours[args.warmup:]))

    with tempfile.TemporaryDirectory() as tmp:
        # A GPT-2 of our size, saved locally: SDFTTrainer builds its EMA teacher from the model's
        # path.
        path = os.path.join(tmp, "gpt2")
        torch.manual_seed(args.seed)
        transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=C, n_layer=L,
            n_head=config.n_head,
            # GPT-2's default dropout is 0.1; ours has none
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=tok.eot_id, eos_token_id=tok.eot_id,
            pad_token_id=tok.eot_id)).save_pretrained(path)
        common = dict(per_device_train_batch_size=B, max_steps=args.warmup + args.repeats,
                      learning_rate=3e-5, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
                      lr_scheduler_type="constant", logging_steps=args.warmup + args.repeats,
                      save_strategy="no", report_to="none", use_cpu=device.type == "cpu",
                      bf16=device.type == "cuda", seed=args.seed, disable_tqdm=True,
                      dataloader_num_workers=0, shuffle_dataset=False,
                      # TRL's default recomputes activations: not the same work
                      gradient_checkpointing=False)

        sdft_config = SDFTConfig(
            output_dir=os.path.join(tmp, "sdft"), **common,
            # one completion per prompt, sampled at temperature 1
            num_generations=1, temperature=1.0,
            # exactly N tokens, as ours
            max_completion_length=N, generation_kwargs={"min_new_tokens": N},
            # forward KL(teacher || student), full vocabulary
            distillation_mode="full_logits", distillation_alpha=0.0,
            teacher_model_kind="ema", teacher_update_rate=0.01, num_loss_tokens_to_skip=0,
            # as long as data.teacher_prompt's
            teacher_prompt_template="{prompt}{privileged_context}\n{prompt}",
            max_prompt_length=None)
        sdft_data = datasets.Dataset.from_dict({"prompt": students, "privileged_context": demos})
        trainer = SDFTTrainer(model=path, args=sdft_config, train_dataset=sdft_data,
                              processing_class=tokenizer)
        generation_seconds, generate = [], trainer._generate_transformers

        def timed_generate(prompt_ids):  # TRL's generation call, timed
            sync()
            t0 = time.perf_counter()
            out = generate(prompt_ids)
            sync()
            generation_seconds.append(time.perf_counter() - t0)
            # the same work: exactly N tokens each
            assert all(len(completion) == N for completion in out[1])
            return out

        trainer._generate_transformers = timed_generate
        sdft, ours = median_steps(trainer, sdft_step)

        sft_config = SFTConfig(output_dir=os.path.join(tmp, "sft"), **common, max_length=None)
        # loss on the demonstration
        sft_data = datasets.Dataset.from_dict({"prompt": students, "completion": demos})
        sft_trainer = SFTTrainer(model=path, args=sft_config, train_dataset=sft_data,
                                 processing_class=tokenizer)
        sft, ours_sft = median_steps(sft_trainer, sft_step)
    return {"version": f"trl {trl.__version__}, transformers {transformers.__version__}",
            "sdft": sdft, "generation": statistics.median(generation_seconds[args.warmup:]),
            "sft": sft, "ours": ours, "ours_sft": ours_sft}


trl_speedup = float("nan")
trl = None if args.skip_trl else trl_seconds()
if trl is not None:
    ours, ours_sft = trl["ours"], trl["ours_sft"]  # measured step by step alternating with TRL's
    # the completions/s ratio: B completions per step on both sides
    trl_speedup = trl["sdft"] / ours["total"]
    print(f"\n4. TRL's SDFTTrainer ({trl['version']}) vs this repo, same work: "
          f"a GPT-2 of the same size, {B} prompts, one {N}-token completion each (length forced), "
          f"forward KL over the full vocabulary, EMA teacher, {torch.get_num_threads()} threads")
    print(f"  {'':10s} {'SDFT step ms':>13s} {'generation ms':>14s} {'completions/s':>14s} "
          f"{'SFT step ms':>12s} {'SDFT/SFT':>9s}")
    for name, sdft, generation, sft in (("TRL", trl["sdft"], trl["generation"], trl["sft"]),
                                        ("this repo", ours["total"], ours["generation"],
                                         ours_sft["total"])):
        print(f"  {name:10s} {sdft * 1000:13.1f} {generation * 1000:14.1f} {B / sdft:14.0f} "
              f"{sft * 1000:12.1f} {sdft / sft:9.2f}")
    print(f"  this repo: {trl_speedup:.2f}x TRL's completions/s (the two alternate step by step; "
          f"TRL's SFT step: its SFTTrainer on the same model and queries, "
          f"loss on the demonstration)")

print(f"\ncache_speedup={cache_speedup:.2f} sdft_over_sft={sdft_over_sft:.2f} "
      f"trl_speedup={trl_speedup:.2f}")
