"""What a training run shows and leaves to look at: sample grids from the EMA model (the end-of-run
one sized to the measured speed), proxy-FID evaluations, and <log-dir>/<run>/log.csv, eval.csv,
loss.png and, when the tensorboard package is installed (or --tensorboard), a TensorBoard event log:

    tensorboard --logdir runs          # loss, lr, grad norm, img/s, sample grids, proxy FID
"""

import csv
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from plumbing.images import NonFiniteImages, make_grid, save_grid, to_uint8
from plumbing.sampling import classes_in_turn

FINAL_GRID_SHARE = 0.03        # the end-of-run grid may cost at most this share of the run's time


def grid_seconds(n, steps, seconds_per_image_step):
    """Estimated seconds to sample n images with `steps` network calls each."""
    return n * steps * seconds_per_image_step


def plan_final_grid(sample_count, steps, seconds_per_image_step, run_seconds, seconds_left=math.inf,
                    share=FINAL_GRID_SHARE):
    """How many images the end-of-run grid can have so that it costs at most `share` of the run and
    fits in seconds_left: sample_count if affordable, else half as many, and so on, else 0 (skip).
    seconds_per_image_step: measured cost of one network call per image."""
    budget = min(share * run_seconds, seconds_left)
    n = sample_count
    while n >= 4 and grid_seconds(n, steps, seconds_per_image_step) > budget:
        n //= 2
    return n if n >= 4 else 0


def tensorboard_writer(folder, wanted):
    """A torch.utils.tensorboard SummaryWriter in folder, or None. wanted: True (required: a clear
    error without the package), False (off) or None (on when the package is installed)."""
    if wanted is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if wanted:
            raise SystemExit("error: --tensorboard needs the tensorboard package: pip install tensorboard "
                             "(or run without --tensorboard; log.csv and loss.png are written anyway)") from None
        return None
    return SummaryWriter(log_dir=str(folder))


