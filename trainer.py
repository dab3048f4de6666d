"""The one training loop that train_mnist.py, train_cifar.py and train_celeba.py share.

    per step (DDPM Algorithm 1, train_step):  x_0 ~ data, t ~ U{1..T} (or --t-sampling), ε ~ N(0, I)
        θ ← θ − lr·AdamW(∇_θ w_t·‖target − net(√ᾱ_t·x_0 + √(1−ᾱ_t)·ε, t)‖²)     (gradient clipped)
    target: ε (DDPM), x_0 or v (--objective); w_t = 1 (L_simple) or Min-SNR-γ (--loss-weighting)
        θ_ema ← d·θ_ema + (1 − d)·θ

train() reads top to bottom: the flags, set-up (build_run), the loop of train_step (Algorithm 1)
and periodic_jobs (log, grid, evaluation, checkpoint), the end (finish):
    python train_cifar.py -> train_cifar.main -> trainer.train -> train_step -> diffusion.loss
The command line is plumbing/train_args.py; the budget over sittings is plumbing/budget.py; what a
run shows is plumbing/runlog.py.

Outputs (only rank 0 writes):
    <ckpt-dir>/<run>.pt, <run>_ema.pt       full state for --resume; EMA weights for sampling
    <ckpt-dir>/<run>_ema<d>.pt              the EMA of each --ema-extra-decays d, for sampling
    <sample-dir>/<run>_step<N>.png          grids from the EMA model, fixed noise
    <log-dir>/<run>/                        log.csv, loss.png, eval.csv, TensorBoard events

Exactness: data order is a function of (seed, epoch, position), and the checkpoint stores the
RNG states, so on the CPU a resumed run equals the uninterrupted one bit for bit. A step whose
gradient is NaN/inf is skipped (no optimiser or EMA update); several in a row abort the run.
DDP switches on when torchrun sets RANK: `torchrun --nproc_per_node=N train_cifar.py`.
"""

import contextlib
import copy
import math
import re
import signal
import sys
import textwrap
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from plumbing import data
from plumbing.checkpoint import ema_weights, make_config, save_run, seen_in_all
from plumbing.files import CheckpointError, RunLock, check_writable, load_checkpoint
from plumbing.budget import (CALLS_PER_TRAINING_IMAGE, SittingClock, budget_reached, images_until_pflop, learning_rate,
                             probe_inputs, progress_now, project, seconds_per_training_image, training_flops)
from plumbing.device import (autocast, bf16_fast, cuda_fast_settings, leave_distributed, rank_max, rng_state,
                             set_rng_state, setup_distributed, wrap_ddp)
from diffusion import GaussianDiffusion
from ema import EMA, warmup_reaches
from plumbing.runlog import RunLog, draw_grid, evaluate, final_grid, grid_seconds, plan_final_grid
from plumbing.train_args import check_consistent, parse_args, resolve_resume, schedule_note
from unet import UNet, forward_flops

# ----------------------------------------------------------------------------- the run's state

# Run.sums, kept on the device since the last log row: the loss, the gradient norm and the number of
# finite steps; and the non-finite steps since the last look, with the current run of them in a row.
SUMS = LOSS, GRAD_NORM, FINITE, NONFINITE, STREAK = range(5)

