"""A newcomer's first hour: every bad input gets one clear line before any work, a run says what
it does and where its files went, the README's own commands leave `git status` clean, and the
demo opens on the model that answers fastest. Each test here failed before its fix."""

import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import app
import generate_cifar
import train_mnist
import trainer
from conftest import ROOT, make_checkpoint
from test_train import TINY, run


def refused(argv, capsys):
    """train_mnist.main(argv) must stop at parse/check time with one message; -> that message."""
    with pytest.raises(SystemExit) as e:
        train_mnist.main(argv)
    captured = capsys.readouterr()
    return (str(e.value) if e.value.code not in (0, 2) else "") + captured.err


# ----------------------------------------------------------------------------- flags, at parse time

@pytest.mark.parametrize("flag, value, allowed", [
    ("--batch-size", "0", "≥ 1"), ("--batch-size", "-1", "≥ 1"), ("--steps", "0", "≥ 1"),
    ("--lr", "0", "> 0"), ("--lr", "nan", "> 0"), ("--warmup-steps", "-5", "≥ 0"),
    ("--ema-decay", "1", "[0, 1)"), ("--ema-decay", "1.5", "[0, 1)"), ("--dropout", "1", "[0, 1)"),
    ("--cond-drop-prob", "-0.1", "[0, 1)"), ("--timesteps", "1", "≥ 2"), ("--image-size", "0", "≥ 1"),
    ("--base-channels", "0", "≥ 1"), ("--grad-clip", "0", "> 0"), ("--max-minutes", "0", "> 0"),
    ("--log-every", "0", "≥ 1"), ("--sample-count", "0", "≥ 1"), ("--channel-mults", "1,0", "≥ 1"),
    ("--num-workers", "-1", "≥ 0"), ("--max-nan-steps", "0", "≥ 1"),
])
def test_every_numeric_flag_is_checked_at_parse_time_in_one_line(flag, value, allowed, capsys):
    message = refused([flag, value], capsys)
    line = [m for m in message.splitlines() if flag in m]
    assert line and allowed in line[-1], message


