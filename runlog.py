"""What a training run shows and leaves to look at: the progress bar on --max-minutes' clock, the
size of the end-of-run grid, and <log-dir>/<run>/log.csv, eval.csv, loss.png and, when
the tensorboard package is installed (or --tensorboard), a TensorBoard event log beside them:

    tensorboard --logdir runs          # loss, lr, grad norm, img/s, sample grids, proxy FID
"""

import csv
import math
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

FINAL_GRID_SHARE = 0.03        # the end-of-run grid may cost at most this share of the run's time


def grid_seconds(n, steps, seconds_per_image_step):
    """Estimated seconds to sample n images with `steps` network calls each."""
    return n * steps * seconds_per_image_step


def plan_final_grid(sample_count, steps, seconds_per_image_step, run_seconds, share=FINAL_GRID_SHARE):
    """How many images the end-of-run grid can have so that it costs at most `share` of the run:
    sample_count if affordable, else fewer (whole rows of a square-ish grid), else 0 (skip).
    seconds_per_image_step: measured cost of one network call per image."""
    budget = share * run_seconds
    n = sample_count
    while n >= 4 and grid_seconds(n, steps, seconds_per_image_step) > budget:
        n //= 2
    return n if n >= 4 else 0


class Budget:
    """--max-minutes as a deadline for the whole run (start-up and the end included), and the
    progress bar's total: seconds of the budget when there is one, else steps."""

    def __init__(self, max_minutes, t_start):
        self.seconds = None if max_minutes is None else 60.0 * max_minutes
        self.t_start = t_start

    def elapsed(self):
        return time.time() - self.t_start

    def left(self):
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def time_used(self):
        """The share of --max-minutes used so far, in [0, 1]; 0 without a budget."""
        return 0.0 if self.seconds is None else min(1.0, self.elapsed() / self.seconds)

    def bar(self, steps, step, run_name, disable):
        if self.seconds is None:
            return tqdm(total=steps, initial=step, disable=disable, dynamic_ncols=True, desc=run_name)
        return tqdm(total=round(self.seconds), initial=round(self.elapsed()), unit="s", disable=disable,
                    dynamic_ncols=True, desc=f"{run_name} (--max-minutes)",
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]")

    def advance(self, pbar, step):
        """Move the bar one step, or to the seconds used so far."""
        if self.seconds is None:
            pbar.update(1)
        else:
            pbar.update(min(self.seconds, self.elapsed()) - pbar.n)


def tensorboard_writer(folder, wanted):
    """A torch.utils.tensorboard SummaryWriter in folder, or None. wanted: True (required: a clear
    error without the package), False (off) or None (on when the package is installed)."""
    if wanted is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if wanted:
            raise SystemExit("--tensorboard needs the tensorboard package: pip install tensorboard "
                             "(or run without --tensorboard; log.csv and loss.png are written anyway)") from None
        return None
    return SummaryWriter(log_dir=str(folder))


class RunLog:
    """log.csv (one row per --log-every steps), eval.csv and loss.png under <log-dir>/<run>/."""

    FIELDS = ["step", "loss", "grad_norm", "lr", "img_per_s", "minutes", "nan_skipped"]

    def __init__(self, folder, resume_step=None, tensorboard=None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tb = tensorboard_writer(self.folder, tensorboard)
        self.rows = self._read("log.csv", resume_step)
        self.eval_rows = self._read("eval.csv", resume_step)
        self._write("log.csv", self.FIELDS, self.rows)
        if self.eval_rows:
            self._write("eval.csv", list(self.eval_rows[0]), self.eval_rows)

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
        ax.set(xlabel="step", ylabel="L_simple (MSE)", yscale="log", title=title)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.folder / "loss.png", dpi=100)
        plt.close(fig)
