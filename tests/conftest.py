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


# The tests' bad inputs each stop a script in its checks, before any work: the time of each
# run is mostly Python importing torch (about 1.5 s of CPU). run_each runs many such commands in
# one fresh process, one after another, each as `python SCRIPT ARGS` would (runpy, its own
# sys.argv, stdout and stderr captured, its exit code and the message of sys.exit kept).
ONE_PROCESS = r"""
import contextlib, io, json, runpy, sys, traceback
sys.path.insert(0, ".")  # the repository root, where the scripts import from
results = []
for argv in json.loads(sys.stdin.read()):
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = argv
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:  # what the interpreter would print and return
            if isinstance(e.code, str):
                err.write(e.code + "\n")
            code = 1 if isinstance(e.code, str) else (e.code or 0)
        except BaseException:
            traceback.print_exc(file=err)
            code = 1
    results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def run_each(commands, timeout=300):
    """[(returncode, stdout, stderr)] of each command [script, *args], run in one process in the
    repository root. Only for commands that stop in their checks: a command that goes on to
    train or to change a module's state could change the ones after it."""
    import json
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", ONE_PROCESS], cwd=ROOT, env=env, text=True,
                          input=json.dumps([[str(a) for a in c] for c in commands]),
                          capture_output=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [tuple(r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]
