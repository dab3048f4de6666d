"""The one training loop that train_mnist.py, train_cifar.py and train_celeba.py share.

    per step (DDPM Algorithm 1):  x_0 ~ data, t ~ U{1..T}, ε ~ N(0, I)
        θ ← θ − lr·AdamW(∇_θ ‖ε − ε_θ(√ᾱ_t·x_0 + √(1−ᾱ_t)·ε, t)‖²)      (gradient clipped to 1.0)
        θ_ema ← d·θ_ema + (1 − d)·θ

train() reads top to bottom: set-up, the step, the periodic jobs (log, grid, evaluation,
checkpoint), the end. The command line is train_args.py; the logs are runlog.py.

Outputs (only rank 0 writes):
    <ckpt-dir>/<run>.pt, <run>_ema.pt       full state for --resume; EMA weights for sampling
    <sample-dir>/<run>_step<N>.png          grids from the EMA model, fixed noise
    <log-dir>/<run>/                        log.csv, loss.png, eval.csv, TensorBoard events

Exactness: data order is a function of (seed, epoch, position), and the checkpoint stores the
RNG states, so on the CPU a resumed run equals the uninterrupted one bit for bit. A step whose
gradient is NaN/inf is skipped (no optimiser or EMA update); several in a row abort the run.
DDP switches on when torchrun sets RANK: `torchrun --nproc_per_node=N train_cifar.py`.
"""

import copy
import math
import signal
import textwrap
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

import data
from checkpoint import (CheckpointError, autocast, bf16_fast, load_checkpoint, rank_max, rng_state,
                        save_checkpoint, set_rng_state, setup_distributed)
from diffusion import GaussianDiffusion
from ema import EMA
from generate import classes_in_turn, make_grid, save_grid, to_uint8
from runlog import FINAL_GRID_SHARE, Budget, RunLog, grid_seconds, plan_final_grid
from train_args import check_consistent, make_config, parse_args, resolve_resume
from unet import UNet

# ----------------------------------------------------------------------------- small pieces

