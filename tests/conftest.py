"""Shared test setup: the repo root on sys.path, the offline data directory, and the helpers more
than one test file uses (tests import them with `from conftest import ...`):

    make_checkpoint, tiny_checkpoint    a tiny random checkpoint in the trainers' format
    TINY, run, tensors_equal            a tiny training run in-process; checkpoints compared exactly
    ZeroEps, WavyEps, make_diffusion    fake networks and a GaussianDiffusion around one (2×2 images)
    reference                           β_t, α_t, ᾱ_t, ᾱ_{t−1} in float64 by a plain loop
    free_port                           a free localhost port for the demo's server

Repo modules are imported inside the helpers, so that this file loads without them (test_data.py
copies it into an empty folder to test the data_dir fixture).
"""

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Datasets: $DDPM_DATA if set, else the offline copies in ../shared/data beside the checkout.
DATA_SET_BY_USER = "DDPM_DATA" in os.environ
if not DATA_SET_BY_USER and (ROOT.parent / "shared" / "data").is_dir():
    os.environ["DDPM_DATA"] = str(ROOT.parent / "shared" / "data")
DATA_DIR = Path(os.environ.get("DDPM_DATA", ROOT / "data")).resolve()     # tests may chdir
DATA_MISSING = (f"real-data tests skipped: no mnist_train.npz in {DATA_DIR}. Point DDPM_DATA at the folder of "
                "offline .npz copies (DDPM_DATA=path/to/data python -m pytest -q) to run them")
skipped_for_data = []


@pytest.fixture
def data_dir():
    """The folder with mnist_train.npz etc. Without it, tests that need real data skip, and the
    summary says so in one line; with DDPM_DATA set to a wrong folder they fail instead."""
    if not (DATA_DIR / "mnist_train.npz").exists():
        if DATA_SET_BY_USER:
            pytest.fail(f"DDPM_DATA={os.environ['DDPM_DATA']} holds no mnist_train.npz; fix DDPM_DATA or unset it")
        skipped_for_data.append(1)
        pytest.skip(DATA_MISSING)
    return DATA_DIR


def pytest_terminal_summary(terminalreporter):
    if skipped_for_data:
        terminalreporter.write_line(f"{len(skipped_for_data)} {DATA_MISSING}", yellow=True, bold=True)


def make_checkpoint(path, num_classes=None, image_size=8, channels=1, timesteps=20, objective="eps",
                    dataset="mnist", class_names=None, seed=0, clip_denoised=None):
    """Write a tiny, randomly initialised checkpoint in the trainers' format and return its config.

    The zero-initialised output layers are filled with small random values so that the output
    depends on x_t, t and the label (a fresh model would predict exactly 0 everywhere).
    """
    from plumbing.checkpoint import build_diffusion, model_settings, save_checkpoint
    from plumbing.train_args import parse_args

    if num_classes and class_names is None:
        class_names = [str(i) for i in range(num_classes)]
    # The trainers' own mapping from flags to the model (checkpoint.model_settings), not a copy of it.
    args, _ = parse_args({}, ["--base-channels", "8", "--channel-mults", "1,2", "--num-res-blocks", "1",
                              "--timesteps", str(timesteps), "--objective", objective])
    model, diffusion_kwargs = model_settings(args, channels, image_size, num_classes)
    config = {"dataset": dataset, "model": model, "diffusion": diffusion_kwargs, "train": {},
              "data": {"name": dataset, "image_size": image_size, "channels": channels, "class_names": class_names}}
    if clip_denoised is None:                     # as a checkpoint from before the option (it clamps)
        del config["diffusion"]["clip_denoised"]
    else:
        config["diffusion"]["clip_denoised"] = clip_denoised
    torch.manual_seed(seed)
    diffusion = build_diffusion(config)
    with torch.no_grad():
        for name, p in diffusion.model.named_parameters():
            if p.abs().sum() == 0 and p.dim() > 1:
                p.normal_(0, 0.05)
    save_checkpoint({"config": config, "ema_model": diffusion.model.state_dict(), "step": 0}, path)
    return config


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: tiny_checkpoint(name="mnist_ema.pt", **make_checkpoint kwargs) -> path."""
    def factory(name="tiny_ema.pt", **kwargs):
        path = tmp_path / name
        make_checkpoint(path, **kwargs)
        return path
    return factory


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors run faster on one thread, and a busy shared CPU cannot stall it at OpenMP barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- training runs

TINY = ["--base-channels", "8", "--channel-mults", "1,2", "--num-res-blocks", "1", "--timesteps", "50",
        "--batch-size", "8", "--limit-data", "64", "--warmup-steps", "2", "--device", "cpu",
        "--log-every", "1", "--sample-every", "0"]


def run(script, folder, *extra):
    """Train in-process (the datasets stay cached between tests) a TINY model with every output under
    folder; -> folder/ckpt. script: a train_<dataset> module; extra: more flags, which win over TINY."""
    script.main(TINY + ["--ckpt-dir", f"{folder}/ckpt", "--sample-dir", f"{folder}/samples",
                        "--log-dir", f"{folder}/runs", *extra])
    return folder / "ckpt"


def tensors_equal(a, b, path="checkpoint"):
    """Every tensor and value of two nested checkpoint dicts, compared exactly."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            tensors_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            tensors_equal(u, v, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} differs"
    else:
        assert a == b, f"{path}: {a} != {b}"


# ----------------------------------------------------------------------------- fake networks

class ZeroEps(nn.Module):
    """ε_θ ≡ 0: a placeholder network (like a fresh UNet, whose output layer is zero)."""
    num_classes = None

    def forward(self, xt, t, labels=None):
        return torch.zeros_like(xt)


class WavyEps(nn.Module):
    """A fixed nonlinear function of x_t and t (floats allowed) standing in for a network; with
    labels, a label-dependent shift. Records every call in .calls as (batch size, t, labels)."""

    def __init__(self, num_classes=None):
        super().__init__()
        self.num_classes = num_classes
        self.calls = []

    def forward(self, xt, t, labels=None):
        self.calls.append((xt.shape[0], t.clone(), None if labels is None else labels.clone()))
        out = 0.5 * torch.sin(3 * xt + 0.1 * t.float().reshape(-1, 1, 1, 1))
        return out if labels is None else out + 0.1 * labels.float().reshape(-1, 1, 1, 1)


def make_diffusion(model=None, timesteps=1000, schedule="linear", image_size=2, channels=1, **kwargs):
    """GaussianDiffusion around model (default ZeroEps) on 2×2 single-channel images."""
    from diffusion import GaussianDiffusion

    return GaussianDiffusion(ZeroEps() if model is None else model, image_size=image_size, channels=channels,
                             timesteps=timesteps, schedule=schedule, **kwargs)


def reference(schedule, timesteps):
    """float64 (T,) tensors β_t, α_t, ᾱ_t, ᾱ_{t−1}, with ᾱ_t = ∏_{s≤t} α_s by a plain loop over the β's
    (not diffusion.py's buffers, so that a wrong buffer cannot agree with itself)."""
    from diffusion import cosine_beta_schedule, linear_beta_schedule

    betas = {"linear": linear_beta_schedule, "cosine": cosine_beta_schedule}[schedule](timesteps).tolist()
    alpha_bar, prod = [], 1.0
    for beta in betas:
        prod *= 1.0 - beta
        alpha_bar.append(prod)
    betas, alpha_bar = torch.tensor(betas, dtype=torch.float64), torch.tensor(alpha_bar, dtype=torch.float64)
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    return betas, 1 - betas, alpha_bar, alpha_bar_prev


# ----------------------------------------------------------------------------- the demo's server

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