class Run:
    """Everything one training run holds: model, EMA, optimiser, data stream, counters; and what uses
    all of it: the budget's progress, the optimiser step, the log row, the save."""

    def __init__(self, args, config, model, train_model, diffusion, opt, ema, batches, device, rank, world, ckpt_path,
                 ema_extra=None):
        self.args, self.config, self.device, self.rank, self.world = args, config, device, rank, world
        self.model, self.train_model, self.diffusion, self.opt, self.ema, self.batches = (
            model, train_model, diffusion, opt, ema, batches)
        self.ema_extra = ema_extra or {}        # --ema-extra-decays: {decay: EMA}, each as self.ema
        self.ckpt_path = ckpt_path
        self.stale_extra_emas = False           # --overwrite: remove the earlier run's at the first save
        self.master = rank == 0
        self.ema_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.ema_diffusion = GaussianDiffusion(self.ema_model, **config["diffusion"]).to(device)
        self.ema_diffusion.amp = args.amp and bf16_fast(device)      # grids and evaluations as generate.py draws them
        self.step, self.nan_skipped, self.nan_streak, self.train_seconds = 0, 0, 0, 0.0
        self.images_seen = 0    # over all sittings; training FLOPs = 3 × flops_per_image × images_seen
        self.before = None      # --init-from: what the starting weights had seen (checkpoint.seen_in_all)
        self.flops_per_image = forward_flops(model, *probe_inputs(config, device))    # one forward pass
        self.progress = 0.0     # of the run's budget, in [0, 1] (budget.progress_now)
        self.seconds_per_image_step = None      # one network call per image, measured while training
        self.runlog = None
        self.postfix = {}                       # the progress bar's loss, img/s and lr of the last log row
        self.saved_step = None                  # the step of the last checkpoint written (or resumed from)
        # CUDA: a step never waits for the host; elsewhere the skip decision is a free host check.
        self.sync_free = device.type == "cuda" or args.debug_sync_free
        self.amp = autocast(device, args.amp)      # bf16 where it is fast (device.bf16_fast), else a no-op
        self.sums = torch.zeros(len(SUMS), device=device)     # SUMS, on the device: a step never waits
        self.log_folder = Path(args.log_dir) / args.run_name

    @property
    def train_flops(self):
        return training_flops(self.flops_per_image, self.images_seen)      # forward + backward ≈ 3 forwards

    def apply_step(self, loss, grad_norm):
        """DDPM Alg. 1's gradient step on θ and the EMA update, unless the gradient is not finite."""
        ok = torch.isfinite(grad_norm)
        if self.sync_free:                     # fused AdamW skips its update where found_inf = 1
            self.opt.found_inf = (~ok).float()
            self.opt.step()                                             # Alg. 1: gradient step on θ
            self.ema.update(self.model, keep=ok)                       # θ_ema ← d·θ_ema + (1 − d)·θ
            for ema in self.ema_extra.values():
                ema.update(self.model, keep=ok)                         # the same, with each extra d
        elif ok:
            self.opt.step()                                             # Alg. 1: gradient step on θ
            self.ema.update(self.model)                                 # θ_ema ← d·θ_ema + (1 − d)·θ
            for ema in self.ema_extra.values():
                ema.update(self.model)                                  # the same, with each extra d
        bad = (~ok).float()
        self.sums[LOSS] += loss.detach().float().nan_to_num(0.0, 0.0, 0.0) * (1 - bad)
        self.sums[GRAD_NORM] += grad_norm.detach().float().nan_to_num(0.0, 0.0, 0.0) * (1 - bad)
        self.sums[FINITE] += 1 - bad
        self.sums[NONFINITE] += bad
        self.sums[STREAK] = (self.sums[STREAK] + 1) * bad                # non-finite steps in a row

    def read_nans(self, say):
        """Bring the device's count of non-finite steps to the host (a synchronisation): report them,
        and abort after --max-nan-steps in a row. The weights were never touched by them."""
        new, streak = (int(v) for v in self.sums[[NONFINITE, STREAK]].tolist())
        self.nan_streak = streak
        if not new:
            return
        self.nan_skipped += new
        self.sums[NONFINITE] = 0
        say(f"step {self.step}: {new} non-finite step(s) skipped ({streak} in a row, {self.nan_skipped} in all)")
        if streak >= self.args.max_nan_steps:
            raise SystemExit(f"aborting: {streak} non-finite steps in a row at step {self.step}. The weights were "
                             f"not touched by them; the last checkpoint is {self.ckpt_path}. Try a lower --lr, "
                             "a longer --warmup-steps, or --no-amp.")

    def log_row(self, lr, img_s):
        """The log row of the steps since the last one (reads the device sums: a synchronisation)."""
        loss_sum, gnorm_sum, n_ok = self.sums[[LOSS, GRAD_NORM, FINITE]].tolist()
        self.sums[[LOSS, GRAD_NORM, FINITE]] = 0
        return {"step": self.step, "loss": loss_sum / n_ok if n_ok else math.nan,
                "grad_norm": gnorm_sum / n_ok if n_ok else math.nan, "lr": lr, "img_per_s": img_s,
                "minutes": self.train_seconds / 60, "images": self.images_seen, "pflop": self.train_flops / 1e15,
                "nan_skipped": self.nan_skipped}

    def save(self):
        """Full state to <run>.pt and the EMA weights to <run>_ema.pt and each <run>_ema<d>.pt
        (checkpoint.save_run). A write that fails (a full disk, a folder made read-only) leaves the
        previous files intact and says so in one line; the run goes on and tries again at the next
        save. -> whether it was saved."""
        states = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(states, rng_state(self.device))
        if not self.master:
            return True
        stats = {"nan_skipped": self.nan_skipped, "nan_streak": self.nan_streak, "train_seconds": self.train_seconds,
                 "progress": self.progress, "images_seen": self.images_seen, "flops_per_image": self.flops_per_image,
                 "train_flops": self.train_flops, **({"before": self.before} if self.before else {}),
                 **({"rng_ranks": states} if self.world > 1 else {})}
        try:
            save_run(self.ckpt_path, self.ema_path, self.config, self.model, self.ema, self.opt, self.step,
                     rng_state(self.device), self.batches.state_dict(), stats,
                     [(d, ema, self.extra_ema_path(d)) for d, ema in self.ema_extra.items()])
        except CheckpointError as e:
            raise SystemExit(str(e)) from None
        except OSError as e:
            kept = f"step {self.saved_step}" if self.saved_step is not None else "none yet"
            tqdm.write(f"could not save step {self.step} to {self.ckpt_path.parent}/ ({e.strerror or e}); the "
                       f"previous checkpoint is intact ({kept}). Free space or fix the folder: the run tries again "
                       "at the next save")
            return False
        self.saved_step = self.step
        if self.stale_extra_emas:
            remove_stale_extra_emas(self.ckpt_path, self.args.ema_extra_decays, tqdm.write)
            self.stale_extra_emas = False
        return True

    @property
    def ema_path(self):
        return self.ckpt_path.with_name(f"{self.args.run_name}_ema.pt")

    def extra_ema_path(self, decay):
        return self.ckpt_path.with_name(f"{self.args.run_name}_ema{decay}.pt")      # e.g. cifar10_ema0.9995.pt

    def saved_files(self):
        """The files a save writes, for the run's summary lines."""
        return [str(p) for p in (self.ckpt_path, self.ema_path, *map(self.extra_ema_path, self.ema_extra))]

    def ema_now(self):
        """The EMA weights copied into ema_model -> ema_diffusion, to sample grids and evaluations from."""
        self.ema.copy_to(self.ema_model)
        return self.ema_diffusion


