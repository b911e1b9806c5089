"""
Tests of model.py: padding invariance of forward, KV-cache generation against the plain
path, sampling with an explicit generator, finished rows, and checkpoints.

    python -m pytest -q tests/test_model.py

All on CPU with a 2-layer, 32-wide GPT (the `tiny_model` fixture in conftest.py).
"""

import argparse
import os

import pytest
import torch

from data import encode_prompts, left_pad, student_prompt, teacher_prompt
from model import GPT, GPTConfig, KVCache, load_checkpoint, sample_next_token, save_checkpoint


def random_rows(vocab_size, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


# Prompts of different lengths (8 to 48 characters), so the batch is genuinely left-padded.
PROMPTS = [student_prompt("rev", "abc"), teacher_prompt("rev", "gfedcba", "a b c d e f g=abcdefg"),
           student_prompt("flip", "jihgfed"), teacher_prompt("jab", "bca", "120")]


# -----------------------------------------------------------------------------
# forward: left padding changes nothing

@torch.no_grad()
def test_forward_padding_invariance(tiny_model, tok):
    """Each row scored alone (no padding, no mask) equals the same row inside a left-padded
    batch of rows of other lengths, at every real position."""
    rows = random_rows(tok.vocab_size, [5, 17, 1, 30, 12])
    alone = [tiny_model(torch.tensor([r]))[0] for r in rows]  # (T_i, V) each
    for pad_id in (tok.eot_id, 0):  # whatever sits under the padding must not matter
        ids, mask = left_pad(rows, pad_id)
        batch_logits = tiny_model(ids, mask)  # (B, T, V)
        assert torch.isfinite(batch_logits).all()  # padding queries must not produce NaN
        T = ids.shape[1]
        for i, r in enumerate(rows):
            torch.testing.assert_close(batch_logits[i, T - len(r):], alone[i], atol=1e-5, rtol=0)


@torch.no_grad()
def test_forward_padding_invariance_with_different_padding(tiny_model, tok):
    """The same row, padded by different amounts in two different batches, gets the same logits."""
    rows = random_rows(tok.vocab_size, [9, 3, 21], seed=1)
    target = rows[0]
    ids_a, mask_a = left_pad([target, rows[1]], tok.eot_id)  # target unpadded (longest)
    ids_b, mask_b = left_pad([rows[2], target], tok.eot_id)  # target padded by 12
    logits_a = tiny_model(ids_a, mask_a)[0, -len(target):]
    logits_b = tiny_model(ids_b, mask_b)[1, -len(target):]
    torch.testing.assert_close(logits_a, logits_b, atol=1e-5, rtol=0)


@torch.no_grad()
def test_forward_padding_control(tiny_model, tok):
    """Control for the tests above: ignoring the padding (an all-ones mask over a padded row)
    does change the logits, so the invariance tests can detect a broken mask or positions."""
    row = random_rows(tok.vocab_size, [8], seed=2)[0]
    alone = tiny_model(torch.tensor([row]))[0]
    padded = torch.tensor([[tok.eot_id] * 5 + row])
    wrong = tiny_model(padded, torch.ones_like(padded))[0, 5:]
    assert (wrong - alone).abs().max() > 1e-3


@torch.no_grad()
def test_forward_mask_none_equals_all_ones(tiny_model, tok):
    """attention_mask=None (the fused causal path) equals an explicit all-ones mask."""
    ids = torch.tensor(random_rows(tok.vocab_size, [20, 20, 20], seed=3))
    plain = tiny_model(ids)
    masked = tiny_model(ids, torch.ones_like(ids))
    assert plain.shape == (3, 20, tok.vocab_size)
    torch.testing.assert_close(plain, masked, atol=1e-5, rtol=0)


@torch.no_grad()
def test_forward_with_cache_matches_full_pass(tiny_model, tok):
    """Prefill a padded batch, then feed the rest one token at a time through a KVCache:
    the logits equal those of one pass over the whole batch."""
    rows = random_rows(tok.vocab_size, [6, 14, 10], seed=4)
    ids, mask = left_pad(rows, tok.eot_id)  # (3, 14)
    full = tiny_model(ids, mask)
    cache = KVCache(tiny_model.config.n_layer)
    steps = [tiny_model(ids[:, :8], mask[:, :8], cache)]
    for t in range(8, ids.shape[1]):
        steps.append(tiny_model(ids[:, t:t + 1], mask[:, :t + 1], cache))
    assert cache.pos == ids.shape[1]
    cached = torch.cat(steps, dim=1)
    real = mask.bool()  # padding positions' outputs are never used
    torch.testing.assert_close(cached[real], full[real], atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------
# generation

def generate(model, tok, prompts, seed, use_cache, **kwargs):
    ids, mask = encode_prompts(tok, prompts)
    generator = torch.Generator().manual_seed(seed)
    return model.generate(ids, mask, generator=generator, eot_id=tok.eot_id, use_cache=use_cache,
                          **kwargs)


@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, None), (1.0, 5)])
def test_cached_generation_equals_plain(tiny_model, tok, temperature, top_k):
    """KV-cache and plain generation give the same tokens on a left-padded batch."""
    for seed in range(3):
        kwargs = dict(max_new_tokens=24, temperature=temperature, top_k=top_k)
        cached = generate(tiny_model, tok, PROMPTS, seed, use_cache=True, **kwargs)
        plain = generate(tiny_model, tok, PROMPTS, seed, use_cache=False, **kwargs)
        assert cached.shape[0] == len(PROMPTS) and 1 <= cached.shape[1] <= 24
        assert torch.equal(cached, plain), (seed, cached, plain)


