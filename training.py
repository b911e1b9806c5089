"""
What train_sft.py and train_sdft.py share, so that each script shows its method's loop and
little else: the common flags and their checks, several processes (torchrun), the seeds and
random streams, the base and --resume, the log, checkpoints, validation with --keep-best, and
the end-of-stage evaluation. Nothing here is SFT or SDFT: the batch, the loss and the teacher
are in the scripts.

The world a run learns in is the toy's skills (data.py), reached through the functions
of the last section. lab/variants.py puts the lab's other worlds (knowledge, reasoning) in
their place, and records its own flags in LAB_SETTINGS.
"""

import copy
import json
import math
import os
import random
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from data import NEW_SKILLS, PRIOR_SKILLS, SEQUENCE, Tokenizer
from eval import evaluate, kl_from_base
from model import check_resume, get_device, load_checkpoint, save_checkpoint

LAB_SETTINGS = {}  # lab/variants.py's flags: saved with the run's own, and checked on --resume


def add_arguments(parser, out, lr):
    """The flags both scripts take; `out` and `lr` are each script's defaults."""
    add = parser.add_argument
    # run
    add("--out", default=out, help="directory for ckpt.pt and metrics.jsonl")
    add("--seed", type=int, default=0, help="seeds python, numpy and torch: same seed, same run")
    add("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    add("--resume", action="store_true", help="continue the run in OUT/ckpt.pt (same settings)")
    add("--ckpt-every", type=int, default=50,
        help="also write OUT/ckpt.pt every this many steps (0: only after each stage)")
    # what to learn
    add("--init", default="results/base/ckpt.pt",
        help="base checkpoint (default: the shipped base)")
    add("--skills", default=",".join(SEQUENCE),
        help="new skills to learn in this order, comma-separated")
    add("--demo-style", default="expert", choices=["expert", "own"],
        help="style of the demonstrations: the expert's trace, or the model's own answer")
    # optimisation
    add("--steps", type=int, default=300, help="step budget per stage")
    add("--batch-size", type=int, default=32,
        help="queries per step, split over processes and micro-batches")
    add("--grad-accum", type=int, default=1,
        help="micro-batches per step in each process, gradients summed (less memory)")
    add("--lr", type=float, default=lr, help="peak learning rate (the rate chosen in results/lr)")
    add("--warmup", type=int, default=10, help="linear warmup steps of the cosine schedule")
    add("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    # evaluation
    add("--eval-every", type=int, default=10,
        help="steps between validations of the current skill")
    add("--eval-n", type=int, default=100,
        help="queries per skill for validation and test accuracy")
    add("--stop-at", type=float, default=0.95, help="end a stage when the skill's validation "
        "accuracy reaches this (above 1: never, the whole budget runs)")
    add("--keep-best", action="store_true", help="end each stage on the weights of its best "
        "validation (the earliest, on a tie), as the paper reports its runs")


def check_arguments(args, n_shards, world_size):
    """Raise ValueError (one sentence) for a common flag out of range."""
    if args.stop_at <= 0:
        raise ValueError(f"--stop-at must be positive (above 1: never stop), got {args.stop_at}")
    for flag in ("steps", "batch_size", "grad_accum", "eval_every", "eval_n", "max_new_tokens"):
        if getattr(args, flag, 1) <= 0:  # max_new_tokens: SDFT's
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, "
                             f"got {getattr(args, flag)}")
    if args.lr <= 0 or args.warmup < 0 or args.grad_clip <= 0 or args.ckpt_every < 0:
        raise ValueError("--lr and --grad-clip must be positive, "
                         "--warmup and --ckpt-every not negative")
    if args.batch_size % n_shards:
        raise ValueError(f"--batch-size {args.batch_size} does not split into {world_size} "
                         f"processes x {args.grad_accum} micro-batches (--grad-accum)")


class Run:
    """One run's processes, random streams, base, log and checkpoints.

    Run(args, check) checks the flags (check: the script's own, raising ValueError), starts
    the processes, seeds everything, loads --init and, with --resume, checks OUT/ckpt.pt; any
    problem stops it with one error line before OUT is touched. run.start(teacher) then
    restores the --resume state and opens the log."""

    def __init__(self, args, check=None):
        vars(args).update(LAB_SETTINGS)
        self.args = args
        # distributed: torchrun sets RANK and WORLD_SIZE; a plain run is rank 0 of 1
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        self.rank, self.world_size = ((int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
                                      if self.ddp else (0, 1))
        self.master = self.rank == 0  # the one process that prints, logs and writes checkpoints
        self.n_shards = self.world_size * args.grad_accum  # micro-batches per step, in all
        try:
            check_arguments(args, self.n_shards, self.world_size)
            if check:
                check(args)
            self.skills = parse_skills(args)
            self.device = get_device(args.device)
            os.makedirs(args.out, exist_ok=True)
            with tempfile.TemporaryFile(dir=args.out):  # fail now if OUT is read-only
                pass
        except ValueError as e:
            self.fail(e)
        except OSError as e:
            self.fail(f"cannot write to --out {args.out} ({e.strerror})")
        if self.ddp:  # one process per device: nccl between GPUs, gloo between CPU processes
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        self.tok = Tokenizer()
        # Micro-batch i of every step draws from seed + i: micro-batch 0 is a plain run's
        # stream, and the same micro-batches make the same run whether spread over processes
        # or --grad-accum. Queries: the same for SFT and SDFT; rollouts: SDFT's samples.
        self.shards = range(self.rank * args.grad_accum, (self.rank + 1) * args.grad_accum)
        self.data_rngs = [random.Random(args.seed + i) for i in self.shards]
        self.generators = [torch.Generator(self.device).manual_seed(args.seed + i)
                           for i in self.shards]
        self.micro_batch_size = args.batch_size // self.n_shards
        self.ckpt_path = os.path.join(args.out, "ckpt.pt")
        self.metrics = []  # the records already in OUT/metrics.jsonl that this run keeps
        self.resume = None
        try:
            self.model, _ = load_checkpoint(args.init, self.device)
            if args.resume:  # everything is checked before anything in OUT is touched
                _, self.resume = load_checkpoint(self.ckpt_path, self.device)
                check_resume(self.resume, self.ckpt_path, self.model, self.skills, args,
                             self.n_shards)
                with open(os.path.join(args.out, "metrics.jsonl")) as f:
                    self.metrics = f.readlines()[:self.resume["metrics_lines"]]
        except (ValueError, OSError) as e:
            self.fail(e)
        self.base = copy.deepcopy(self.model).eval()  # frozen: how far does each stage move?
        self.start_stage, self.start_step, self.optimizer_state = 0, 0, None
        self.best = None  # --keep-best: the stage's best validation, {"val_acc", "step", weights}

    def print0(self, *a):
        if self.master:
            print(*a)

    def fail(self, message):
        """Stop with one 'error:' line (from rank 0 only) and a non-zero exit."""
        sys.exit(f"error: {message}" if self.master else 1)

    def start(self, teacher=None):
        """With a teacher, check that its longest prompt and a rollout fit in the context. Then
        restore the --resume state (weights, teacher, optimizer, position, random streams),
        open the log, and return the model that the training pass goes through (DDP, which
        averages the gradients over processes; sampling, evaluation and checkpoints use the
        plain model)."""
        args, resume = self.args, self.resume
        self.teacher = teacher
        if teacher is not None:  # it scores [teacher prompt | rollout]: the longest must fit
            longest = longest_teacher_prompt(self.tok, self.skills, args.demo_style)
            block_size = min(self.model.config.block_size, teacher.config.block_size)
            if longest + args.max_new_tokens > block_size:
                self.fail(f"--max-new-tokens {args.max_new_tokens} does not fit: the teacher "
                          f"prompt takes up to {longest} of the model's {block_size} positions")
        if resume:
            self.model.load_state_dict(resume["model"])
            if teacher is not None and teacher is not self.model:
                teacher.load_state_dict(resume["teacher"])
            done = resume["stage_done"]
            self.start_stage = resume["stage"] + 1 if done else resume["stage"]
            self.start_step = 0 if done else resume["step"]
            self.optimizer_state, self.best = ((None, None) if done else
                                               (resume["optimizer"], resume.get("best")))
            for data_rng, generator, i in zip(self.data_rngs, self.generators, self.shards):
                data_rng.setstate(resume["data_rng"][i])
                generator.set_state(resume["rollout_rng"][i].cpu())
            torch.set_rng_state(resume["torch_rng"].cpu())
        self.print0(f"model: {self.model.num_params() / 1e6:.2f}M parameters on {self.device}"
                    + (f"; {self.world_size} processes" if self.ddp else "")
                    + (f"; resuming stage {self.start_stage + 1} step {self.start_step}"
                       if resume else ""))
        if self.master:
            self.log_file = open(os.path.join(args.out, "metrics.jsonl"), "w")
            self.log_file.writelines(self.metrics)
        self.n_records = len(self.metrics)  # saved in checkpoints: --resume keeps this many
        self.t_start = time.time()
        return DDP(self.model) if self.ddp else self.model

    def optimizer(self):
        """A stage's AdamW (fresh at each stage, as the paper trains each task), with the
        --resume state in the middle of one."""
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.args.lr,
                                      betas=(0.9, 0.95), weight_decay=0.0)
        if self.optimizer_state is not None:
            optimizer.load_state_dict(self.optimizer_state)
        return optimizer

    def log(self, record):  # rank 0 only
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()
        self.n_records += 1

    def mean(self, stats):
        """Per-step values summed over this process's micro-batches -> their mean over every
        micro-batch of the step, the same in every process."""
        if self.ddp:
            dist.all_reduce(stats)
        return (stats / self.n_shards).tolist()

    def check_finite(self, stage, step, loss, grad_norm):
        """Stop before an update on a non-finite loss or gradient; ckpt.pt stays the last good
        one."""
        for what, value in (("loss", loss), ("gradient", grad_norm.item())):
            if not math.isfinite(value):
                self.fail(f"non-finite {what} at stage {stage + 1} step {step}; stopped before "
                          f"the update, {self.ckpt_path} (if any) is the last good checkpoint")

    def eta(self, t_stage, step):
        """Time left in a stage's budget, from its mean step time so far: '1m05s'."""
        left = round((time.time() - t_stage) / (step + 1 - self.start_step)
                     * (self.args.steps - step - 1))
        return f"{left // 60}m{left % 60:02d}s" if left >= 60 else f"{left}s"

    def checkpoint(self, stage, step, stage_done, optimizer):
        """Write OUT/ckpt.pt with everything --resume needs. Every process sends its random
        streams; rank 0 writes (to a temporary file, then renamed)."""
        rng = [(r.getstate(), g.get_state()) for r, g in zip(self.data_rngs, self.generators)]
        if self.ddp:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, rng)
            rng = [state for states in gathered for state in states]  # in micro-batch order
        teacher = self.teacher
        if self.master:
            save_checkpoint(self.ckpt_path, self.model, self.args, step, stage=stage,
                            skills=self.skills, stage_done=stage_done,
                            optimizer=optimizer.state_dict(), data_rng=[r for r, _ in rng],
                            torch_rng=torch.get_rng_state(), metrics_lines=self.n_records,
                            best=self.best, rollout_rng=[g for _, g in rng],
                            teacher=(None if teacher is None or teacher is self.model
                                     else teacher.state_dict()))

    def every(self, stage, step, optimizer):
        """After a step: also a checkpoint every --ckpt-every steps, for --resume."""
        args = self.args
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < args.steps:
            self.checkpoint(stage, step + 1, False, optimizer)

    def validate(self, stage, skill, step):
        """The stage's validation accuracy, measured and logged by rank 0 and sent to every
        process as float64, so that all decide alike."""
        val_acc = None
        if self.master:
            val_acc = validation_accuracy(self.model, self.tok, skill, self.device,
                                          self.args.eval_n)
            self.log({"stage": stage, "skill": skill, "step": step, "val_acc": val_acc})
            print(f"stage {stage + 1}/{len(self.skills)} {skill} | step {step} "
                  f"| val_acc {val_acc:.2f}")
        if self.ddp:
            shared = torch.tensor([val_acc or 0.0], dtype=torch.float64, device=self.device)
            dist.broadcast(shared, 0)
            val_acc = shared.item()
        return val_acc

    def remember(self, val_acc, step):
        """With --keep-best: keep the weights of the stage's best validation so far (the
        student's, and an EMA teacher's)."""
        if self.args.keep_best and (self.best is None or val_acc > self.best["val_acc"]):
            ema = self.teacher is not None and self.args.teacher == "ema"
            self.best = {"val_acc": val_acc, "step": step,
                         "model": copy.deepcopy(self.model.state_dict()),
                         "teacher": copy.deepcopy(self.teacher.state_dict()) if ema else None}

    def budget_spent(self, stage, skill):
        """The step a stage ends on when its whole budget ran: the last, or with --keep-best an
        earlier validation's weights where they were as good or better."""
        step = self.args.steps
        if self.args.keep_best and self.validate(stage, skill, step) <= self.best["val_acc"]:
            self.model.load_state_dict(self.best["model"])
            if self.best["teacher"] is not None:
                self.teacher.load_state_dict(self.best["teacher"])
            step = self.best["step"]
            self.print0(f"stage {stage + 1}/{len(self.skills)} {skill}: kept the weights of "
                        f"step {step} (val_acc {self.best['val_acc']:.2f})")
        return step

    def end_stage(self, stage, skill, step, t_stage, optimizer):
        """Test and validation accuracy on every skill (rank 0), logged, then a checkpoint."""
        self.start_step, self.optimizer_state, self.best = 0, None, None  # later stages afresh
        if self.master:
            accuracy, val_accuracy, kl = stage_accuracies(self.model, self.base, self.tok,
                                                          skill, self.device, self.args.eval_n)
            seconds = time.time() - t_stage
            self.log({"stage": stage, "skill": skill, "steps": step, "seconds": seconds,
                      "accuracy": accuracy, "val_accuracy": val_accuracy, "kl_from_base": kl})
            print(f"stage {stage + 1}/{len(self.skills)} {skill} done: {step} steps, "
                  f"{seconds:.0f}s" + ("" if kl is None else f", kl_from_base {kl:.3f}"))
            print("  " + " ".join(f"{s} {a:.2f}" for s, a in accuracy.items()))
        self.checkpoint(stage, step, True, optimizer)

    def finish(self):
        self.print0(f"total time {time.time() - self.t_start:.0f}s; "
                    f"checkpoint {self.ckpt_path}")
        if self.ddp:
            dist.barrier()  # wait for rank 0's last validation and checkpoint
            dist.destroy_process_group()