# ----------------------------------------------------------------------------- set-up

def open_run_files(args, explicit, rank, say, lock):
    """Before any work: --resume's checkpoint read (or an existing one refused), the settings checked,
    the output folders checked, the run's lock taken -> (checkpoint path, checkpoint or None, the
    folders and lock file the lock made, to remove if the data then fails to load)."""
    ckpt_path = Path(args.ckpt_dir) / f"{args.run_name}.pt"
    ckpt = None
    if args.resume and "init_from" in explicit:
        raise SystemExit(f"error: --init-from starts a new run and --resume continues {ckpt_path}: pass one of them")
    if args.resume:
        if not ckpt_path.exists():
            raise SystemExit(f"error: --resume: there is no {ckpt_path} to continue. A run's checkpoint is "
                             "<--ckpt-dir>/<--run-name>.pt: pass the --ckpt-dir and --run-name it was trained "
                             "with, or start a new run without --resume")
        try:
            ckpt = load_checkpoint(ckpt_path)
        except CheckpointError as e:
            raise SystemExit(f"error: --resume: {e}") from None
        if "optimizer" not in ckpt:
            raise SystemExit(f"error: --resume: {ckpt_path} holds no optimiser state (is it an _ema.pt file?)")
        resolve_resume(args, explicit, ckpt, ckpt_path, say)
    elif ckpt_path.exists() and not args.overwrite:
        raise SystemExit(f"error: {ckpt_path} already exists: pass --resume to continue it, --overwrite to start afresh "
                         "and replace it, or another --ckpt-dir / --run-name")
    check_consistent(args)
    if rank == 0:
        for folder, flag in ((args.ckpt_dir, "--ckpt-dir"), (args.sample_dir, "--sample-dir"),
                             (args.log_dir, "--log-dir")):
            check_writable(folder, flag)          # before hours of training, not at the first save
    made = [p for p in [ckpt_path.parent, *ckpt_path.parent.parents] if not p.exists()]   # folders the lock makes
    lock_made = not lock.path.exists()                                                    # and the lock file
    if rank == 0:
        try:
            note = lock.acquire()
        except CheckpointError as e:
            raise SystemExit(f"error: {e}") from None
        if note:
            say(f"=== {note}")
    return ckpt_path, ckpt, (made, lock_made)


