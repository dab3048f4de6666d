"""The training loop: checkpoints any script can rebuild, bit-exact resume, NaN steps, DDP, signals,
--max-minutes.

Every run is a tiny model (conftest.TINY: base 8, two levels, T = 50) for a few steps on a slice of
the real data.
"""

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from plumbing import budget
import train_celeba
import train_cifar
import train_mnist
import trainer
from plumbing.checkpoint import load_for_sampling
from conftest import ROOT, TINY, run, tensors_equal


@pytest.mark.parametrize("script, name, extra, size, channels", [
    (train_mnist, "mnist", ["--class-cond"], 28, 1),
    (train_cifar, "cifar10", ["--attn-resolutions", "16", "--dropout", "0.1"], 32, 3),
    (train_celeba, "celeba", ["--image-size", "32"], 32, 3),
])
def test_each_trainer_writes_a_checkpoint_that_rebuilds_from_its_config(
        script, name, extra, size, channels, data_dir, tmp_path):
    ckpt_dir = run(script, tmp_path, "--steps", "2", "--sample-every", "1", "--sample-count", "4",
                   "--sample-steps", "2", *extra)
    full = torch.load(ckpt_dir / f"{name}.pt", weights_only=True)        # no pickled code anywhere
    assert full["step"] == 2 and {"model", "ema", "optimizer", "rng", "data_state", "config"} <= set(full)
    assert torch.load(ckpt_dir / f"{name}_ema.pt", weights_only=True)["step"] == 2
    diffusion, config = load_for_sampling(ckpt_dir / f"{name}_ema.pt")
    assert config["diffusion"]["image_size"] == size and config["diffusion"]["channels"] == channels
    assert config["data"]["image_size"] == size and config["dataset"] == config["data"]["name"]
    labels = None
    if "--class-cond" in extra:
        assert config["data"]["class_names"] == [str(d) for d in range(10)] and config["model"]["num_classes"] == 10
        labels = torch.tensor([3, 7])
    x = diffusion.sample(2, sampler="ddim", steps=2, labels=labels, progress=False)
    assert x.shape == (2, channels, size, size) and torch.isfinite(x).all()
    assert (tmp_path / "samples" / f"{name}_step1.png").exists()        # the periodic grid
    assert (tmp_path / "runs" / name / "log.csv").read_text().count("\n") == 3      # header + 2 steps
    assert (tmp_path / "runs" / name / "loss.png").exists()


def test_resume_continues_bit_for_bit(data_dir, tmp_path):
    """4 steps in one go equal 2 steps, a stop, and --resume to step 4: weights, EMA, optimiser, RNG."""
    common = ["--dropout", "0.1", "--class-cond",                      # dropout and label drops use the RNG too
              "--lr-schedule", "constant"]                            # (a decay would end at --steps 2)
    whole = run(train_mnist, tmp_path / "whole", "--steps", "4", *common)
    split = run(train_mnist, tmp_path / "split", "--steps", "2", *common)
    run(train_mnist, tmp_path / "split", "--steps", "4", "--resume")   # settings come from the checkpoint
    a = torch.load(whole / "mnist.pt", weights_only=True)
    b = torch.load(split / "mnist.pt", weights_only=True)
    for key in ("model", "ema", "optimizer", "step", "rng", "data_state", "nan_skipped"):
        tensors_equal(a[key], b[key], key)
    rows = (tmp_path / "split" / "runs" / "mnist" / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]


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


def lrs(folder, name="mnist"):
    rows = (folder / "runs" / name / "log.csv").read_text().splitlines()
    column = rows[0].split(",").index("lr")
    return [float(r.split(",")[column]) for r in rows[1:]]