# -----------------------------------------------------------------------------
# the world: the toy's skills (lab/variants.py replaces these for its worlds)

def parse_skills(args):
    """The stages of a run, one skill each: --skills, checked against data.py's world."""
    return data.parse_skills(args.skills)


def examples(rng, skill, n, demo_style):
    """n training queries of the skill: (student prompts, demonstrations, teacher prompts)."""
    return data.skill_examples(rng, skill, n, demo_style)


def longest_teacher_prompt(tok, skills, demo_style):
    """The most tokens a teacher prompt of these skills takes: a rollout must fit after it."""
    return data.longest_teacher_prompt(tok, skills, demo_style)


def validation_accuracy(model, tok, skill, device, n):
    """What decides a stage's end: the skill's accuracy on n validation queries."""
    return evaluate(model, tok, [skill], device, split="val", n=n)[skill]


def every_skill_accuracy(model, tok, device, n):
    """Test and validation accuracy of every prior and new skill, n queries each."""
    every_skill = list(PRIOR_SKILLS) + list(NEW_SKILLS)
    return (evaluate(model, tok, every_skill, device, split="test", n=n),
            evaluate(model, tok, every_skill, device, split="val", n=n))


def stage_accuracies(model, base, tok, skill, device, n):
    """After a stage: test and validation accuracy of every skill, and the KL from the base on
    the stage's skill."""
    return (*every_skill_accuracy(model, tok, device, n),
            kl_from_base(model, base, tok, skill, device, n=n))
