"""
A small GPT, written from scratch, with batched KV-cache generation.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=42))
    logits = model(idx, attention_mask)          # (B, T, V): every position
    new_tokens = model.generate(idx, attention_mask, max_new_tokens=32, temperature=0.0)

The architecture is GPT-2's (learned absolute position embeddings, pre-norm
blocks, GELU MLP, tied input/output embeddings), minus dropout and biases.
Two things matter for SDFT and differ from nanoGPT:
- Rows may be left-padded. Position ids come from the attention mask
  (cumulative sum minus one), so a sequence gets the same logits alone and
  inside a padded batch; the student and teacher passes rely on this.
- `forward` returns logits at every position: the teacher scores a whole
  completion in one pass.
"""

import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 42  # the toy character tokenizer's size (data.py)
    block_size: int = 128  # longest sequence, prompt and completion together
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128


class KVCache:
    """Keys and values of every layer for the tokens seen so far, (B, H, T, D) per layer."""

    def __init__(self, n_layer):
        self.k = [None] * n_layer
        self.v = [None] * n_layer
        self.pos = 0  # how many tokens are cached

    def update(self, layer, k, v):
        # Concatenation is simple and, at these sizes, as fast as filling a preallocated buffer.
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.layer = layer  # index into the KV cache
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, mask, cache):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in (q, k, v))  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, H, T_past + T, D)
        # mask is None only for unpadded full sequences, where the fused causal kernel applies
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, mask, cache):
        x = x + self.attn(self.ln1(x), mask, cache)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied head: one matrix embeds and unembeds
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, attention_mask=None, cache=None):
        """
        idx: (B, T) token ids; attention_mask: (B, T_past + T), 1 for real tokens, 0 for
        left padding, covering the cached tokens too; cache: a KVCache or None.
        Returns logits at every position, (B, T, V).
        """
        B, T = idx.shape
        past = cache.pos if cache is not None else 0
        assert past + T <= self.config.block_size, (f"sequence of {past + T} tokens exceeds "
                                                    f"block_size {self.config.block_size}")
        if attention_mask is None and cache is None:
            positions = torch.arange(T, device=idx.device)[None]  # (1, T)
            mask = None  # plain causal attention
        else:
            if attention_mask is None:
                attention_mask = torch.ones(B, past + T, dtype=torch.long, device=idx.device)
            # Position ids count real tokens only, so left padding shifts nothing.
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
            q_idx = torch.arange(past, past + T, device=idx.device)[:, None]  # (T, 1)
            k_idx = torch.arange(past + T, device=idx.device)[None, :]  # (1, T_past + T)
            # Causal, and never look at padding. A padding query also sees itself, so no
            # softmax row is empty (that would be NaN); its output is never used.
            mask = (((k_idx <= q_idx) & attention_mask.bool()[:, None, :])
                    | (k_idx == q_idx))  # (B, T, T_past + T)
            mask = mask[:, None]  # (B, 1, T, T_past + T): broadcast over heads
        x = self.wte(idx) + self.wpe(positions)
        for block in self.blocks:
            x = block(x, mask, cache)
        if cache is not None:
            cache.pos += T
        return self.lm_head(self.ln_f(x))  # (B, T, V)

    @torch.inference_mode()
    def generate(self, idx, attention_mask=None, max_new_tokens=32, temperature=1.0, top_k=None,
                 generator=None, eot_id=None, use_cache=True):
        """
        Continue each left-padded prompt in idx (B, T). Returns the new tokens, (B, N),
        N <= max_new_tokens. temperature 0 is greedy; top_k keeps the k most likely tokens;
        sampling draws from `generator`, so the same generator state gives the same samples.
        A row that has produced eot_id is finished: every later token in it is eot_id.
        use_cache=False recomputes the whole sequence each step (the plain reference path
        for tests).
        """
        B = idx.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        cache = KVCache(self.config.n_layer) if use_cache else None
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        new_tokens = []
        logits = self(idx, attention_mask, cache)[:, -1]  # (B, V): prefill the prompt
        for t in range(max_new_tokens):
            token = sample_next_token(logits, temperature, top_k, generator)  # (B,)
            if eot_id is not None:
                token = torch.where(done, eot_id, token)  # finished rows stay finished
                done = done | (token == eot_id)
            new_tokens.append(token)
            # Checking for "all finished" forces a device sync; do it every 8 tokens only.
            if t == max_new_tokens - 1 or (eot_id is not None and t % 8 == 7 and done.all()):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
            idx = torch.cat([idx, token[:, None]], dim=1)
            step_input = token[:, None] if use_cache else idx  # cached: feed only the new token
            logits = self(step_input, attention_mask, cache)[:, -1]
        return torch.stack(new_tokens, dim=1)


