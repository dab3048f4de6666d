"""Shared test setup: the repo root on sys.path, the offline data directory, small helpers."""

import os
import sys
from pathlib import Path

import pytest

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
    import torch

    from checkpoint import build_diffusion, save_checkpoint

    if num_classes and class_names is None:
        class_names = [str(i) for i in range(num_classes)]
    config = {
        "dataset": dataset,
        "model": {"in_channels": channels, "base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1,
                  "attn_resolutions": [], "dropout": 0.0, "image_size": image_size, "num_classes": num_classes},
        "diffusion": {"image_size": image_size, "channels": channels, "timesteps": timesteps,
                      "schedule": "linear", "objective": objective, "variance": "beta_tilde", "cond_drop_prob": 0.1},
        "data": {"name": dataset, "image_size": image_size, "channels": channels, "class_names": class_names},
        "train": {},
    }
    if clip_denoised is not None:                 # else: as a checkpoint from before the option (clamps)
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
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