def test_conflicting_settings_are_refused_before_any_data_or_file(tmp_path, capsys):
    message = refused(["--timesteps", "50", "--ckpt-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "runs")],
                      capsys)
    assert "--sample-steps 100" in message and "--timesteps 50" in message and "T = 50" in message
    assert not (tmp_path / "ck").exists() and not (tmp_path / "runs").exists()
    message = refused(["--image-size", "30", "--channel-mults", "1,2,4", "--ckpt-dir", str(tmp_path / "ck")], capsys)
    assert "--image-size 30" in message and "divisible by 4" in message


def test_resume_uses_the_ema_flags_it_prints(data_dir, tmp_path, capsys):
    ckpt_dir = run(train_mnist, tmp_path, "--steps", "1", "--ema-decay", "0.999", "--ema-warmup")
    first = torch.load(ckpt_dir / "mnist.pt", weights_only=True)
    assert set(first["ema"]) == {"shadow", "num_updates"}            # only what changes
    run(train_mnist, tmp_path, "--steps", "2", "--resume", "--ema-decay", "0.5", "--no-ema-warmup")
    assert "--ema-decay changes from 0.999 to 0.5" in capsys.readouterr().out
    second = torch.load(ckpt_dir / "mnist.pt", weights_only=True)
    assert second["config"]["train"]["ema_decay"] == 0.5 and second["config"]["train"]["ema_warmup"] is False
    name = "conv_in.weight"                                          # θ_ema ← 0.5·θ_ema + 0.5·θ, no warmup
    expected = 0.5 * first["ema"]["shadow"][name] + 0.5 * second["model"][name]
    assert torch.allclose(second["ema"]["shadow"][name], expected, atol=1e-6)


# ----------------------------------------------------------------------------- a run that talks

def test_first_log_row_is_step_one_and_the_run_says_where_its_files_go(data_dir, tmp_path, capsys):
    ckpt_dir = run(train_mnist, tmp_path, "--steps", "3", "--log-every", "50")
    out = capsys.readouterr().out
    rows = (tmp_path / "runs" / "mnist" / "log.csv").read_text().splitlines()
    assert rows[1].startswith("1,") and rows[-1].startswith("3,")
    assert f"logs in {tmp_path / 'runs' / 'mnist'}" in out and str(ckpt_dir / "mnist.pt") in out


def test_tensorboard_events_hold_scalars_and_grids(data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run(train_mnist, tmp_path, "--steps", "2", "--tensorboard", "--sample-every", "1", "--sample-count", "4",
        "--sample-steps", "2")
    events = EventAccumulator(str(tmp_path / "runs" / "mnist"))
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/img_per_s"} <= set(tags["scalars"])
    assert "samples" in tags["images"]


def test_second_signal_is_left_to_the_system(data_dir, tmp_path, monkeypatch):
    from diffusion import GaussianDiffusion
    seen = []
    loss = GaussianDiffusion.loss

    def loss_then_sigterm(self, *args, **kwargs):
        if not seen:
            signal.raise_signal(signal.SIGTERM)
            seen.append(signal.getsignal(signal.SIGTERM))      # what a second SIGTERM would meet
            seen.append(signal.getsignal(signal.SIGINT))
        return loss(self, *args, **kwargs)

    monkeypatch.setattr(GaussianDiffusion, "loss", loss_then_sigterm)
    run(train_mnist, tmp_path, "--steps", "5")
    assert seen == [signal.SIG_DFL, signal.SIG_DFL]     # ends the process at once, even inside a C call


def test_progress_bar_follows_the_time_budget_not_the_steps():
    import time
    budget = trainer.Budget(2.0, t_start=time.time() - 30)             # 30 s of a 2-minute budget used
    bar = budget.bar(steps=20_000, step=0, run_name="mnist", disable=False)
    assert bar.total == 120 and bar.unit == "s" and 29 <= bar.n <= 31
    budget.advance(bar, step=1)
    assert 30 <= bar.n <= 32                                            # seconds used, not steps done
    bar.close()
    steps_bar = trainer.Budget(None, time.time()).bar(steps=500, step=10, run_name="m", disable=False)
    assert steps_bar.total == 500 and steps_bar.n == 10
    steps_bar.close()


def test_end_of_run_grid_is_sized_from_the_measured_speed():
    # 1 ms per image and network call, 100 steps: 64 images cost 6.4 s.
    assert trainer.plan_final_grid(64, 100, 1e-3, run_seconds=900) == 64          # 6.4 s ≤ 3% of 15 min
    assert trainer.plan_final_grid(64, 100, 1e-3, run_seconds=120) == 32          # 3% of 2 min = 3.6 s
    assert trainer.plan_final_grid(64, 100, 1e-3, run_seconds=10) == 0            # skipped, with a message
    assert trainer.grid_seconds(32, 100, 1e-3) <= 0.03 * 120


def test_max_minutes_covers_the_end_of_the_run(data_dir, tmp_path, capsys):
    run(train_mnist, tmp_path, "--steps", "100000", "--max-minutes", "0.05", "--sample-every", "1000",
        "--sample-steps", "50")
    out = capsys.readouterr().out
    assert "no end-of-run grid" in out or "samples in" in out
    match = re.search(r"after ([0-9.]+) min", out)
    assert match and float(match.group(1)) <= 0.05 + 0.02


# ----------------------------------------------------------------------------- README, help, demo

def test_readme_figures_live_where_no_command_writes():
    readme = (ROOT / "README.md").read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert figures and all(not f.startswith("samples/") for f in figures), figures
    ignored = subprocess.run(["git", "check-ignore", "-q", "samples/mnist_step500.png"], cwd=ROOT).returncode
    assert ignored == 0, "samples/ outputs would show up in git status"


def test_help_shows_each_default_once_and_lists_as_typed(capsys):
    with pytest.raises(SystemExit):
        train_mnist.main(["--help"])
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "(default: None)" not in text and not re.search(r"default:[^()]*\)\s*\(default:", text)
    assert "(default: $DDPM_DATA, else ./data)" in text
    assert "(default: 1,2,4)" in text and "[1, 2, 4]" not in text


def test_generate_cifar_help_names_the_grid_it_writes(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        generate_cifar.main(["--help"])
    assert generate_cifar.GRID in re.sub(r"\s+", "", capsys.readouterr().out)
    ckpt = tiny_checkpoint(num_classes=3, class_names=["a", "b", "c"], channels=3, dataset="cifar10")
    monkeypatch.chdir(tmp_path)
    generate_cifar.main(["--ckpt", str(ckpt), "--n", "6", "--sampler", "ddim", "--steps", "2", "--device", "cpu"])
    assert (tmp_path / "samples" / "cifar10_grid_ddim2.png").exists()


def test_demo_opens_on_the_fastest_model_and_shows_each_estimate(tmp_path):
    make_checkpoint(tmp_path / "a_big_ema.pt", timesteps=20, image_size=32, channels=3)
    make_checkpoint(tmp_path / "z_small_ema.pt", timesteps=20, image_size=8)
    infos, _ = app.describe_checkpoints(app.discover_checkpoints(tmp_path))
    demo_app = app.App(infos, "cpu")
    choices = demo_app.model_choices()
    assert [name for _, name in choices] == ["z_small_ema", "a_big_ema"]
    assert all(re.search(r"≈ [0-9.]+ s", label) for label, _ in choices)


def test_demo_estimate_is_calibrated_by_the_last_real_run(tmp_path):
    make_checkpoint(tmp_path / "m_ema.pt", timesteps=20, image_size=8)
    infos, _ = app.describe_checkpoints(app.discover_checkpoints(tmp_path))
    demo_app = app.App(infos, "cpu")
    before = demo_app.estimate("m_ema", "DDIM", 10, 4, None, 0)
    assert "calibrated after the first run" in before
    seconds_before = demo_app.estimate_seconds(infos["m_ema"], 10, 4, 0)[0]
    demo_app.calibrate(infos["m_ema"], 10, 4, 0, seconds=3 * seconds_before)        # the run took 3× longer
    assert math.isclose(demo_app.estimate_seconds(infos["m_ema"], 10, 4, 0)[0], 3 * seconds_before, rel_tol=1e-6)
    assert "calibrated on the last run" in demo_app.estimate("m_ema", "DDIM", 10, 4, None, 0)


def test_readme_setup_states_the_offline_case_and_the_cpu_wheel():
    readme = (ROOT / "README.md").read_text()
    setup = readme[readme.index("## Setup"):readme.index("## ", readme.index("## Setup") + 3)]
    assert "DDPM_DATA" in setup and "whl/cpu" in setup


def test_data_tests_say_in_the_summary_why_they_skipped_and_fail_on_a_wrong_ddpm_data(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "tests" / "test_needs_data.py").write_text("def test_real(data_dir):\n    assert data_dir\n")
    env = {k: v for k, v in os.environ.items() if k != "DDPM_DATA"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120).stdout
    assert "real-data tests skipped: no mnist_train.npz" in out and "DDPM_DATA" in out and "1 skipped" in out
    wrong = subprocess.run(cmd, cwd=tmp_path, env={**env, "DDPM_DATA": str(tmp_path / "nowhere")},
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode != 0 and "holds no mnist_train.npz" in wrong.stdout


def test_resuming_a_checkpoint_from_before_an_option_keeps_it_as_it_was():
    import torch

    import train_args
    args, explicit = train_args.parse_args(train_mnist.DEFAULTS, ["--resume"])
    assert args.loss_weighting == "min_snr" and args.clip_denoised is False    # today's MNIST defaults
    newer = ("loss_weighting", "min_snr_gamma", "clip_denoised")
    old = {"config": {"train": {k: v for k, v in vars(args).items() if k not in newer}}}
    train_args.resolve_resume(args, explicit, old, "old.pt", say=lambda *a: None)
    assert args.loss_weighting == "simple" and args.clip_denoised is True      # as that checkpoint was made
    config = train_args.make_config(args, torch.zeros(1, 1, 28, 28), None, None)
    assert config["diffusion"]["clip_denoised"] is True                         # what generate.py will use