def sample_next_token(logits, temperature, top_k=None, generator=None):
    """Pick one token per row from logits (B, V): argmax when temperature is 0, else sample."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -----------------------------------------------------------------------------
# device and precision

def get_device(name=None):
    """The requested device, else cuda, then mps, then cpu. Raises ValueError (one sentence)
    for a device name PyTorch does not know or a device this machine does not have."""
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"unknown device '{name}' (cuda, mps or cpu)") from None
        available = {"cpu": True, "cuda": torch.cuda.is_available(),
                     "mps": torch.backends.mps.is_available()}
        if not available.get(device.type, False):
            raise ValueError(f"device '{name}' is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device):
    """bf16 autocast on CUDA; full fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def cosine_lr(step, peak, warmup, steps):
    """The training scripts' schedule: linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# -----------------------------------------------------------------------------
# checkpoints: one dict {model, model_config, args, step, ...}; the training scripts add
# what --resume needs (stage, stage_done, teacher, optimizer, RNG states, metrics_lines)

def save_checkpoint(path, model, args, step, **extra):
    """Write atomically: to a temporary file, then rename over the old one, so an
    interrupted save never leaves a half-written file where a good checkpoint was."""
    ckpt = {"model": model.state_dict(), "model_config": asdict(model.config),
            "args": dict(vars(args)), "step": step, **extra}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    """Return (model, checkpoint dict). The model's size is read from the checkpoint.
    Raises ValueError with one clear sentence for a missing or unreadable file."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except Exception as e:  # truncated, corrupt, or not a checkpoint of this model at all
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None
    return model.to(device), ckpt


def check_resume(ckpt, path, model, stages, args, n_shards):
    """Raise ValueError (one sentence) unless ckpt continues this run: the same model config,
    skills, micro-batches in all, and settings (--out, --resume, --ckpt-every and how the
    micro-batches are spread over processes and --grad-accum may change)."""
    if "optimizer" not in ckpt:
        raise ValueError(f"{path} holds no training state to resume from")
    if ckpt["model_config"] != asdict(model.config):
        raise ValueError(f"{path} holds a model of another config ({ckpt['model_config']}) "
                         f"than this run's ({asdict(model.config)})")
    if ckpt["skills"] != stages:
        raise ValueError(f"{path} was trained on skills {','.join(ckpt['skills'])}, "
                         f"not {','.join(stages)}")
    if len(ckpt["data_rng"]) != n_shards:
        raise ValueError(f"{path} was written by a run of {len(ckpt['data_rng'])} micro-batches "
                         f"per step (processes x --grad-accum), not {n_shards}")
    for key in dict(ckpt["args"]) | vars(args):  # a flag of either run (lab/variants.py adds some)
        value = vars(args).get(key)
        if (key not in ("out", "resume", "ckpt_every", "grad_accum")
                and ckpt["args"].get(key) != value):
            raise ValueError(f"{path} was written with --{key.replace('_', '-')} "
                             f"{ckpt['args'].get(key)}, not {value}: "
                             "resume with the run's own settings")
