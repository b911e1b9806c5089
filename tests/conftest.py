"""Shared test setup: the repo root on sys.path, the toy tokenizer, a tiny seeded GPT, and a
tiny base checkpoint made once per session."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from data import Tokenizer  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """2 shared cores: for models this small, extra intra-op threads only slow things down
    (the scripts run through subprocess get OMP_NUM_THREADS=1 for the same reason)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny base checkpoint (1 layer, 32 wide, 3 pretraining steps by lab/pretrain.py), made
    once and shared by the tests of the scripts: they only read it."""
    path = tmp_path_factory.mktemp("tiny_base") / "base.pt"
    r = subprocess.run([sys.executable, "lab/pretrain.py", "--steps", "3", "--n-layer", "1",
                        "--n-head", "2", "--n-embd", "32", "--device", "cpu", "--out", str(path)],
                       cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    return path


@pytest.fixture
def tok():
    return Tokenizer()


@pytest.fixture
def tiny_model(tok):
    """A 2-layer, 32-wide GPT over the toy vocabulary, seeded, in eval mode."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32,
                          block_size=128))
    return model.eval()
