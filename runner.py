"""
Running the training scripts for benchmark.py and the lab's studies (lab/studies.py, ...):
every run is the script itself, started as a subprocess with one thread, so there is one
implementation of each method and a CPU run repeats exactly whether runs go side by side or not.
"""

import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

from data import world_signature
from model import load_checkpoint

ROOT = os.path.dirname(os.path.abspath(__file__))  # scripts run from the root

# The learning rate of each method, tuned as the paper tuned each method: the rate of the
# sweep in results/lr with the best mean *validation* accuracy over the new skills after the last
# stage (the default order, 3 seeds; results/README.md). One recipe for every order and skill;
# the training scripts' defaults are the same rates.
LR = {"sft": 3e-4, "sdft": 3e-5}
# How the shipped base (results/base/ckpt.pt) was pretrained: lab/pretrain.py with these.
BASE_SETTINGS = {"steps": 12000, "n_layer": 4, "n_head": 4, "n_embd": 128, "seed": 0,
                 "p_new": 0.06, "p_right": 0.4}


def flags(settings):
    """{'eval_n': 8, 'dft': True} -> ['--eval-n=8', '--dft']: a True value is a switch."""
    return [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}")
            for k, v in settings.items()]


def clock(seconds):
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def every(seconds=15, prefix="  "):
    """An on_line for run_script that echoes a step line at most every `seconds`: nothing runs
    silently."""
    last = [0.0]

    def on_line(line):
        if " step " in line and time.time() - last[0] > seconds:
            print(prefix + line, flush=True)
            last[0] = time.time()
    return on_line


def run_script(script, *script_args, on_line=None):
    """Run a training script to the end, passing each line it prints to on_line. Exits with
    the script's own error line if it fails. One thread per script: a CPU run repeats exactly
    only at the same thread count, so the results do not depend on how many run side by side."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, script, *script_args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=env)
    for line in proc.stdout:
        if on_line:
            on_line(line.strip())
    stderr = proc.stderr.read()
    if proc.wait() != 0:
        sys.exit(stderr.strip().splitlines()[-1] if stderr.strip() else f"error: {script} failed")


def inputs_of(command):
    """The checkpoints a command starts from (--init, --teacher-ckpt), each with a digest of its
    bytes: a base made again under the same path is another input."""
    return {path: hashlib.sha256(open(path, "rb").read()).hexdigest()
            for flag, path in zip(command, command[1:])
            if flag in ("--init", "--teacher-ckpt") and os.path.isfile(path)}


def run_once(command, out, on_line=None, announce=None):
    """Run a script command [script, *args] whose --out is out, unless out already holds a
    finished run of this very command from the very same checkpoints (out/command.json, written
    when it ends): studies reuse each other's runs, and a changed command or base runs again.
    announce: printed when it does run."""
    done = os.path.join(out, "command.json")
    record = {"command": command, "inputs": inputs_of(command)}
    if os.path.exists(done):
        with open(done) as f:
            if json.load(f) == record:
                return
    if announce:
        print(announce, flush=True)
    run_script(*command, on_line=on_line)
    with open(done, "w") as f:
        json.dump(record, f)


def worst_skill(accuracies, skills):
    """The skill lowest on average over these accuracy records ({skill: accuracy}), and that
    average: an average over seven prior skills can hide one that is lost."""
    skill = min(skills, key=lambda k: statistics.mean(a[k] for a in accuracies))
    return skill, statistics.mean(a[skill] for a in accuracies)


def mean_sd(values):
    """'0.97 ± 0.01' over seeds (sd only when there are several), as the tables print them."""
    sd = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}" + sd


def pretrain_base(path, settings, on_line=None):
    """Pretrain a base at path with lab/pretrain.py and the settings (it writes the weights, the
    settings and the toy world, all at once at the end: never a half-written base)."""
    run_script("lab/pretrain.py", *flags(settings), "--out", path, on_line=on_line)


def ensure_base(path, settings, on_line=None):
    """The base at path: checked to be one made with these settings for this world, or
    pretrained there first where there is none. Exits with one line, and replaces nothing, where
    path holds another checkpoint."""
    if os.path.exists(path):
        why_not = check_base(load_checkpoint(path)[1], settings)
        if why_not:
            sys.exit(f"error: {path} is not a base made with these settings: {why_not}")
    else:
        print(f"pretraining {path} ({settings['steps']} steps)", flush=True)
        pretrain_base(path, settings, on_line=on_line)
    return path


def check_base(ckpt, settings):
    """Why this checkpoint is not a base made with these pretraining settings for this toy world,
    or None if it is one."""
    if "world" not in ckpt:
        return "it is not a base model (lab/pretrain.py makes those)"
    if ckpt.get("world") != world_signature():
        return ("it was pretrained for another toy world (data.py's skills, rivals, formats or "
                "mixture have changed since)")
    other = {k: ckpt["args"].get(k) for k, v in settings.items() if ckpt["args"].get(k) != v}
    return f"it was pretrained with other settings ({other})" if other else None