def remove_stale_extra_emas(ckpt_path, decays, say):
    """--overwrite starts the run afresh: an earlier run's <run>_ema<d>.pt for a decay d this run does
    not keep would never be rewritten, and would pass for this run's. Remove those, in one line; at the
    new run's first save (Run.save), so that a run refused before it loses nothing."""
    pattern = re.compile(re.escape(ckpt_path.stem) + r"_ema(\d*\.?\d+)\.pt")
    stale = [p for p in ckpt_path.parent.glob(f"{ckpt_path.stem}_ema*.pt")
             if (m := pattern.fullmatch(p.name)) and float(m.group(1)) not in decays]
    for p in stale:
        p.unlink()
    if stale:
        say(f"note: --overwrite: removed the earlier run's {', '.join(sorted(p.name for p in stale))} "
            "(an EMA decay this run does not keep)")


def load_data(args, device, rank, world, say, lock, made):
    """The dataset, its classes and the data stream -> (images, class_names, num_classes, Batches).
    A dataset that fails to load leaves no lock file or empty folder behind."""
    say(f"=== loading {args.dataset} …")
    try:
        images, labels, class_names = data.load_dataset(args.dataset, args.data_dir, args.image_size, train=True)
    except (FileNotFoundError, ValueError) as e:
        undo_run_files(lock, made)
        raise SystemExit(f"error: {e}") from None
    images, labels = data.subset(images, labels, args.limit_data)
    num_classes = None
    if args.class_cond:
        if labels is None:
            raise SystemExit(f"error: --class-cond: dataset {args.dataset} has no labels; train without --class-cond")
        num_classes = len(class_names) if class_names else int(labels.max()) + 1
        class_names = data.default_class_names(num_classes, class_names)
    else:
        class_names = None     # an unconditional model knows no classes
    try:
        batches = data.Batches(images, labels if args.class_cond else None, args.batch_size, seed=args.seed,
                               flip=args.flip, device=device, rank=rank, world_size=world,
                               num_workers=args.num_workers)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return images, class_names, num_classes, batches


def undo_run_files(lock, made):
    """A run refused after its lock was taken leaves no lock file or empty folder behind."""
    folders, lock_made = made
    if folders or lock_made:
        lock.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            for folder in folders:
                folder.rmdir()


