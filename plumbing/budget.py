"""A run's budget and where it stands: the sitting's clock (--max-minutes), the learning rate over
the run's progress (--lr-schedule), and before the first step the run's size and projected time.

A run's budget is --steps, --max-pflop (training FLOPs = 3 × forward FLOPs per image × images seen:
training_flops) or --budget-minutes, whichever ends it first, over all its sittings; --max-minutes
ends a sitting. The functions take plain values (the flags, the step, the FLOPs), not the run.
"""

import copy
import math
import time

import torch
from tqdm.auto import tqdm

from plumbing.device import synchronize

CALLS_PER_TRAINING_IMAGE = 3     # forward + backward ≈ 3 forward passes (the backward costs about two)


def training_flops(flops_per_image, images):
    """FLOPs of training on `images` images: 3 × the forward FLOPs per image (forward + backward)."""
    return CALLS_PER_TRAINING_IMAGE * flops_per_image * images


def pflop_to_flop(pflop):
    """--max-pflop in FLOPs (1 PFLOP = 10¹⁵ FLOPs): what training_flops is held against."""
    return 1e15 * pflop


def images_until_pflop(max_pflop, train_flops, flops_per_image):
    """Images still to train before --max-pflop is reached (the first step at or past it included)."""
    return math.ceil((pflop_to_flop(max_pflop) - train_flops) / training_flops(flops_per_image, 1))


class SittingClock:
    """--max-minutes as a deadline for this sitting (start-up and the end included), and the
    progress bar's total: seconds of the budget when there is one, else steps. now: the clock
    (time.time; tests pass a fake one)."""

    def __init__(self, max_minutes, t_start=None, now=time.time):
        self.seconds = None if max_minutes is None else 60.0 * max_minutes
        self.now = now
        self.t_start = now() if t_start is None else t_start

    def elapsed(self):
        return self.now() - self.t_start

    def left(self):
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def time_used(self):
        """The share of --max-minutes used so far, in [0, 1]; 0 without a budget."""
        return 0.0 if self.seconds is None else min(1.0, self.elapsed() / self.seconds)

    def bar(self, steps, step, run_name, disable):
        if self.seconds is None:
            return tqdm(total=steps, initial=step, disable=disable, dynamic_ncols=True, desc=run_name)
        # n never past the total: tqdm would drop the total, and its bar_format with it
        return tqdm(total=self.seconds, initial=min(self.seconds, self.elapsed()), unit="s", disable=disable,
                    dynamic_ncols=True, desc=f"{run_name} (--max-minutes)",
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]")

    def advance(self, pbar, step):
        """Move the bar one step, or to the seconds used so far."""
        if self.seconds is None:
            pbar.update(1)
        else:
            pbar.update(min(self.seconds, self.elapsed()) - pbar.n)


def progress_now(args, step, train_flops, train_seconds, progress_before, time_used):
    """The share of a run's budget used, in [0, 1]: the largest of step/--steps, --max-pflop
    and --budget-minutes used. Without either of those two, --max-minutes is the run's budget
    (a resumed run goes on from progress_before and reaches 1 at this sitting's end)."""
    shares = [step / args.steps]
    if args.max_pflop:
        shares.append(train_flops / pflop_to_flop(args.max_pflop))
    if args.budget_minutes:
        shares.append(train_seconds / (60 * args.budget_minutes))
    if not (args.max_pflop or args.budget_minutes):
        shares.append(progress_before + (1 - progress_before) * time_used)
    return min(1.0, max(shares))


def budget_reached(args, step, train_flops, train_seconds):
    """Why the run's budget is spent (a line for the log), or None."""
    if step >= args.steps:
        return f"reached --steps {args.steps}"
    if args.max_pflop and train_flops >= pflop_to_flop(args.max_pflop):
        return f"reached --max-pflop {args.max_pflop:g}"
    if args.budget_minutes and train_seconds >= 60 * args.budget_minutes:
        return f"reached --budget-minutes {args.budget_minutes:g}"
    return None


def learning_rate(args, step, progress):
    """Peak --lr after a linear warmup of --warmup-steps, times --lr-schedule at progress ∈ [0, 1]:
    constant (DDPM), linear to 0 (the best schedule for a fixed budget in Li et al. 2020,
    "Budgeted training") or cosine to 0 (Loshchilov & Hutter 2017)."""
    warmup = min(1.0, (step + 1) / max(1, args.warmup_steps))
    decay = {"constant": 1.0, "linear": 1.0 - progress,
             "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}[args.lr_schedule]
    return args.lr * warmup * decay


def probe_inputs(config, device, n=1):
    """(x_t, t, labels) of n blank images shaped as config's model takes them: to count or time it."""
    m = config["model"]
    x = torch.zeros(n, m["in_channels"], m["image_size"], m["image_size"], device=device)
    t = torch.zeros(n, dtype=torch.long, device=device)
    return x, t, (t if m["num_classes"] else None)


def seconds_per_training_image(model, config, device, amp, n=8):
    """One training step's seconds per image on this device, measured on a copy of the model (the
    second of two steps of n blank images), so the run's weights and random streams stay untouched.
    amp: the run's autocast context."""
    model = copy.deepcopy(model).train()
    x, t, labels = probe_inputs(config, device, n)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for _ in range(2):
            synchronize(device)
            t0 = time.perf_counter()
            with amp:
                out = model(x, t, labels)
            out.float().square().mean().backward()
            synchronize(device)
            seconds = time.perf_counter() - t0
    return seconds / n


def project(args, *, step, train_flops, train_seconds, flops_per_image, per_image, device, say, cpu_recipe=None):
    """Before the first step: what is left of the configured run (images, PFLOP) and its projected
    time at per_image seconds per training image; on a CPU, the CPU recipe when one exists and is off.
    Returns the images left."""
    images = (args.steps - step) * args.batch_size
    if args.max_pflop:
        images = min(images, images_until_pflop(args.max_pflop, train_flops, flops_per_image))
    if args.budget_minutes:
        images = min(images, math.ceil((60 * args.budget_minutes - train_seconds) / per_image))
    elif args.max_minutes and not args.max_pflop:           # --max-minutes alone: this sitting is the run
        images = min(images, math.ceil(60 * args.max_minutes / per_image))
    seconds = images * per_image
    pflop = training_flops(flops_per_image, images) / 1e15
    sitting = f"; this sitting stops after --max-minutes {args.max_minutes:g}" if args.max_minutes else ""
    say(f"=== {flops_per_image / 1e9:.2f} GFLOP per image forward; the run "
        f"{'has left' if step else 'is'} {images:,} images ≈ {pflop:.3g} PFLOP ≈ "
        f"{seconds / 3600:.1f} h on {device} at the measured {1 / per_image:.0f} img/s{sitting}")
    if device.type == "cpu" and cpu_recipe:
        say(f"=== on a CPU: the CPU recipe is {cpu_recipe}")
    return images