def learning_rate(args, step, progress):
    """Peak --lr after a linear warmup of --warmup-steps, times --lr-schedule at progress ∈ [0, 1]:
    constant (DDPM), linear to 0 (the best schedule for a fixed budget in Li et al. 2020,
    "Budgeted training") or cosine to 0 (Loshchilov & Hutter 2017)."""
    warmup = min(1.0, (step + 1) / max(1, args.warmup_steps))
    decay = {"constant": 1.0, "linear": 1.0 - progress,
             "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}[args.lr_schedule]
    return args.lr * warmup * decay


def all_finite(tensors):
    return all(bool(torch.isfinite(v).all()) for v in tensors if v.is_floating_point())


# ----------------------------------------------------------------------------- the run's state

class Run:
    """Everything one training run holds, and the jobs that use all of it: save, draw a grid, evaluate."""

    def __init__(self, args, config, model, train_model, diffusion, opt, ema, batches, device, rank, world, ckpt_path):
        self.args, self.config, self.device, self.rank, self.world = args, config, device, rank, world
        self.model, self.train_model, self.diffusion, self.opt, self.ema, self.batches = (
            model, train_model, diffusion, opt, ema, batches)
        self.ckpt_path = ckpt_path
        self.master = rank == 0
        self.ema_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.ema_diffusion = GaussianDiffusion(self.ema_model, **config["diffusion"]).to(device)
        self.ema_diffusion.amp = args.amp and bf16_fast(device)      # grids and evaluations as generate.py draws them
        self.step, self.nan_skipped, self.nan_streak, self.train_seconds = 0, 0, 0, 0.0
        self.progress = 0.0     # of the run, in [0, 1]: the larger of step/--steps and --max-minutes used
        self.seconds_per_image_step = None      # one network call per image, measured while training
        self.runlog = None
        # CUDA: a step never waits for the host; elsewhere the skip decision is a free host check.
        self.sync_free = device.type == "cuda" or args.debug_sync_free
        # Device-side sums since the last log row: loss, grad norm, finite steps; and non-finite steps
        # since the last look, with the current run of them in a row.
        self.sums = torch.zeros(5, device=device)

    def apply_step(self, loss, grad_norm):
        """DDPM Alg. 1's gradient step on θ and the EMA update, unless the gradient is not finite."""
        ok = torch.isfinite(grad_norm)
        if self.sync_free:                     # fused AdamW skips its update where found_inf = 1
            self.opt.found_inf = (~ok).float()
            self.opt.step()                                             # Alg. 1: gradient step on θ
            self.ema.update(self.model, keep=ok)                       # θ_ema ← d·θ_ema + (1 − d)·θ
        elif ok:
            self.opt.step()                                             # Alg. 1: gradient step on θ
            self.ema.update(self.model)                                 # θ_ema ← d·θ_ema + (1 − d)·θ
        bad = (~ok).float()
        finite = torch.stack([loss.detach().float(), grad_norm.detach().float()]).nan_to_num(0.0, 0.0, 0.0)
        self.sums[:2] += finite * (1 - bad)
        self.sums[2] += 1 - bad
        self.sums[3] += bad
        self.sums[4] = (self.sums[4] + 1) * bad                         # non-finite steps in a row

    def read_nans(self, say):
        """Bring the device's count of non-finite steps to the host (a synchronisation): report them,
        and abort after --max-nan-steps in a row. The weights were never touched by them."""
        new, streak = (int(v) for v in self.sums[3:].tolist())
        self.nan_streak = streak
        if not new:
            return
        self.nan_skipped += new
        self.sums[3] = 0
        say(f"step {self.step}: {new} non-finite step(s) skipped ({streak} in a row, {self.nan_skipped} in all)")
        if streak >= self.args.max_nan_steps:
            raise SystemExit(f"aborting: {streak} non-finite steps in a row at step {self.step}. The weights were "
                             f"not touched by them; the last checkpoint is {self.ckpt_path}. Try a lower --lr, "
                             "a longer --warmup-steps, or --no-amp.")

    def log_row(self, lr, img_s):
        """The log row of the steps since the last one (reads the device sums: a synchronisation)."""
        loss_sum, gnorm_sum, n_ok = self.sums[:3].tolist()
        self.sums[:3] = 0
        return {"step": self.step, "loss": loss_sum / n_ok if n_ok else math.nan,
                "grad_norm": gnorm_sum / n_ok if n_ok else math.nan, "lr": lr, "img_per_s": img_s,
                "minutes": self.train_seconds / 60, "nan_skipped": self.nan_skipped}

    def save(self):
        """Full state to <run>.pt and the EMA weights to <run>_ema.pt, atomically; never non-finite weights."""
        states = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(states, rng_state(self.device))
        if not self.master:
            return
        weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        ema_state = self.ema.state_dict()
        ema_state["shadow"] = {k: v.cpu() for k, v in ema_state["shadow"].items()}
        if not (all_finite(weights.values()) and all_finite(ema_state["shadow"].values())):
            raise SystemExit(f"refusing to save non-finite weights at step {self.step}; "
                             f"the last good checkpoint is {self.ckpt_path}")
        full = {"config": self.config, "model": weights, "ema": ema_state, "optimizer": self.opt.state_dict(),
                "step": self.step, "rng": rng_state(self.device), "data_state": self.batches.state_dict(),
                "nan_skipped": self.nan_skipped, "nan_streak": self.nan_streak, "train_seconds": self.train_seconds,
                "progress": self.progress, "versions": {"torch": str(torch.__version__)}}
        if self.world > 1:
            full["rng_ranks"] = states
        save_checkpoint(full, self.ckpt_path)
        dtypes = {k: v.dtype for k, v in weights.items()}
        save_checkpoint({"config": self.config, "step": self.step,
                         "ema_model": {k: v.to(dtypes[k]) for k, v in ema_state["shadow"].items()}},
                        self.ema_path)

    @property
    def ema_path(self):
        return self.ckpt_path.with_name(f"{self.args.run_name}_ema.pt")

    def sample_grid(self, n=None):
        """A grid from the EMA model, from the same x_T every time (comparable grids); returns its path."""
        args = self.args
        n, ncol = n or args.sample_count, None
        num_classes = self.config["model"]["num_classes"]
        labels = None
        if num_classes:                                     # one column per class, full rows
            ncol = min(num_classes, 16)
            n = math.ceil(n / ncol) * ncol
            labels = classes_in_turn(n, num_classes).to(self.device)
        ncol = ncol or max(1, int(math.sqrt(n)))
        about = (f", about {grid_seconds(n, args.sample_steps, self.seconds_per_image_step):.0f} s"
                 if self.seconds_per_image_step else "")
        tqdm.write(f"step {self.step}: drawing a {n}-image grid ({args.sample_sampler}, {args.sample_steps} steps"
                   f"{about})")
        self.ema.copy_to(self.ema_model)
        gen = torch.Generator().manual_seed(1234)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            x = self.ema_diffusion.sample(n, sampler=args.sample_sampler, steps=args.sample_steps, labels=labels,
                                          generator=gen, progress=True)
        images = to_uint8(x)
        path = Path(args.sample_dir) / f"{args.run_name}_step{self.step}.png"
        save_grid(images, path, ncol=ncol)
        self.runlog.log_grid(self.step, make_grid(images, ncol))
        return path

    def evaluate(self):
        """The proxy FID of the EMA model (fid.proxy_metrics) into eval.csv; a failure never ends the run."""
        try:
            import fid
        except ImportError as e:
            tqdm.write(f"--eval-every: cannot import fid.py ({e}); evaluation is off for this run")
            self.args.eval_every = 0
            return
        self.ema.copy_to(self.ema_model)
        tqdm.write(f"step {self.step}: proxy FID of {self.args.eval_samples} samples")
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                metrics = fid.proxy_metrics(self.ema_diffusion, self.config, data_dir=self.args.data_dir,
                                            num_samples=self.args.eval_samples, device=self.device,
                                            ckpt_dir=self.args.ckpt_dir)
        except Exception as e:            # a broken evaluation must not end a long training run
            tqdm.write(f"eval @ step {self.step} failed ({type(e).__name__}: {e}); training goes on")
            return
        row = {"step": self.step, **{k: float(v) if isinstance(v, (int, float)) else v for k, v in metrics.items()}}
        self.runlog.log_eval(row)
        tqdm.write(f"eval @ step {self.step}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                           for k, v in row.items() if k != "step"))


# ----------------------------------------------------------------------------- set-up

def build_run(args, explicit, device, rank, world, say):
    """Data, model, optimiser, EMA, and on --resume their saved state -> Run."""
    ckpt_path = Path(args.ckpt_dir) / f"{args.run_name}.pt"
    ckpt = None
    if args.resume:
        try:
            ckpt = load_checkpoint(ckpt_path)
        except CheckpointError as e:
            raise SystemExit(f"--resume: {e}") from None
        if "optimizer" not in ckpt:
            raise SystemExit(f"--resume: {ckpt_path} holds no optimiser state (is it an _ema.pt file?)")
        resolve_resume(args, explicit, ckpt, ckpt_path, say)
    elif ckpt_path.exists() and not args.overwrite:
        raise SystemExit(f"{ckpt_path} already exists: pass --resume to continue it, --overwrite to start afresh "
                         "and replace it, or another --ckpt-dir / --run-name")
    check_consistent(args)

    say(f"=== loading {args.dataset} …")
    try:
        images, labels, class_names = data.load_dataset(args.dataset, args.data_dir, args.image_size, train=True)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    images, labels = data.subset(images, labels, args.limit_data)
    num_classes = None
    if args.class_cond:
        if labels is None:
            raise SystemExit(f"--class-cond: dataset {args.dataset} has no labels; train without --class-cond")
        num_classes = len(class_names) if class_names else int(labels.max()) + 1
        class_names = class_names or [str(i) for i in range(num_classes)]
    else:
        class_names = None     # an unconditional model knows no classes
    config = make_config(args, images, class_names, num_classes)
    try:
        batches = data.Batches(images, labels if args.class_cond else None, args.batch_size, seed=args.seed,
                               flip=args.flip, device=device, rank=rank, world_size=world,
                               num_workers=args.num_workers)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None

    torch.manual_seed(args.seed)
    model = UNet(**config["model"]).to(device)
    diffusion = GaussianDiffusion(model, **config["diffusion"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type == "cuda" or args.debug_sync_free)
    ema = EMA(model, args.ema_decay, warmup=args.ema_warmup)      # decay and warmup: from the flags, always
    train_model = model
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        model.to(memory_format=torch.channels_last)
    if args.compile:
        train_model = torch.compile(model)              # `model` (uncompiled) is what gets saved
    if world > 1:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    run = Run(args, config, model, train_model, diffusion, opt, ema, batches, device, rank, world, ckpt_path)

    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        ema.load_state_dict(ckpt["ema"])
        batches.load_state_dict(ckpt["data_state"])
        run.step, run.nan_skipped, run.nan_streak = ckpt["step"], ckpt["nan_skipped"], ckpt["nan_streak"]
        run.train_seconds = ckpt.get("train_seconds", 0.0)
        run.progress = ckpt.get("progress", run.step / args.steps)
        states = ckpt.get("rng_ranks") or [ckpt["rng"]]
        if len(states) == world:
            set_rng_state(states[rank], device)
        else:                       # resumed on another number of processes: fresh noise streams
            torch.manual_seed(args.seed + 1000 * rank + run.step)
    elif world > 1:
        torch.manual_seed(args.seed + 1000 * rank)     # same initial weights, different noise per rank

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
    return run


# ----------------------------------------------------------------------------- the loop

def train(args, explicit):
    budget = Budget(args.max_minutes, time.time())
    device, rank, world = setup_distributed(args)
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    run = build_run(args, explicit, device, rank, world, say)
    if run.step >= args.steps:
        say(f"{run.ckpt_path} is already at step {run.step} ≥ --steps {args.steps}; pass a larger --steps to train on")
        return
    log_folder = Path(args.log_dir) / args.run_name
    if master:
        run.runlog = RunLog(log_folder, run.step if args.resume else None, args.tensorboard)
        say(f"=== writing {run.ckpt_path}, {run.ema_path}, grids in {args.sample_dir}/, logs in {log_folder}/"
            f"{' (TensorBoard: tensorboard --logdir ' + args.log_dir + ')' if run.runlog.tb else ''}")
    amp = autocast(device, args.amp)

    # Ctrl-C / SIGTERM: finish the step, save, stop. The handler steps aside after the first
    # signal, so a second one ends the process at once, whatever it is doing.
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signal.Signals(signum).name
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL)
        if master:
            tqdm.write(f"{stop['signal']}: finishing this step, then saving {run.ckpt_path} (press Ctrl-C again "
                       "to quit at once, without saving)")

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    pbar = budget.bar(args.steps, run.step, args.run_name, disable=not master)
    t_loop, t_log, n_log = time.time(), time.time(), 0
    train_seconds_before, first_step = run.train_seconds, run.step
    # The run's progress drives --lr-schedule. With --max-minutes it is also time: a resumed run goes
    # on from where it stood and reaches 1 at this session's end. Every rank uses the largest clock
    # of all ranks, so that they all take the same step.
    progress_before = run.progress
    time_used = rank_max([budget.time_used()], device, world)[0]
    if run.step:
        run.sums[4] = run.nan_streak
    reason = "reached --steps"
    try:
        while run.step < args.steps:
            # ------------------------------------------------ the step: DDPM Algorithm 1
            x0, y = next(run.batches)                                           # (B/W, C, H, W) in [−1, 1]
            if device.type == "cuda":
                x0 = x0.contiguous(memory_format=torch.channels_last)
            run.progress = max(run.step / args.steps, progress_before + (1 - progress_before) * time_used)
            lr = learning_rate(args, run.step, run.progress)                    # warmup, then --lr-schedule
            for group in run.opt.param_groups:
                group["lr"] = lr
            with amp:
                loss = run.diffusion.loss(x0, y, model=run.train_model)         # DDPM eq. 14
            if run.step + 1 in args.debug_nan_steps:
                loss = loss * float("nan")                                      # test hook
            run.opt.zero_grad(set_to_none=True)
            loss.backward()                                                     # ∇_θ ‖ε − ε_θ(x_t, t)‖²
            grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
            run.step += 1
            # With DDP the gradients are already averaged, so every rank takes the same decision.
            run.apply_step(loss, grad_norm)
            say_all = tqdm.write if master else (lambda *a: None)
            if not run.sync_free:
                run.read_nans(say_all)                     # free without a GPU: report NaN steps at once
            run.train_seconds = train_seconds_before + time.time() - t_loop
            budget.advance(pbar, run.step)
            n_log += 1

            # ------------------------------------------------ periodic jobs
            t_pause = time.time()
            log_now = run.step % args.log_every == 0 or run.step == first_step + 1 or run.step == args.steps
            if log_now:
                if run.sync_free:
                    run.read_nans(say_all)
                seconds = max(time.time() - t_log, 1e-9)
                img_s = n_log * args.batch_size / seconds
                run.seconds_per_image_step = seconds / (3 * n_log * args.batch_size)   # a step ≈ 3 network calls
                row = run.log_row(lr, img_s)
                if master:
                    run.runlog.log(row)
                    pbar.set_postfix(step=run.step, loss=f"{row['loss']:.4f}", img_s=f"{img_s:.0f}", lr=f"{lr:.2g}")
                t_log, n_log = time.time(), 0
                t_pause = t_log
            sample_now = args.sample_every and run.step % args.sample_every == 0 and run.step < args.steps
            eval_now = args.eval_every and run.step % args.eval_every == 0
            if sample_now and master:
                tqdm.write(f"step {run.step}: samples in {run.sample_grid()}")
                run.runlog.plot(f"{args.run_name}: training loss")
            if eval_now and master:
                run.evaluate()
            if world > 1 and (sample_now or eval_now):
                dist.barrier()                              # the other ranks wait for rank 0
            if args.save_every and run.step % args.save_every == 0 and run.step < args.steps:
                run.read_nans(say_all)
                run.save()
            t_log += time.time() - t_pause                 # img/s counts training time only

            # Stop early enough that saving and the end-of-run grid still fit in --max-minutes.
            per_call = run.seconds_per_image_step or 0.0
            reserve = 2 * 3 * args.batch_size * per_call + 2.0
            if args.sample_every and budget.seconds is not None:
                n_grid = plan_final_grid(args.sample_count, args.sample_steps, per_call, budget.seconds)
                reserve += grid_seconds(n_grid, args.sample_steps, per_call)
            stopping, time_used = rank_max([budget.left() <= reserve or stop["signal"] is not None,
                                            budget.time_used()], device, world)
            if stopping:
                reason = stop["signal"] or f"--max-minutes {args.max_minutes} used up"
                break
    finally:
        pbar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)

    # ---------------------------------------------------------------- the end: save, grid, plot
    run.read_nans(say)
    if master:
        say(f"=== saving {run.ckpt_path} …")
    run.save()
    if master:
        say(f"=== stopped at step {run.step} ({reason}) after {budget.elapsed() / 60:.1f} min; "
            f"saved {run.ckpt_path} and {run.ema_path}")
        if run.nan_skipped:
            say(f"=== {run.nan_skipped} non-finite steps were skipped")
        if args.sample_every and not stop["signal"]:
            final_grid(run, budget)
        run.runlog.plot(f"{args.run_name}: training loss")
        run.runlog.close()
        say(f"=== logs: {log_folder}/log.csv, loss.png")
    if args.debug_dump_dir:                                   # test hook: each rank's final weights
        Path(args.debug_dump_dir).mkdir(parents=True, exist_ok=True)
        torch.save({"model": {k: v.cpu() for k, v in run.model.state_dict().items()},
                    "ema": {k: v.cpu() for k, v in run.ema.shadow.items()}},
                   Path(args.debug_dump_dir) / f"rank{rank}.pt")


def final_grid(run, budget):
    """The end-of-run grid, sized from the measured speed to cost at most FINAL_GRID_SHARE of the run
    (and to fit in what is left of --max-minutes), or skipped with a message."""
    args = run.args
    run_seconds = min(budget.elapsed(), budget.seconds or math.inf)
    n = plan_final_grid(args.sample_count, args.sample_steps, run.seconds_per_image_step or 0.0, run_seconds)
    if budget.seconds is not None:
        while n >= 4 and grid_seconds(n, args.sample_steps, run.seconds_per_image_step or 0.0) > budget.left():
            n //= 2
        n = n if n >= 4 else 0
    if n == 0:
        print(f"=== no end-of-run grid: {args.sample_count} images × {args.sample_steps} steps would take about "
              f"{grid_seconds(args.sample_count, args.sample_steps, run.seconds_per_image_step or 0):.0f} s, more "
              f"than {FINAL_GRID_SHARE:.0%} of this run; draw one with python generate.py --ckpt {run.ema_path}")
        return
    print(f"=== samples in {run.sample_grid(n)}")


def main(defaults, argv=None, presets=None, description=None):
    """Parse the command line over `defaults` (and `presets`: {name: (values, help)}) and train."""
    args, explicit = parse_args(defaults, argv, presets, description)
    try:
        train(args, explicit)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