def lively_model(tok, seed=1):
    """A tiny GPT with every weight matrix drawn at std 0.2 instead of 0.02: its greedy and
    sampled continuations vary with the context (a fresh model mostly repeats one token)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, None), (1.0, 5)])
def test_cached_generation_equals_plain_lively_model(tok, temperature, top_k):
    """The same on a model whose continuations depend strongly on the context, with some
    rows ending early, so a wrong cache, mask or position shows up in the tokens."""
    model = lively_model(tok)
    kwargs = dict(max_new_tokens=24, temperature=temperature, top_k=top_k)
    cached = generate(model, tok, PROMPTS, 7, use_cache=True, **kwargs)
    plain = generate(model, tok, PROMPTS, 7, use_cache=False, **kwargs)
    assert torch.equal(cached, plain), (cached, plain)
    assert max(len(set(row)) for row in cached.tolist()) >= 4  # not one token repeated
    assert (cached == tok.eot_id).any()  # some row finished, exercising the finished-row path


def test_generation_is_padding_free(tok):
    """Greedy continuation of a prompt is the same alone and inside a left-padded batch, and
    depends on the prompt."""
    model = lively_model(tok)
    batch = generate(model, tok, PROMPTS, 0, use_cache=True, max_new_tokens=12, temperature=0.0)
    for i, p in enumerate(PROMPTS):
        alone = generate(model, tok, [p], 0, use_cache=True, max_new_tokens=12, temperature=0.0)
        n = min(alone.shape[1], batch.shape[1])
        assert torch.equal(alone[0, :n], batch[i, :n]), p
    assert len({tuple(row) for row in batch.tolist()}) > 1


def test_sampling_reproducible(tiny_model, tok):
    """Same generator seed -> same tokens; a different seed -> different tokens."""
    kwargs = dict(max_new_tokens=16, temperature=1.0)
    a = generate(tiny_model, tok, PROMPTS, 123, use_cache=True, **kwargs)
    b = generate(tiny_model, tok, PROMPTS, 123, use_cache=True, **kwargs)
    c = generate(tiny_model, tok, PROMPTS, 124, use_cache=True, **kwargs)
    assert torch.equal(a, b)
    # near-uniform over 42 tokens: two seeds agreeing on every one of ~64 tokens is ~impossible
    n = min(a.shape[1], c.shape[1])
    assert not torch.equal(a[:, :n], c[:, :n])


def test_top_k_samples_only_top_k():
    """sample_next_token with top_k never picks a token outside the k most likely."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 42, generator=g)
    top5 = logits.topk(5, dim=-1).indices  # (64, 5)
    seen = set()
    for _ in range(20):
        token = sample_next_token(logits, 1.0, top_k=5, generator=g)  # (64,)
        assert (top5 == token[:, None]).any(dim=-1).all()
        seen.update(token.tolist())
    assert len(seen) > 5  # it does sample, not always the argmax
    assert torch.equal(sample_next_token(logits, 0.0), logits.argmax(-1))