def test_lr_schedule_decays_over_the_steps_and_a_resume_goes_on_from_where_it_stood(data_dir, tmp_path):
    """Warmup 2, then linear decay to 0: step s (from 0) gets lr·min(1, (s+1)/2)·(1 − s/steps).
    Resumed with a larger --steps, the decay does not jump back up: progress is the larger of
    step/steps and the progress the checkpoint stored."""
    run(train_mnist, tmp_path, "--steps", "4", "--lr", "1e-3", "--lr-schedule", "linear")
    assert lrs(tmp_path) == pytest.approx([1e-3 * 0.5, 1e-3 * 0.75, 1e-3 * 0.5, 1e-3 * 0.25])
    assert torch.load(tmp_path / "ckpt" / "mnist.pt", weights_only=True)["progress"] == 0.75
    run(train_mnist, tmp_path, "--steps", "8", "--resume")
    assert lrs(tmp_path)[4:] == pytest.approx([2.5e-4, 2.5e-4, 2.5e-4, 1e-3 * (1 - 7 / 8)])


@pytest.mark.parametrize("schedule, progress, factor", [
    ("constant", 0.7, 1.0), ("linear", 0.25, 0.75), ("cosine", 0.5, 0.5), ("cosine", 1.0, 0.0)])
def test_learning_rate_schedules(schedule, progress, factor):
    args, _ = trainer.parse_args(train_mnist.DEFAULTS, ["--lr", "2e-3", "--warmup-steps", "10", "--lr-schedule", schedule])
    assert budget.learning_rate(args, 99, progress) == pytest.approx(2e-3 * factor, abs=1e-12)
    assert budget.learning_rate(args, 4, progress) == pytest.approx(2e-3 * factor * 0.5, abs=1e-12)   # warmup


def test_a_nan_loss_skips_the_step_and_leaves_the_weights_finite(data_dir, tmp_path):
    """A NaN at step 2 leaves model, EMA and optimiser exactly as they were after step 1."""
    one = run(train_mnist, tmp_path / "one", "--steps", "1")
    nan = run(train_mnist, tmp_path / "nan", "--steps", "2", "--debug-nan-steps", "2")
    a = torch.load(one / "mnist.pt", weights_only=True)
    b = torch.load(nan / "mnist.pt", weights_only=True)
    assert b["nan_skipped"] == 1 and b["step"] == 2
    for key in ("model", "ema"):
        tensors_equal(a[key], b[key], key)
    tensors_equal(a["optimizer"]["state"], b["optimizer"]["state"], "Adam moments")   # (the lr warms up)
    assert all(torch.isfinite(v).all() for v in b["model"].values())


def test_nan_steps_in_a_row_abort_without_writing(data_dir, tmp_path):
    with pytest.raises(SystemExit, match="2 non-finite steps in a row"):
        run(train_mnist, tmp_path, "--steps", "5", "--debug-nan-steps", "1,2", "--max-nan-steps", "2")
    assert not (tmp_path / "ckpt" / "mnist.pt").exists()


def test_an_existing_checkpoint_needs_resume_or_overwrite(data_dir, tmp_path):
    run(train_mnist, tmp_path, "--steps", "1")
    with pytest.raises(SystemExit, match="--resume"):
        run(train_mnist, tmp_path, "--steps", "1")
    with pytest.raises(SystemExit, match="cannot change"):
        run(train_mnist, tmp_path, "--steps", "2", "--resume", "--base-channels", "16")


def test_presets_and_flags_override_script_defaults():
    args, explicit = trainer.parse_args(train_cifar.DEFAULTS, ["--small", "--lr", "3e-4"], train_cifar.PRESETS)
    assert args.base_channels == 64 and args.channel_mults == [1, 2, 2] and args.lr == 3e-4
    assert explicit == {"small", "lr"} and args.run_name == "cifar10"
    args, _ = trainer.parse_args(train_cifar.DEFAULTS, [], train_cifar.PRESETS)
    assert (args.base_channels, args.channel_mults, args.attn_resolutions, args.ema_decay) == (128, [1, 2, 2, 2], [16], 0.9999)
    args, _ = trainer.parse_args(train_celeba.DEFAULTS, ["--attn-resolutions", "none"])
    assert args.attn_resolutions == [] and args.run_name == "celeba"