def build_run(args, explicit, device, rank, world, say, lock):
    """Output folders checked, the run's lock taken, then data, model, optimiser, EMA, and on --resume
    their saved state -> Run."""
    ckpt_path, ckpt, made = open_run_files(args, explicit, rank, say, lock)
    start = read_init_from(args.init_from, lock, made) if args.init_from and ckpt is None else None
    images, class_names, num_classes, batches = load_data(args, device, rank, world, say, lock, made)
    config = make_config(args, images, class_names, num_classes)

    torch.manual_seed(args.seed)
    model = UNet(**config["model"]).to(device)
    if start is not None:                       # --init-from: θ starts at a finished run's EMA weights
        try:
            model.load_state_dict(init_weights(start, config, args.init_from, model))
        except SystemExit:
            undo_run_files(lock, made)
            raise
    diffusion = GaussianDiffusion(model, **config["diffusion"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type == "cuda" or args.debug_sync_free)
    ema = EMA(model, args.ema_decay, warmup=args.ema_warmup)      # decay and warmup: from the flags, always
    ema_extra = {d: EMA(model, d, warmup=args.ema_warmup) for d in args.ema_extra_decays}
    train_model = model
    if device.type == "cuda":
        cuda_fast_settings(model)
    if args.compile:
        train_model = torch.compile(model)              # `model` (uncompiled) is what gets saved
    if world > 1:
        train_model = wrap_ddp(train_model, device)
    run = Run(args, config, model, train_model, diffusion, opt, ema, batches, device, rank, world, ckpt_path, ema_extra)
    run.stale_extra_emas = args.overwrite and ckpt is None
    if ckpt is not None:
        restore(run, ckpt, say)
    elif world > 1:
        torch.manual_seed(args.seed + 1000 * rank)     # same initial weights, different noise per rank
    if start is not None:
        run.before = seen_in_all(start)

    n_params = sum(p.numel() for p in model.parameters())
    use_amp = args.amp and bf16_fast(device)
    say(f"=== {args.run_name}: {len(images)} images {tuple(images.shape[1:])}, classes: {class_names}")
    say(f"=== UNet {n_params / 1e6:.2f}M parameters on {device}"
        f"{f' × {world} processes (DDP)' if world > 1 else ''}"
        f"{', bf16 autocast' if use_amp else ''}{', compiled' if args.compile else ''}")
    say(textwrap.fill("=== config: " + "  ".join(f"{k}={v}" for k, v in sorted(config["train"].items())),
                      width=110, subsequent_indent="    ", break_long_words=False, break_on_hyphens=False))
    if ckpt is not None:
        say(f"=== resuming {ckpt_path} at step {run.step} (epoch {batches.epoch}, batch {batches.index})")
    if start is not None:
        seen = run.before
        hours = f", {seen['train_seconds'] / 3600:.1f} h" if seen["train_seconds"] else ""
        pflop = f", {seen['train_flops'] / 1e15:.2f} PFLOP" if seen["train_flops"] else ""
        chain = " in all, its own --init-from chain included" if start.get("before") else ""
        say(f"=== weights from {args.init_from} (its EMA: step {seen['step']}{pflop}{hours}{chain}); a new run "
            "with a fresh optimiser and lr schedule, whose steps and PFLOP count from 0 (the checkpoints keep "
            "these as 'before')")
    return run


# What --init-from's checkpoint must share with the new run: the network's shape and the noise
# process it learned to reverse. The training choices (dropout, t sampling, weighting) may change.
INIT_MUST_MATCH = ("in_channels", "base_channels", "channel_mults", "num_res_blocks", "attn_resolutions",
                   "image_size", "num_classes", "channels", "timesteps", "schedule", "objective", "variance")


def read_init_from(path, lock, made):
    """--init-from: the checkpoint whose EMA weights start a new run, read before the data (a bad
    path stops the run at once, leaving nothing behind) -> its dict."""
    try:
        return load_checkpoint(path)
    except (CheckpointError, OSError) as e:
        undo_run_files(lock, made)
        raise SystemExit(f"error: --init-from: {e}") from None


def init_weights(start, config, path, model):
    """--init-from: the checkpoint's EMA weights as `model`'s state dict (in the model's dtypes), if
    it was trained with the same network and noise process; else SystemExit naming what differs."""
    theirs = start["config"]
    differ = [f"{k} {theirs[part].get(k)!r} there, {v!r} here" for part in ("model", "diffusion")
              for k, v in config[part].items()
              if k in INIT_MUST_MATCH and theirs[part].get(k) != v]
    if differ:
        raise SystemExit(f"error: --init-from: {path} is another model ({'; '.join(differ)}): pass the model "
                         "flags it was trained with (its preset, e.g. --cpu)")
    own = model.state_dict()
    return {k: v.to(own[k].dtype) for k, v in ema_weights(start).items()}


def restore(run, ckpt, say=print):
    """--resume: the weights, optimiser, EMA, data position, counters and random streams of a checkpoint.
    An extra EMA decay the checkpoint lacks starts from the current weights; one it has but the run
    no longer keeps is left out (one line says which)."""
    run.model.load_state_dict(ckpt["model"])
    saved = ckpt["optimizer"]      # its moments and step counts; its settings (weight decay, fused) are the flags'
    groups = [{**ours, "params": theirs["params"]}
              for ours, theirs in zip(run.opt.state_dict()["param_groups"], saved["param_groups"])]
    run.opt.load_state_dict({**saved, "param_groups": groups})
    run.ema.load_state_dict(ckpt["ema"])
    stored = ckpt.get("ema_extra", {})
    for d in run.ema_extra:
        if str(d) in stored:
            run.ema_extra[d].load_state_dict(stored[str(d)])
        else:
            run.ema_extra[d] = EMA(run.model, d, warmup=run.args.ema_warmup)      # θ_ema,0 = θ now
    new = [str(d) for d in run.ema_extra if str(d) not in stored]
    dropped = [d for d in stored if float(d) not in run.ema_extra]
    if new or dropped:
        say(f"note: --ema-extra-decays: {', '.join(new) or 'none'} start(s) now, at step {ckpt['step']}, from the "
            f"current weights; {', '.join(dropped) or 'none'} no longer kept (its file stays at its last save)")
    run.batches.load_state_dict(ckpt["data_state"])
    run.step, run.nan_skipped, run.nan_streak = ckpt["step"], ckpt["nan_skipped"], ckpt["nan_streak"]
    run.sums[STREAK] = run.nan_streak
    run.saved_step = run.step
    run.train_seconds = ckpt.get("train_seconds", 0.0)
    run.images_seen = ckpt.get("images_seen", run.step * run.args.batch_size)   # older checkpoints: one batch size
    run.before = ckpt.get("before")
    run.progress = ckpt.get("progress", run.step / run.args.steps)
    states = ckpt.get("rng_ranks") or [ckpt["rng"]]
    if len(states) == run.world:
        set_rng_state(states[run.rank], run.device)
    else:                       # resumed on another number of processes: fresh noise streams
        torch.manual_seed(run.args.seed + 1000 * run.rank + run.step)


def start_sitting(run, say, cpu_recipe):
    """Before the first step: the run's size and projected time, and its log opened -> False where the
    run's budget is already spent (nothing to train)."""
    args = run.args
    done = budget_reached(args, run.step, run.train_flops, run.train_seconds)
    if done:
        say(f"{run.ckpt_path} has {done} (step {run.step}, {run.train_flops / 1e15:.3g} PFLOP, "
            f"{run.train_seconds / 3600:.2f} h); raise that budget to train on")
        return False
    per_image = seconds_per_training_image(run.model, run.config, run.device, run.amp) / run.world
    images = project(args, step=run.step, train_flops=run.train_flops, train_seconds=run.train_seconds,
                     flops_per_image=run.flops_per_image, per_image=per_image, device=run.device, say=say,
                     cpu_recipe=cpu_recipe)
    note_identical_emas(args, run.step + math.ceil(images / args.batch_size), say)
    note = schedule_note(args)
    if note:
        say(note)
    if run.master:
        run.runlog = RunLog(run.log_folder, run.step if args.resume else None, args.tensorboard)
        say(f"=== writing {', '.join(run.saved_files())}, grids in {args.sample_dir}/, logs in {run.log_folder}/"
            f"{' (TensorBoard: tensorboard --logdir ' + args.log_dir + ')' if run.runlog.tb else ''}")
    return True


def note_identical_emas(args, last_step, say):
    """--ema-warmup holds every decay at (1 + n)/(10 + n) until that reaches it (ema.warmup_reaches):
    the decays a run ends before reaching give identical EMAs. Say so before training, not after."""
    decays = sorted({args.ema_decay, *args.ema_extra_decays})
    held = [d for d in decays if warmup_reaches(d) >= last_step]
    if args.ema_warmup and len(held) > 1:
        reached = (1 + last_step) / (10 + last_step)
        say(f"note: --ema-warmup holds the EMA decay at (1+n)/(10+n) ≤ {reached:.4f} up to this run's last step "
            f"(≈ {last_step:,}); decays {', '.join(f'{d:g}' for d in held)} are reached only at steps "
            f"{', '.join(f'{warmup_reaches(d):,}' for d in held)}, so their EMA files will be identical. "
            f"Train longer, or keep decays below {reached:.4f}")


class StopOnSignal:
    """Ctrl-C / SIGTERM: finish the step, save, stop (.signal: the signal's name, else None). The
    handler steps aside after the first signal, so a second one ends the process at once, whatever
    it is doing. The earlier handlers come back with release(), which finish calls once the end's
    save is written (so a first signal during that save waits for it), or when the loop raises."""

    def __init__(self, run):
        self.run, self.signal, self.old_handlers = run, None, {}

    def __enter__(self):
        self.old_handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            self.release()

    def release(self):
        for s, h in self.old_handlers.items():
            signal.signal(s, h)
        self.old_handlers = {}

    def on_signal(self, signum, frame):
        self.signal = signal.Signals(signum).name
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL)
        if self.run.master:
            step_s = CALLS_PER_TRAINING_IMAGE * self.run.args.batch_size * (self.run.seconds_per_image_step or 0.0)
            tqdm.write(f"{self.signal}: finishing this step{f' (about {step_s:.0f} s)' if step_s >= 2 else ''}, "
                       f"then saving {self.run.ckpt_path} (press Ctrl-C again to quit at once, without saving)")