def test_finished_rows_stay_finished_sampled(tiny_model, tok):
    """With a near-uniform model at temperature 1, many rows emit end-of-text somewhere in the
    middle; after it, every token of the row is end-of-text."""
    prompts = PROMPTS * 8  # 32 rows
    for use_cache in (True, False):
        out = generate(tiny_model, tok, prompts, 5, use_cache=use_cache, max_new_tokens=32,
                       temperature=1.0)
        ended_early = 0
        for row in out.tolist():
            if tok.eot_id in row:
                first = row.index(tok.eot_id)
                assert all(t == tok.eot_id for t in row[first:]), row
                ended_early += first < len(row) - 1
        assert ended_early >= 3, "the test needs rows that end before the last token"


def test_finished_rows_stay_finished_forced(tok):
    """A model whose every position predicts end-of-text: each row is all end-of-text, and
    generation stops early once every row is finished."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        # final hidden state is the constant vector v, and the (tied) end-of-text row is 10 v
        v = torch.randn(32)
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(v)
        model.wte.weight[tok.eot_id] = 10 * v
    for temperature in (0.0, 1.0):
        out = generate(model, tok, PROMPTS, 0, use_cache=True, max_new_tokens=40,
                       temperature=temperature)
        assert (out == tok.eot_id).all()
        assert out.shape[1] < 40  # stopped once all rows were done
    # without eot_id the model keeps going for the whole budget
    ids, mask = encode_prompts(tok, PROMPTS)
    out = model.generate(ids, mask, max_new_tokens=40, temperature=0.0)
    assert out.shape == (len(PROMPTS), 40)


# -----------------------------------------------------------------------------
# checkpoints

def make_args():
    return argparse.Namespace(lr=3e-4, skills="jab,mug", seed=7, pretrain=False, init=None)


def test_checkpoint_round_trip(tiny_model, tok, tmp_path):
    path = str(tmp_path / "run" / "ckpt.pt")  # the directory does not exist yet
    save_checkpoint(path, tiny_model, make_args(), 42, stage=1, skills=["jab", "mug"])
    assert os.listdir(tmp_path / "run") == ["ckpt.pt"]  # no .tmp left behind
    model, ckpt = load_checkpoint(path)
    model.eval()
    assert model.config == tiny_model.config
    assert ckpt["step"] == 42 and ckpt["stage"] == 1 and ckpt["skills"] == ["jab", "mug"]
    assert ckpt["args"] == vars(make_args())
    ids, mask = encode_prompts(tok, PROMPTS)
    with torch.no_grad():
        assert torch.equal(model(ids, mask), tiny_model(ids, mask))
    # the tied head is still tied after loading
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()


def test_checkpoint_restores_config(tok, tmp_path):
    """A model of another size comes back with that size, read from the checkpoint."""
    config = GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=4, n_embd=16, block_size=64)
    torch.manual_seed(0)
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, GPT(config), make_args(), 0)
    model, _ = load_checkpoint(path)
    assert model.config == config
    assert len(model.blocks) == 1 and model.wpe.weight.shape == (64, 16)


def test_save_checkpoint_replaces_atomically(tiny_model, tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, tiny_model, make_args(), 1)
    save_checkpoint(path, tiny_model, make_args(), 2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]
    assert load_checkpoint(path)[1]["step"] == 2


def test_load_checkpoint_missing(tmp_path):
    path = str(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="no checkpoint") as e:
        load_checkpoint(path)
    assert path in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no checkpoint"):
        load_checkpoint(str(tmp_path))  # a directory is not a checkpoint either


def test_load_checkpoint_truncated(tiny_model, tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), tiny_model, make_args(), 0)
    data = path.read_bytes()
    for cut in (len(data) // 2, 100):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a readable checkpoint") as e:
            load_checkpoint(str(path))
        assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["text", "empty", "other_torch_file", "wrong_shapes"])
def test_load_checkpoint_not_a_checkpoint(tiny_model, tmp_path, kind):
    path = tmp_path / "ckpt.pt"
    if kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "other_torch_file":
        torch.save({"weights": torch.zeros(3)}, path)
    else:  # a checkpoint dict whose config does not match its weights
        save_checkpoint(str(path), tiny_model, make_args(), 0)
        ckpt = torch.load(path, weights_only=True)
        ckpt["model_config"]["n_embd"] = 64
        torch.save(ckpt, path)
    with pytest.raises(ValueError, match="not a readable checkpoint") as e:
        load_checkpoint(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)
