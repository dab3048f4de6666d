"""Compute as a number: FLOPs per image, --max-pflop, and a budget that spans several sittings.

Training FLOPs = 3 × (forward FLOPs per image) × images seen. The run's budget (--max-pflop or
--budget-minutes) is given once; every sitting resumes towards it, so N sittings equal one run.
"""

import argparse
import csv

import pytest
import torch

from plumbing import budget
from plumbing.checkpoint import load_for_sampling
import train_celeba
import train_cifar
import train_mnist
from conftest import run, tensors_equal
from unet import UNet, forward_flops


def test_forward_flops_count_every_convolution_of_a_plain_network():
    """A 3×3 conv of C_in -> C_out on H×W pixels is 2·C_in·C_out·9·H·W FLOPs (a multiply-add is 2)."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.b = torch.nn.Conv2d(16, 3, 3, padding=1)

        def forward(self, x, t):
            return self.b(self.a(x))

    x, t = torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)
    assert forward_flops(Net(), x, t) == 2 * 9 * 64 * (3 * 16 + 16 * 3)       # per image, not per batch


def test_unet_flops_grow_with_pixels_and_draw_no_random_numbers():
    unet = UNet(3, 16, [1, 2], 1, [], 0.1, 16, num_classes=10)
    small = forward_flops(unet, torch.zeros(1, 3, 16, 16), torch.zeros(1, dtype=torch.long),
                          torch.zeros(1, dtype=torch.long))
    state = torch.get_rng_state()
    big_unet = UNet(3, 16, [1, 2], 1, [], 0.1, 32, num_classes=10)
    torch.set_rng_state(state)
    big = forward_flops(big_unet, torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long),
                        torch.zeros(1, dtype=torch.long))
    assert torch.equal(torch.get_rng_state(), state)            # dropout was off: resume stays bit-exact
    assert big > 3.5 * small                                    # convolutions scale with the 4× pixels
    assert big_unet.training                                    # the model's mode is given back


def read_log(folder, name):
    with open(folder / "runs" / name / "log.csv") as f:
        return list(csv.DictReader(f))


def test_max_pflop_stops_the_run_and_counts_flops_in_log_and_checkpoint(data_dir, tmp_path):
    ckpt = run(train_mnist, tmp_path, "--steps", "1000", "--max-pflop", "5e-6")
    full = torch.load(ckpt / "mnist.pt", weights_only=True)
    diffusion, _ = load_for_sampling(ckpt / "mnist_ema.pt", amp=False)         # the FLOPs are the network's own
    one = torch.zeros(1, dtype=torch.long)
    assert full["flops_per_image"] == forward_flops(diffusion.model, torch.zeros(1, 1, 28, 28), one, one) > 0
    per_step = 3 * full["flops_per_image"] * 8                                  # batch 8
    assert full["step"] == -(-5e9 // per_step)                                 # the first step at ≥ 5e-6 PFLOP
    assert full["images_seen"] == 8 * full["step"]
    assert full["train_flops"] == pytest.approx(per_step * full["step"])
    assert torch.load(ckpt / "mnist_ema.pt", weights_only=True)["train_flops"] == full["train_flops"]
    rows = read_log(tmp_path, "mnist")
    assert int(rows[-1]["step"]) == full["step"]
    assert float(rows[-1]["pflop"]) == pytest.approx(full["train_flops"] / 1e15)
    assert int(rows[-1]["images"]) == full["images_seen"]
    assert float(rows[-1]["lr"]) < float(rows[len(rows) // 2]["lr"])           # the decay follows the budget



@pytest.mark.parametrize("flops_per_image, batch, max_pflop, start", [
    (123_457, 8, 5e-6, 0), (1_000, 10, 3e-10, 0), (1_000, 10, 3e-10, 4), (812_345_678, 128, 5.0, 0),
    (812_345_678, 128, 5.0, 7_000)])
def test_the_step_that_reaches_max_pflop_is_the_one_images_until_pflop_names(flops_per_image, batch, max_pflop,
                                                                           start):
    """budget_reached (the loop's stop), progress_now (the lr's progress) and images_until_pflop (the bar's
    end, the projection) hold training FLOPs against the same --max-pflop: the first step at or past it."""
    args = argparse.Namespace(steps=10**12, max_pflop=max_pflop, budget_minutes=None)

    def flops(step):                                     # what Run.train_flops is after `step` steps
        return budget.training_flops(flops_per_image, batch * step)

    last = start + budget.images_until_pflop(max_pflop, flops(start), flops_per_image * batch)
    assert last > start
    assert budget.budget_reached(args, last, flops(last), 0.0) == f"reached --max-pflop {max_pflop:g}"
    assert budget.budget_reached(args, last - 1, flops(last - 1), 0.0) is None
    assert budget.progress_now(args, last, flops(last), 0.0, 0.0, 0.0) == 1.0
    assert budget.progress_now(args, last - 1, flops(last - 1), 0.0, 0.0, 0.0) < 1.0

def test_a_budget_already_spent_trains_no_further(data_dir, tmp_path, capsys):
    ckpt = run(train_mnist, tmp_path, "--steps", "1000", "--max-pflop", "5e-6")
    step = torch.load(ckpt / "mnist.pt", weights_only=True)["step"]
    run(train_mnist, tmp_path, "--resume")
    assert "reached --max-pflop" in capsys.readouterr().out
    assert torch.load(ckpt / "mnist.pt", weights_only=True)["step"] == step


def test_three_sittings_equal_one_run_of_the_same_budget(data_dir, tmp_path):
    """One run to 1e-5 PFLOP, and the same run stopped at steps 3 and 7 and resumed twice: the same
    images seen, the same lr at every step (linear decay over the whole budget), the same weights."""
    common = ["--steps", "1000", "--max-pflop", "1e-5", "--lr-schedule", "linear", "--dropout", "0.1",
              "--class-cond"]
    whole = run(train_mnist, tmp_path / "whole", *common)
    run(train_mnist, tmp_path / "split", *common, "--debug-stop-step", "3")
    run(train_mnist, tmp_path / "split", "--resume", "--debug-stop-step", "7")
    split = run(train_mnist, tmp_path / "split", "--resume")
    a = torch.load(whole / "mnist.pt", weights_only=True)
    b = torch.load(split / "mnist.pt", weights_only=True)
    assert a["step"] > 7 and a["images_seen"] == b["images_seen"]
    for key in ("model", "ema", "optimizer", "rng", "data_state", "step", "train_flops", "progress"):
        tensors_equal(a[key], b[key], key)
    lr_whole = [(r["step"], r["lr"]) for r in read_log(tmp_path / "whole", "mnist")]
    lr_split = [(r["step"], r["lr"]) for r in read_log(tmp_path / "split", "mnist")]
    assert lr_whole == lr_split and float(lr_whole[-1][1]) < float(lr_whole[0][1])


@pytest.mark.parametrize("script", [train_cifar, train_celeba])
def test_the_trainer_projects_the_run_and_names_the_cpu_recipe_before_the_first_step(script, data_dir, tmp_path,
                                                                                     capsys):
    run(script, tmp_path, "--steps", "1", "--max-pflop", "1e-7")
    out = capsys.readouterr().out
    assert "GFLOP per image forward" in out and "PFLOP" in out and " h on cpu at the measured" in out
    assert "the CPU recipe is --cpu" in out
    ckpt = run(script, tmp_path, "--steps", "1", "--cpu", "--overwrite")
    assert "the CPU recipe is" not in capsys.readouterr().out
    config = torch.load(next(ckpt.glob("*_ema.pt")), weights_only=True)["config"]
    recipe = script.PRESETS["cpu"][0]
    assert config["train"]["max_pflop"] == recipe["max_pflop"]           # the preset's budget is the run's
    assert config["diffusion"]["objective"] == recipe["objective"] == "v"


def test_the_projection_of_a_run_that_max_minutes_alone_budgets_is_that_time(data_dir, tmp_path, capsys):
    run(train_mnist, tmp_path, "--steps", "10000000", "--max-minutes", "0.02")
    line = next(x for x in capsys.readouterr().out.splitlines() if "GFLOP per image forward" in x)
    assert " ≈ 0.0 h on cpu" in line, line                # not the 80M images of --steps 10,000,000


class FakeClock:
    """A clock that moves only when the test says so: time.time's stand-in."""

    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def test_progress_bar_follows_the_time_budget_not_the_steps():
    now = FakeClock()
    clock = budget.SittingClock(2.0, t_start=now() - 30, now=now)      # 30 s of a 2-minute budget used
    bar = clock.bar(steps=20_000, step=0, run_name="mnist", disable=False)
    assert bar.total == 120 and bar.unit == "s" and bar.n == 30
    now.t += 1.5
    clock.advance(bar, step=1)
    assert bar.n == 31.5                                                # seconds used, not steps done
    assert clock.time_used() == 31.5 / 120 and clock.left() == 120 - 31.5
    bar.close()
    steps_bar = budget.SittingClock(None, now=now).bar(steps=500, step=10, run_name="m", disable=False)
    assert steps_bar.total == 500 and steps_bar.n == 10
    steps_bar.close()


def test_a_bar_made_after_the_sitting_time_is_spent_still_draws():
    # a busy CPU can spend a short --max-minutes on start-up; tqdm drops a total that n has passed,
    # and its bar_format then fails on the missing percentage
    now = FakeClock()
    clock = budget.SittingClock(0.02, t_start=now() - 5, now=now)      # 5 s used of a 1.2 s budget
    bar = clock.bar(steps=100, step=0, run_name="mnist", disable=False)
    assert bar.total == bar.n == 1.2
    clock.advance(bar, step=1)
    assert "100%" in str(bar)
    bar.close()