# ----------------------------------------------------------------------------- the loop

def train_step(run, x0, y, lr):
    """DDPM Algorithm 1, once: t and ε drawn, the loss at x_t (diffusion.loss), its gradient clipped to
    --grad-clip, then θ ← AdamW(θ) and θ_ema ← d·θ_ema + (1 − d)·θ, both skipped for a non-finite step.
    x0: (B/W, C, H, W) in [−1, 1]; y: (B/W,) labels or None. -> the loss (on the device)."""
    for group in run.opt.param_groups:
        group["lr"] = lr
    with run.amp:
        loss = run.diffusion.loss(x0, y, model=run.train_model)     # DDPM eq. 14: ‖ε − ε_θ(x_t, t)‖² (or v, x_0)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()                                                 # ∇_θ
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.args.grad_clip)
    run.step += 1
    run.images_seen += run.args.batch_size
    run.apply_step(loss, grad_norm)                                 # AdamW step on θ, then the EMA
    return loss


def periodic_jobs(run, meter, lr, finished, say_all):
    """Every --log-every steps a log row, every --sample-every a grid, every --eval-every the proxy FID,
    every --save-every a checkpoint (the run's last step leaves the grid and the save to the end).
    meter: the log's clock {"t", "n", "first_step"}; the time spent here is not training time."""
    args, t_pause = run.args, time.time()
    if run.step % args.log_every == 0 or run.step == meter["first_step"] + 1 or finished:
        if run.sync_free:
            run.read_nans(say_all)
        seconds = max(time.time() - meter["t"], 1e-9)
        img_s = meter["n"] * args.batch_size / seconds
        run.seconds_per_image_step = seconds / (CALLS_PER_TRAINING_IMAGE * meter["n"] * args.batch_size)
        row = run.log_row(lr, img_s)
        if run.master:
            run.runlog.log(row)
            run.postfix = dict(loss=f"{row['loss']:.4f}", img_s=f"{img_s:.0f}", lr=f"{lr:.2g}")
        meter["t"], meter["n"] = time.time(), 0
        t_pause = meter["t"]
    sample_now = args.sample_every and run.step % args.sample_every == 0 and not finished
    eval_now = args.eval_every and run.step % args.eval_every == 0
    if sample_now and run.master:
        path = draw_grid(run.ema_now(), args, run.step, run.runlog, seconds_per_image_step=run.seconds_per_image_step)
        if path:
            tqdm.write(f"step {run.step}: samples in {path}")
        run.runlog.plot(f"{args.run_name}: training loss")
    if eval_now and run.master:
        evaluate(run.ema_now(), run.config, args, run.step, run.runlog)
    if run.world > 1 and (sample_now or eval_now):
        dist.barrier()                                          # the other ranks wait for rank 0
    if args.save_every and run.step % args.save_every == 0 and not finished:
        run.read_nans(say_all)
        run.save()
    meter["t"] += time.time() - t_pause                         # img/s counts training time only