@pytest.mark.slow                                   # two processes that each start up and load MNIST
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_torchrun_two_processes_keep_identical_replicas_and_write_once(data_dir, tmp_path):
    cmd = ["torchrun", "--nproc_per_node=2", "--standalone", "train_mnist.py", *TINY, "--steps", "3",
           "--save-every", "2", "--ckpt-dir", str(tmp_path / "ckpt"), "--sample-dir", str(tmp_path / "samples"),
           "--log-dir", str(tmp_path / "runs"), "--debug-dump-dir", str(tmp_path / "dump")]
    env = {**os.environ, "DDPM_DATA": str(data_dir)}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "× 2 processes (DDP)" in result.stdout
    assert "Grad strides do not match" not in result.stderr     # the 1×1 convolutions' stride note, silenced
    r0, r1 = (torch.load(tmp_path / "dump" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    tensors_equal(r0, r1, "rank0 vs rank1")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["mnist.lock", "mnist.pt", "mnist_ema.pt"]   # rank 0 only
    assert (tmp_path / "ckpt" / "mnist.lock").read_text() == ""                                # released
    ckpt = torch.load(tmp_path / "ckpt" / "mnist.pt", weights_only=True)
    assert ckpt["step"] == 3 and len(ckpt["rng_ranks"]) == 2
    tensors_equal(ckpt["model"], r0["model"], "saved vs rank0")


# Run under torchrun: a sitting with the garbage collector off (so that the library reference cycles that
# keep a finished sitting's frames alive stay), and at the moment the process group is destroyed, the
# count of DDP wrappers still alive and when; rank 1 ends its sitting 3 s late and says when.
_LEAVE_PROBE = """
import gc, os, sys, time
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
import trainer, train_mnist
rank = int(os.environ["RANK"])
finish, destroy = trainer.finish, dist.destroy_process_group
def late_finish(run, *args, **kwargs):
    finish(run, *args, **kwargs)
    if rank == 1:
        time.sleep(3.0)
        print(f"rank 1: sitting ended at {time.time():.3f}", flush=True)
def probed_destroy(*args, **kwargs):
    alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    print(f"rank {rank}: {alive} DDP alive, left at {time.time():.3f}", flush=True)
    destroy(*args, **kwargs)
trainer.finish, dist.destroy_process_group = late_finish, probed_destroy
gc.disable()
train_mnist.main(sys.argv[1:])
"""


@pytest.mark.slow                                   # two processes that each start up and load MNIST
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_torchrun_ranks_leave_together_with_the_ddp_wrapper_freed_first(data_dir, tmp_path):
    """The end of a DDP run (device.leave_distributed): no rank tears the process group down while the
    other is still in its sitting, nor with the DDP wrapper (which holds the group) still alive, which
    would leave it to the interpreter's exit, where gloo's threads can abort the process (a CI run
    ended in SIGABRT after both ranks had finished)."""
    probe = tmp_path / "probe.py"
    probe.write_text(_LEAVE_PROBE)
    cmd = ["torchrun", "--nproc_per_node=2", "--standalone", str(probe), *TINY, "--steps", "2",
           "--ckpt-dir", str(tmp_path / "ckpt"), "--sample-dir", str(tmp_path / "samples"),
           "--log-dir", str(tmp_path / "runs")]
    env = {**os.environ, "DDPM_DATA": str(data_dir), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    left = dict(re.findall(r"rank (\d): 0 DDP alive, left at ([\d.]+)", result.stdout))
    assert sorted(left) == ["0", "1"], result.stdout[-2000:]
    ended = float(re.search(r"rank 1: sitting ended at ([\d.]+)", result.stdout).group(1))
    assert float(left["0"]) >= ended                                       # rank 0 waited for rank 1


@pytest.mark.slow                                   # a run, then two processes that each start up and load MNIST
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_torchrun_from_init_from_draws_its_own_noise_on_each_rank(data_dir, tmp_path):
    """--init-from under DDP: the ranks start from the same weights but seed their noise apart, as a
    run from noise does (the same noise on both would halve the batch), and the run keeps "before"."""
    from conftest import run
    import train_mnist
    source = run(train_mnist, tmp_path / "first", "--steps", "2")
    cmd = ["torchrun", "--nproc_per_node=2", "--standalone", "train_mnist.py", *TINY, "--steps", "2",
           "--init-from", str(source / "mnist_ema.pt"), "--ckpt-dir", str(tmp_path / "ckpt"),
           "--sample-dir", str(tmp_path / "samples"), "--log-dir", str(tmp_path / "runs")]
    env = {**os.environ, "DDPM_DATA": str(data_dir)}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ckpt" / "mnist.pt", weights_only=True)
    first, second = (state["torch"] for state in ckpt["rng_ranks"])
    assert not torch.equal(first, second)                                  # each rank its own noise stream
    assert ckpt["before"]["step"] == 2


def test_sigterm_finishes_the_step_saves_and_stops(data_dir, tmp_path, monkeypatch):
    from diffusion import GaussianDiffusion
    calls = []
    loss = GaussianDiffusion.loss

    def loss_then_sigterm(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)           # arrives in the middle of step 2
        return loss(self, *args, **kwargs)

    monkeypatch.setattr(GaussianDiffusion, "loss", loss_then_sigterm)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        run(train_mnist, tmp_path, "--steps", "10")
    assert e.value.code == 143                            # saved, then the shell's convention: 128 + SIGTERM
    assert torch.load(tmp_path / "ckpt" / "mnist.pt", weights_only=True)["step"] == 2 and len(calls) == 2
    assert signal.getsignal(signal.SIGTERM) is handler    # the trainer's handler is gone again


def test_resume_takes_the_optimisers_settings_from_the_flags_and_its_moments_from_the_checkpoint(data_dir, tmp_path):
    """A run moved to where AdamW is fused (CUDA; here --debug-sync-free), or given another
    --weight-decay, resumes with those settings: load_state_dict alone would bring back the saved ones,
    and a fused step path would then meet an unfused optimiser."""
    ckpt_dir = run(train_mnist, tmp_path, "--steps", "1", "--weight-decay", "0")
    first = torch.load(ckpt_dir / "mnist.pt", weights_only=True)["optimizer"]
    run(train_mnist, tmp_path, "--steps", "2", "--resume", "--weight-decay", "0.01", "--debug-sync-free")
    second = torch.load(ckpt_dir / "mnist.pt", weights_only=True)["optimizer"]
    assert second["param_groups"][0]["weight_decay"] == 0.01 and second["param_groups"][0]["fused"]
    assert all(float(state["step"]) == 2 for state in second["state"].values())     # the moments went on
    assert first["state"].keys() == second["state"].keys()


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
    with pytest.raises(SystemExit):
        run(train_mnist, tmp_path, "--steps", "5")
    assert seen == [signal.SIG_DFL, signal.SIG_DFL]     # ends the process at once, even inside a C call


def test_max_minutes_stops_cleanly_and_saves(data_dir, tmp_path):
    ckpt_dir = run(train_mnist, tmp_path, "--steps", "10", "--max-minutes", "0.0001")
    assert torch.load(ckpt_dir / "mnist.pt", weights_only=True)["step"] == 1


def test_max_minutes_stops_where_what_is_left_only_covers_the_end(data_dir, tmp_path, capsys, monkeypatch):
    # a fake clock on which every step takes 1 s: the sitting goes on while more than the end's reserve
    # (two steps, the save, the end-of-run grid) is left of --max-minutes 0.5, and stops at the first
    # step where it is not; the end then runs inside the 30 s (the fake clock stands still there)
    fake = {"now": 1000.0}

    class FakeClock(budget.SittingClock):
        def __init__(self, max_minutes, t_start=None, now=None):
            super().__init__(max_minutes, t_start, now=lambda: fake["now"])

    seen, real_reserve = [], trainer.reserve_seconds

    def reserve_seconds(run, clock):                     # asked once a step, after clock.left()
        seen.append((clock.left(), real_reserve(run, clock)))
        fake["now"] += 1.0
        return seen[-1][1]

    monkeypatch.setattr(trainer, "SittingClock", FakeClock)
    monkeypatch.setattr(trainer, "reserve_seconds", reserve_seconds)
    run(train_mnist, tmp_path, "--steps", "100000", "--max-minutes", "0.5", "--sample-every", "1000",
        "--sample-steps", "50")
    out = capsys.readouterr().out
    *going, last = seen
    assert going and all(left > reserve for left, reserve in going) and last[0] <= last[1]
    assert 2.0 < last[1] < 30.0                          # the reserve: more than the save's 2 s, less than the sitting
    assert f"stopped at step {len(seen)} (--max-minutes 0.5 used up) after {len(seen) / 60:.1f} min" in out
    assert "no end-of-run grid" in out or "samples in" in out


def test_eval_hook_logs_proxy_metrics_without_touching_the_training_rng(data_dir, tmp_path, monkeypatch):
    import types
    calls = []

    def proxy_metrics(diffusion, config, data_dir=None, num_samples=0, device=None, ckpt_dir=None):
        calls.append((config["dataset"], num_samples, ckpt_dir))
        torch.randn(100)                                  # draws from the global RNG, as sampling does
        return {"proxy_fid": 12.5, "confident": 0.75, "coverage": None, "sampler": "ddim"}

    monkeypatch.setitem(sys.modules, "scoring.metrics", types.SimpleNamespace(proxy_metrics=proxy_metrics))
    with_eval = run(train_mnist, tmp_path / "eval", "--steps", "2", "--eval-every", "1", "--eval-samples", "7")
    without = run(train_mnist, tmp_path / "plain", "--steps", "2")
    assert calls == [("mnist", 7, str(with_eval))] * 2
    rows = (tmp_path / "eval" / "runs" / "mnist" / "eval.csv").read_text().splitlines()
    assert rows[0] == "step,proxy_fid,confident,coverage,sampler" and rows[2] == "2,12.5,0.75,,ddim"
    a = torch.load(with_eval / "mnist.pt", weights_only=True)
    b = torch.load(without / "mnist.pt", weights_only=True)
    for key in ("model", "ema", "rng"):
        tensors_equal(a[key], b[key], key)


def test_sync_free_step_skips_a_nan_on_the_device_and_aborts_a_run_of_them(data_dir, tmp_path):
    """The CUDA step (no host synchronisation per step: fused AdamW's found_inf, a gated EMA), run on
    the CPU: a NaN at step 2 leaves the weights, the Adam moments and the average as after step 1."""
    one = run(train_mnist, tmp_path / "one", "--steps", "1", "--debug-sync-free")
    nan = run(train_mnist, tmp_path / "nan", "--steps", "2", "--debug-nan-steps", "2", "--debug-sync-free")
    a = torch.load(one / "mnist.pt", weights_only=True)
    b = torch.load(nan / "mnist.pt", weights_only=True)
    assert b["nan_skipped"] == 1 and b["step"] == 2
    tensors_equal(a["model"], b["model"], "model")
    tensors_equal(a["ema"]["shadow"], b["ema"]["shadow"], "EMA")
    tensors_equal(a["optimizer"]["state"], b["optimizer"]["state"], "Adam moments and step counts")
    with pytest.raises(SystemExit, match="2 non-finite steps in a row"):
        run(train_mnist, tmp_path / "abort", "--steps", "5", "--debug-nan-steps", "1,2", "--max-nan-steps", "2",
            "--debug-sync-free")


def test_sync_free_resume_continues_bit_for_bit(data_dir, tmp_path):
    whole = run(train_mnist, tmp_path / "whole", "--steps", "4", "--debug-sync-free", "--lr-schedule", "constant")
    split = run(train_mnist, tmp_path / "split", "--steps", "2", "--debug-sync-free", "--lr-schedule", "constant")
    run(train_mnist, tmp_path / "split", "--steps", "4", "--resume", "--debug-sync-free")
    a = torch.load(whole / "mnist.pt", weights_only=True)
    b = torch.load(split / "mnist.pt", weights_only=True)
    for key in ("model", "ema", "optimizer", "step", "rng"):
        tensors_equal(a[key], b[key], key)
