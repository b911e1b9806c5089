"""
GPU readiness check: on a CUDA machine, run what has a GPU path and compare it with the CPU.

    python lab/cuda_check.py

1. the tests that have a GPU path (pytest -k "cuda or gpu"; none is an error only if some fail);
2. the model on CUDA against the CPU reference: fp32 greedy generation gives identical tokens,
   with and without the KV cache; KV-cache sampling equals the plain path's on CUDA; bf16
   autocast logits are close to the fp32 CPU logits;
3. one SDFT training step on CUDA, through the real scripts (a 3-step tiny pretraining, then
   train_sdft.py for one step);
4. lab/speed.py --skip-trl on CUDA, whose output is printed in full.
Prints one line per check and exits non-zero if any failed. Without CUDA it prints one line
and exits 0.
"""

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    print("cuda_check: no CUDA device on this machine; nothing to check")
    sys.exit(0)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
from data import (SKILLS, Tokenizer, demonstration, encode_prompts, student_prompt,  # noqa: E402
                  teacher_prompt)
from model import GPT, GPTConfig, autocast  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
device = torch.device("cuda")
# fp32 comparisons need true fp32 matmuls (the default, made explicit)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
failures = []


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        failures.append(name)


def run(*args, timeout=600):
    """A repo script or pytest, with its output; never raises."""
    try:
        return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(e.cmd, 124, e.stdout or "",
                                           f"timed out after {timeout}s")


print(f"cuda_check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}")

# -----------------------------------------------------------------------------
# 1. the tests with a GPU path

proc = run("-m", "pytest", "-q", "-k", "cuda or gpu", "tests")
if proc.returncode == 5:  # pytest: no test selected
    check("tests with a GPU path", True, "none selected by -k 'cuda or gpu'")
else:
    check("tests with a GPU path", proc.returncode == 0,
          proc.stdout.strip().splitlines()[-1] if proc.stdout else "")

# -----------------------------------------------------------------------------
# 2. the model on CUDA against the CPU reference

tok = Tokenizer()
# the toy's skills and formats; lengths differ: left padding
prompts = [student_prompt("rev", "abc"),
           teacher_prompt("zag", "cabdef", demonstration(SKILLS["zag"]("cabdef"), "expert")),
           student_prompt("drop", "jihgfe"),
           teacher_prompt("jab", "bca", demonstration(SKILLS["jab"]("bca"), "own"))]
ids, mask = encode_prompts(tok, prompts)
torch.manual_seed(1)
cpu_model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()
with torch.no_grad():
    # large weights: greedy continuations depend on the context, few near-ties
    for p in cpu_model.parameters():
        if p.dim() == 2:
            p.normal_(0.0, 0.2)
cuda_model = GPT(cpu_model.config).to(device).eval()
cuda_model.load_state_dict(cpu_model.state_dict())

reference = cpu_model.generate(ids, mask, max_new_tokens=24, temperature=0.0)  # (B, 24), CPU fp32
for use_cache in (True, False):
    out = cuda_model.generate(ids.to(device), mask.to(device), max_new_tokens=24, temperature=0.0,
                              use_cache=use_cache).cpu()
    same = torch.equal(out, reference)
    check(f"fp32 greedy generation on CUDA, use_cache={use_cache}, equals CPU", same,
          "" if same else f"{(out != reference).sum().item()} of {out.numel()} tokens differ")

samples = [cuda_model.generate(ids.to(device), mask.to(device), max_new_tokens=24, temperature=1.0,
                               generator=torch.Generator(device).manual_seed(7), eot_id=tok.eot_id,
                               use_cache=use_cache) for use_cache in (True, False)]
check("sampled generation on CUDA: KV cache equals plain", torch.equal(samples[0], samples[1]))

with torch.no_grad():
    cpu_logits = cpu_model(ids, mask)  # (B, T, V)
    with autocast(device):
        bf16_logits = cuda_model(ids.to(device), mask.to(device)).float().cpu()
real = mask.bool()  # padding positions' outputs are never used
error = ((bf16_logits - cpu_logits)[real].abs().max() / cpu_logits[real].abs().max()).item()
agree = (bf16_logits.argmax(-1) == cpu_logits.argmax(-1))[real].float().mean().item()
check("bf16 autocast logits close to CPU fp32", error < 0.05 and agree > 0.9,
      f"max error {error:.2%} of the largest logit, argmax agrees at {agree:.0%} of positions")

# -----------------------------------------------------------------------------
# 3. one SDFT training step on CUDA, through the scripts

with tempfile.TemporaryDirectory() as tmp:
    base, sdft = os.path.join(tmp, "base.pt"), os.path.join(tmp, "sdft")
    proc = run("lab/pretrain.py", "--steps", 3, "--n-layer", 1, "--n-embd", 32, "--n-head", 2,
               "--device", "cuda", "--out", base)
    check("tiny pretraining on CUDA (lab/pretrain.py)", proc.returncode == 0,
          proc.stderr.strip()[-300:])
    # stop-at 1: never skip the step
    proc = run("train_sdft.py", "--init", base, "--skills", "jab", "--steps", 1,
               "--eval-n", 4, "--stop-at", 1, "--device", "cuda", "--out", sdft)
    losses = []
    if proc.returncode == 0:
        with open(os.path.join(sdft, "metrics.jsonl")) as f:
            losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    check("one SDFT step on CUDA (train_sdft.py)", proc.returncode == 0 and len(losses) >= 1
          and all(math.isfinite(x) for x in losses),
          proc.stderr.strip()[-300:] if proc.returncode else
          f"loss {losses[0]:.4f}" if losses else "no loss logged")

# -----------------------------------------------------------------------------
# 4. the benchmark on CUDA

proc = run("lab/speed.py", "--skip-trl", "--device", "cuda")
print(proc.stdout, end="")
last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
check("lab/speed.py --skip-trl on CUDA", proc.returncode == 0 and last.startswith("cache_speedup="),
      proc.stderr.strip()[-300:] if proc.returncode else last)

print(f"cuda_check: {'all checks passed' if not failures else 'FAILED: ' + ', '.join(failures)}")
sys.exit(1 if failures else 0)