def last_step(run):
    """The progress bar's end: --steps, or sooner where --max-pflop is reached first."""
    args = run.args
    if not args.max_pflop:
        return args.steps
    flops_per_step = run.flops_per_image * args.batch_size
    return min(args.steps, run.step + images_until_pflop(args.max_pflop, run.train_flops, flops_per_step))


def reserve_seconds(run, clock):
    """What the end of the sitting needs of --max-minutes: two steps, the save, and the end-of-run grid."""
    args, per_call = run.args, run.seconds_per_image_step or 0.0
    reserve = 2 * CALLS_PER_TRAINING_IMAGE * args.batch_size * per_call + 2.0
    if args.sample_every and clock.seconds is not None:
        n_grid = plan_final_grid(args.sample_count, args.sample_steps, per_call, clock.seconds)
        reserve += grid_seconds(n_grid, args.sample_steps, per_call)
    return reserve


def train(defaults, argv=None, presets=None, description=None):
    """`python train_<dataset>.py`: the flags over the script's defaults (and `presets`: {name: (values,
    help)}), then one sitting of the run (sitting). The run's lock (files.RunLock) is held from the first
    check on; under torchrun the ranks leave together (device.leave_distributed)."""
    args, explicit = parse_args(defaults, argv, presets, description)
    clock = SittingClock(args.max_minutes)                      # --max-minutes counts from here
    lock = RunLock(Path(args.ckpt_dir) / f"{args.run_name}.pt")
    ended = False
    try:
        device, rank, world = setup_distributed(args)
        stop_signal = sitting(args, explicit, clock, lock, device, rank, world, cpu_recipe_note(args, presets, argv))
        ended = True
    finally:
        lock.release()
        leave_distributed(all_ended=ended)
    if stop_signal:                 # saved; the shell's status for a stop by signal: 130 Ctrl-C, 143 kill
        raise SystemExit(128 + signal.Signals[stop_signal])


