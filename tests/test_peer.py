"""
lab/peer.py: the conversion between our GPT and transformers' GPT2LMHeadModel (the same logits
on a left-padded batch, and an exact round trip) on a tiny fresh model, and its one-line errors.
The conversion tests need transformers (not in CI: skipped); the error tests need nothing.

    python -m pytest -q tests/test_peer.py
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data import encode_prompts
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("peer", ROOT / "lab" / "peer.py")
peer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peer)  # cheap: TRL and transformers are imported only when used


@pytest.fixture
def tiny(tok):
    """A tiny fresh GPT whose LayerNorms are not the identity, so their copy is tested too."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2,
                          n_embd=16))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return model.eval()


def test_same_logits_on_a_left_padded_batch(tiny, tok):
    pytest.importorskip("transformers")
    hf = peer.to_hf(tiny, tok.eot_id)
    ids, mask = encode_prompts(tok, peer.real_prompts(["jab", "rev"], n=3))
    assert (mask == 0).any(1).sum() >= 6  # most rows are left-padded
    assert peer.logit_difference(tiny, hf, ids, mask) < 1e-5
    # the pitfall: without position ids, padded rows are scored at shifted positions
    assert peer.logit_difference(tiny, hf, ids, mask, positions=False) > 1e-3


def test_round_trip_is_exact(tiny, tok):
    pytest.importorskip("transformers")
    assert peer.round_trip_exact(tiny, tok.eot_id)


def test_a_bias_our_model_cannot_hold_is_refused(tiny, tok):
    pytest.importorskip("transformers")
    hf = peer.to_hf(tiny, tok.eot_id)
    with torch.no_grad():
        hf.transformer.h[0].mlp.c_fc.bias[0] = 0.5
    with pytest.raises(ValueError, match="mlp.c_fc.bias is not zero"):
        peer.from_hf(hf)


def run_peer(tmp_path, *args):
    """lab/peer.py with a stand-in `trl` package that fails to import, as if TRL were missing."""
    fake = tmp_path / "no_trl" / "trl"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('TRL is not installed')\n")
    env = {**os.environ, "PYTHONPATH": str(fake.parent), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "lab/peer.py", *args, "--out", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_missing_trl_is_one_error_line(tmp_path):
    proc = run_peer(tmp_path, "--quick")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"error: {peer.NEED_TRL}"]
    assert not (tmp_path / "out").exists()  # it stopped before any work


def test_bad_seeds_is_one_error_line(tmp_path):
    proc = run_peer(tmp_path, "--seeds", "0,x")
    assert proc.returncode != 0
    assert proc.stderr.strip() == "error: --seeds must be comma-separated integers, got '0,x'"