class RunLog:
    """log.csv (one row per --log-every steps), eval.csv and loss.png under <log-dir>/<run>/."""

    FIELDS = ["step", "loss", "grad_norm", "lr", "img_per_s", "minutes", "images", "pflop", "nan_skipped"]

    def __init__(self, folder, resume_step=None, tensorboard=None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tb = tensorboard_writer(self.folder, tensorboard)
        self.rows = self._read("log.csv", resume_step)
        self.eval_rows = self._read("eval.csv", resume_step)
        self._write("log.csv", self.FIELDS, self.rows)
        if self.eval_rows:
            self._write("eval.csv", list(self.eval_rows[0]), self.eval_rows)
        else:                                # an earlier run's, or rows of steps that were never saved
            (self.folder / "eval.csv").unlink(missing_ok=True)

    def _read(self, name, resume_step):
        """On resume keep the rows up to the checkpoint's step (later ones were never saved)."""
        path = self.folder / name
        if resume_step is None or not path.exists():
            return []
        with open(path, newline="") as f:
            return [r for r in csv.DictReader(f) if int(float(r["step"])) <= resume_step]

    def _write(self, name, fields, rows):
        with open(self.folder / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def log(self, row):
        self.rows.append(row)
        with open(self.folder / "log.csv", "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.FIELDS, extrasaction="ignore").writerow(row)
        self._scalars("train", row)

    def log_eval(self, row):
        self.eval_rows.append(row)
        self._write("eval.csv", list(row), self.eval_rows)
        self._scalars("eval", row)

    def log_grid(self, step, grid):
        """A sample grid, (H, W, C) uint8, into TensorBoard's image tab."""
        if self.tb is not None:
            self.tb.add_image("samples", np.ascontiguousarray(grid), step, dataformats="HWC")
            self.tb.flush()

    def _scalars(self, group, row):
        if self.tb is None:
            return
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(f"{group}/{key}", value, int(row["step"]))
        self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()

    def plot(self, title):
        if not self.rows:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        steps = [int(float(r["step"])) for r in self.rows]
        loss = [float(r["loss"]) for r in self.rows]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss (mean over --log-every steps)")
        k = max(1, len(loss) // 20)                                         # moving average
        if len(loss) > k > 1:
            smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
            ax.plot(steps, smooth, lw=1.5, label=f"moving average of {k}")
        ax.set(xlabel="step", ylabel="training loss (weighted MSE)", yscale="log", title=title)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.folder / "loss.png", dpi=100)
        plt.close(fig)


# ----------------------------------------------------------------------------- grids and evaluations

def draw_grid(ema_diffusion, args, step, runlog, n=None, seconds_per_image_step=None):
    """A grid from a run's EMA model (ema_diffusion, its weights up to date) at `step`, from the same x_T
    every time (comparable grids), into --sample-dir and the run's log; returns its path (None, with a
    line, where the samples are not finite). args: the trainer's flags (sample_count, sample_sampler,
    sample_steps, sample_dir, run_name)."""
    asked = n = n or args.sample_count
    device = ema_diffusion.betas.device
    num_classes, ncol, labels, why = ema_diffusion.num_classes, None, None, ""
    if num_classes:                                     # one column per class, full rows
        ncol = min(num_classes, 16)
        n = math.ceil(n / ncol) * ncol
        labels = classes_in_turn(n, num_classes).to(device)
        why = f"; {asked} rounded up to {n // ncol} full rows of {ncol} classes" if n != asked else ""
    ncol = ncol or max(1, int(math.sqrt(n)))
    about = (f", about {grid_seconds(n, args.sample_steps, seconds_per_image_step):.0f} s"
             if seconds_per_image_step else "")
    tqdm.write(f"step {step}: drawing a {n}-image grid ({args.sample_sampler}, {args.sample_steps} steps"
               f"{about}{why})")
    gen = torch.Generator().manual_seed(1234)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        x = ema_diffusion.sample(n, sampler=args.sample_sampler, steps=args.sample_steps, labels=labels,
                                 generator=gen, progress=True)
    try:
        images = to_uint8(x)
    except NonFiniteImages as e:                        # a grid never ends the run
        tqdm.write(f"step {step}: no grid: {e}")
        return None
    path = Path(args.sample_dir) / f"{args.run_name}_step{step}.png"
    save_grid(images, path, ncol=ncol)
    runlog.log_grid(step, make_grid(images, ncol))
    return path

def evaluate(ema_diffusion, config, args, step, runlog):
    """The proxy FID of a run's EMA model (metrics.proxy_metrics) at `step` into eval.csv; a failure never
    ends the run. args: the trainer's flags (eval_samples, data_dir, ckpt_dir; eval_every is set to 0
    where the metrics cannot be imported)."""
    try:
        from scoring.metrics import proxy_metrics
    except ImportError as e:
        tqdm.write(f"--eval-every: cannot import metrics.py ({e}); evaluation is off for this run")
        args.eval_every = 0
        return
    device = ema_diffusion.betas.device
    tqdm.write(f"step {step}: proxy FID of {args.eval_samples} samples")
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            scores = proxy_metrics(ema_diffusion, config, data_dir=args.data_dir, num_samples=args.eval_samples,
                                   device=device, ckpt_dir=args.ckpt_dir)
    except Exception as e:            # a broken evaluation must not end a long training run
        tqdm.write(f"eval @ step {step} failed ({type(e).__name__}: {e}); training goes on")
        return
    row = {"step": step, **{k: float(v) if isinstance(v, (int, float)) else v for k, v in scores.items()}}
    runlog.log_eval(row)
    tqdm.write(f"eval @ step {step}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                       for k, v in row.items() if k != "step"))


def final_grid(ema_diffusion, args, step, runlog, seconds_per_image_step, clock, ema_path):
    """The end-of-run grid, sized from the measured speed to cost at most FINAL_GRID_SHARE of the run
    and to fit in what is left of --max-minutes (clock: budget.SittingClock), or skipped with a message
    that names the command to draw one from ema_path."""
    per_call = seconds_per_image_step or 0.0
    n = plan_final_grid(args.sample_count, args.sample_steps, per_call, min(clock.elapsed(), clock.seconds or math.inf),
                        seconds_left=clock.left())
    if n == 0:
        print(f"=== no end-of-run grid: {args.sample_count} images × {args.sample_steps} steps would take about "
              f"{grid_seconds(args.sample_count, args.sample_steps, per_call):.0f} s, more than "
              f"{FINAL_GRID_SHARE:.0%} of this run; draw one with python generate.py --ckpt {ema_path}")
        return
    path = draw_grid(ema_diffusion, args, step, runlog, n, seconds_per_image_step)
    if path:
        print(f"=== samples in {path}")
