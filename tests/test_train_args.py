"""train_args.py: every bad flag gets one clear line before any work, conflicting settings are
refused before any data or file, --help shows each default once, and --resume of an older
checkpoint keeps the settings it was made with."""

import re

import pytest
import torch

from plumbing import checkpoint
from plumbing import train_args
import train_mnist
from diffusion import DEFAULT_STEPS


def refused(argv, capsys):
    """train_mnist.main(argv) must stop at parse/check time with one message; -> that message."""
    with pytest.raises(SystemExit) as e:
        train_mnist.main(argv)
    captured = capsys.readouterr()
    return (str(e.value) if e.value.code not in (0, 2) else "") + captured.err


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
    T = DEFAULT_STEPS - 10                                   # fewer steps than the grids' default sampler takes
    message = refused(["--timesteps", str(T), "--ckpt-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "runs")],
                      capsys)
    assert f"--sample-steps {DEFAULT_STEPS}" in message and f"--timesteps {T}" in message and f"T = {T}" in message
    assert not (tmp_path / "ck").exists() and not (tmp_path / "runs").exists()
    message = refused(["--image-size", "30", "--channel-mults", "1,2,4", "--ckpt-dir", str(tmp_path / "ck")], capsys)
    assert "--image-size 30" in message and "divisible by 4" in message


def test_help_shows_each_default_once_and_lists_as_typed(capsys):
    with pytest.raises(SystemExit):
        train_mnist.main(["--help"])
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "(default: None)" not in text and not re.search(r"default:[^()]*\)\s*\(default:", text)
    assert "(default: $DDPM_DATA, else ./data)" in text
    assert "(default: 1,2,4)" in text and "[1, 2, 4]" not in text


def test_resuming_a_checkpoint_from_before_an_option_keeps_it_as_it_was():
    args, explicit = train_args.parse_args(train_mnist.DEFAULTS, ["--resume"])
    assert args.loss_weighting == "min_snr" and args.clip_denoised is False    # today's MNIST defaults
    newer = ("loss_weighting", "min_snr_gamma", "clip_denoised")
    old = {"config": {"train": {k: v for k, v in vars(args).items() if k not in newer}}}
    train_args.resolve_resume(args, explicit, old, "old.pt", say=lambda *a: None)
    assert args.loss_weighting == "simple" and args.clip_denoised is True      # as that checkpoint was made
    config = checkpoint.make_config(args, torch.zeros(1, 1, 28, 28), None, None)
    assert config["diffusion"]["clip_denoised"] is True                         # what generate.py will use


@pytest.mark.parametrize("flags, keeps", [
    (["--schedule", "linear", "--timesteps", "100"], "√ᾱ_T = 0.6, so x_T keeps 60% of the image"),
    (["--schedule", "linear", "--timesteps", "20"], "√ᾱ_T = 0.9, so x_T keeps 90% of the image"),
    (["--schedule", "linear", "--timesteps", "1000"], None),        # DDPM's own T: √ᾱ_T = 0.006
    (["--schedule", "cosine", "--timesteps", "100"], None),         # defined for any T
])
def test_a_linear_schedule_at_another_T_than_1000_is_noted(flags, keeps):
    """DDPM's β (1e-4 … 0.02) were set for T = 1000: at T = 100, q(x_T) is far from the N(0, I) that
    sampling starts from. The trainer says so before the first step."""
    args, _ = train_args.parse_args({}, flags)
    note = train_args.schedule_note(args)
    assert (note is None) if keeps is None else (keeps in note and "--schedule cosine" in note)