def sitting(args, explicit, clock, lock, device, rank, world, recipe_note):
    """One sitting: set-up (build_run), the loop of train_step (DDPM Algorithm 1) and periodic_jobs, the
    end (finish). -> the name of the signal that stopped it, or None."""
    say = print if rank == 0 else (lambda *a, **k: None)
    say_all = tqdm.write if rank == 0 else (lambda *a: None)
    run = build_run(args, explicit, device, rank, world, say, lock)
    if not start_sitting(run, say, recipe_note):
        return None
    t_loop, train_seconds_before, progress_before = time.time(), run.train_seconds, run.progress
    meter = {"t": t_loop, "n": 0, "first_step": run.step}
    # The run's progress drives --lr-schedule. Every rank uses the largest clocks of all ranks, so
    # that they all take the same step.
    time_used, train_seconds = rank_max([clock.time_used(), run.train_seconds], device, world)
    reason = None
    with StopOnSignal(run) as stop, clock.bar(last_step(run), run.step, args.run_name, not run.master) as pbar:
        while reason is None:
            x0, y = next(run.batches)                                           # (B/W, C, H, W) in [−1, 1]
            if device.type == "cuda":
                x0 = x0.contiguous(memory_format=torch.channels_last)
            if run.step + 1 in args.debug_nan_steps:
                x0 = x0 * float("nan")                                          # test hook: a non-finite step
            run.progress = progress_now(args, run.step, run.train_flops, train_seconds, progress_before, time_used)
            lr = learning_rate(args, run.step, run.progress)                    # warmup, then --lr-schedule
            train_step(run, x0, y, lr)                                          # DDPM Algorithm 1
            if not run.sync_free:
                run.read_nans(say_all)                     # free without a GPU: report NaN steps at once
            run.train_seconds = train_seconds_before + time.time() - t_loop
            if run.master:                                  # the live step, every step
                pbar.set_postfix(step=run.step, pflop=f"{run.train_flops / 1e15:.3g}", **run.postfix, refresh=False)
            clock.advance(pbar, run.step)
            meter["n"] += 1
            finished = budget_reached(args, run.step, run.train_flops, train_seconds)   # the end saves and draws
            periodic_jobs(run, meter, lr, finished, say_all)
            # Stop early enough that saving and the end-of-run grid still fit in --max-minutes.
            stopping, time_used, train_seconds = rank_max(
                [clock.left() <= reserve_seconds(run, clock) or stop.signal is not None, clock.time_used(),
                 run.train_seconds], device, world)
            if stopping:
                reason = stop.signal or f"--max-minutes {args.max_minutes} used up"
            elif run.step == args.debug_stop_step:
                reason = "--debug-stop-step"                                      # test hook: end a sitting
            else:
                reason = finished
    finish(run, clock, reason, say, stop)
    return stop.signal


def cpu_recipe_note(args, presets, argv):
    """The line that names a script's --cpu preset on a CPU, unless it is on or the run is resumed."""
    presets = presets or {}
    argv = sys.argv[1:] if argv is None else list(argv)
    if "cpu" in presets and "--cpu" not in argv and not args.resume:
        return f"--cpu: {presets['cpu'][1]}"
    return None


def finish(run, clock, reason, say, stop):
    """The end of a sitting: save (a first signal waits for it), say where the run stands, the
    end-of-run grid (not after a signal), the loss plot."""
    args = run.args
    try:
        run.read_nans(say)
        say(f"=== saving {run.ckpt_path} …")
        saved = run.save()
    finally:
        stop.release()
    if not saved:
        raise SystemExit(f"stopped at step {run.step} ({reason}) without saving it; the last checkpoint is "
                         f"{run.ckpt_path} at step {run.saved_step}")
    if run.master:
        say(f"=== stopped at step {run.step} ({reason}) after {clock.elapsed() / 60:.1f} min; "
            f"saved {', '.join(run.saved_files()[:-1])} and {run.saved_files()[-1]}")
        say(f"=== the run so far: {run.step} steps, {run.images_seen:,} images, {run.train_flops / 1e15:.3g} PFLOP, "
            f"{run.train_seconds / 3600:.2f} h of training")
        if run.nan_skipped:
            say(f"=== {run.nan_skipped} non-finite steps were skipped")
        if args.sample_every and stop.signal is None:
            final_grid(run.ema_now(), args, run.step, run.runlog, run.seconds_per_image_step, clock, run.ema_path)
        run.runlog.plot(f"{args.run_name}: training loss")
        run.runlog.close()
        say(f"=== logs: {run.log_folder}/log.csv, loss.png")
    if args.debug_dump_dir:                                   # test hook: each rank's final weights
        Path(args.debug_dump_dir).mkdir(parents=True, exist_ok=True)
        torch.save({"model": {k: v.cpu() for k, v in run.model.state_dict().items()},
                    "ema": {k: v.cpu() for k, v in run.ema.shadow.items()}},
                   Path(args.debug_dump_dir) / f"rank{run.rank}.pt")
