"""Checkpoints: one torch.save dict of plain types and tensors, written atomically, read with
weights_only=True so that no pickled code ever runs. Also the device choice every script shares,
the RNG states a checkpoint stores, and DDP's set-up (torchrun sets RANK).

Layout (both files carry "config", so generate.py / fid.py / app.py rebuild the model from it):
    <ckpt-dir>/<dataset>.pt       {"config", "model", "ema", "optimizer", "step", "rng", ...}  (resume)
    <ckpt-dir>/<dataset>_ema.pt   {"config", "ema_model", "step"}                             (sampling)

config = {"dataset": str,
          "model":     UNet keyword arguments,
          "diffusion": GaussianDiffusion keyword arguments (image_size, channels, timesteps, ...),
          "data":      {"name", "image_size", "channels", "class_names": [...] or None, ...},
          "train":     the trainer's resolved hyperparameters}
"""

import hashlib
import os
import pickle
import tempfile
import zipfile

import torch
import torch.distributed as dist

from diffusion import GaussianDiffusion
from unet import UNet


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used, with a message that says what to do."""


def pick_device(name="auto"):
    """"auto" -> CUDA, then Apple MPS, then CPU; otherwise the named device, checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here; use --device auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("--device mps: Apple MPS is not available here; use --device auto or cpu")
    return torch.device(name)


def bf16_fast(device):
    """Whether bf16 autocast speeds the network up here: CUDA cards with bf16, and CPUs with native
    bf16 instructions (AVX512-BF16 or AMX). Elsewhere bf16 is emulated, and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(getattr(torch.cpu, check, lambda: False)()
                   for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def autocast(device, enabled=True):
    """bf16 autocast where bf16_fast(device), else a no-op. The weights, the optimiser and the
    diffusion arithmetic stay float32; only the network's convolutions and matmuls run in bf16."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and bf16_fast(device))


def setup_distributed(args):
    """-> (device, rank, world_size). DDP only when torchrun has set RANK."""
    if "RANK" not in os.environ:
        return pick_device(args.device), 0, 1
    use_cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), rank, world
    return torch.device("cpu"), rank, world


def rank_max(values, device, world):
    """The element-wise maximum of a list of floats over all ranks (one all-reduce), so that every
    rank takes the same decision: when to stop, which learning rate."""
    if world == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state      # numpy / python `random` are not used by training (the data order is stateless)


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def synchronize(device):
    """Wait for the device's queued work (for honest timings); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def file_sha256(path):
    """The SHA-256 of a file, as hex (names weights in caches and reports)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(obj, path):
    """torch.save to a temporary file in the same folder, then rename: a crash mid-write never
    leaves a truncated checkpoint, and the previous one survives until the new one is complete."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)         # mkstemp makes it owner-only; give it a normal file's mode
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint safely, or raise CheckpointError saying what is wrong."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist; train one first "
                              "(e.g. python train_mnist.py) or pass the right --ckpt")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder; pass a checkpoint file such as checkpoints/mnist_ema.pt")
    if not zipfile.is_zipfile(path):          # torch.save writes a zip archive; nothing else is read
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (not a torch.save archive); nothing in it "
                              "was loaded. Pass a file written by train_*.py, such as checkpoints/mnist_ema.pt")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(f"refusing {path}: it holds pickled Python objects, not just tensors and "
                                  "plain values, and loading it could run arbitrary code. Only checkpoints "
                                  "written by this repo's trainers are accepted.") from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({e})") from None
    except Exception as e:                     # not a zip / torch file at all
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or not any(k in ckpt for k in ("ema_model", "ema", "model")):
        raise CheckpointError(f"{path} is a PyTorch file but not a checkpoint of this repo "
                              "(no 'config' and weights); use a file written by train_*.py")
    return ckpt


def build_diffusion(config):
    """Rebuild the (untrained) UNet and GaussianDiffusion from a stored config alone."""
    unet = UNet(**config["model"])
    return GaussianDiffusion(unet, **config["diffusion"])


def ema_weights(ckpt):
    """The EMA weights of a checkpoint as a UNet state dict (falls back to the raw weights)."""
    if "ema_model" in ckpt:
        return ckpt["ema_model"]
    if "ema" in ckpt:
        return ckpt["ema"]["shadow"]
    return ckpt["model"]


def load_for_sampling(path, device="cpu", amp=True):
    """checkpoint path -> (GaussianDiffusion with EMA weights, in eval mode on device, config).
    amp: run the network in bf16 where that is fast here (bf16_fast); False keeps float32."""
    ckpt = load_checkpoint(path)
    config = ckpt["config"]
    try:
        diffusion = build_diffusion(config)
        diffusion.model.load_state_dict(ema_weights(ckpt))
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its config and weights do not fit together ({e})") from None
    diffusion.amp = amp and bf16_fast(torch.device(device))
    return diffusion.to(device).eval(), config
