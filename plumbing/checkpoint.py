"""Checkpoints: one torch.save dict of plain types and tensors, written atomically, read with
weights_only=True so that no pickled code ever runs.

Layout (save_run; both files carry "config", so generate.py / fid.py / app.py rebuild the model from it):
    <ckpt-dir>/<run>.pt       {"config", "model", "ema", "optimizer", "step", "rng", "data_state",
                               "images_seen", "train_flops", ...}                                   (resume)
    <ckpt-dir>/<run>_ema.pt   {"config", "ema_model", "step", "images_seen", "train_flops", ...}    (sampling)

config = {"dataset": str,
          "model":     UNet keyword arguments,
          "diffusion": GaussianDiffusion keyword arguments (image_size, channels, timesteps, ...),
          "data":      {"name", "image_size", "channels", "class_names": [...] or None, "num_images"},
          "train":     the trainer's resolved hyperparameters}
"""

import copy
import hashlib
import os
import pickle
import socket
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from plumbing.device import bf16_fast
from diffusion import GaussianDiffusion
from unet import UNet


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used, with a message that says what to do."""


def cache_dir(*parts, required=False):
    """The cache folder (joined with parts): $DDPM_CACHE, else ~/.cache/ddpm. DDPM_CACHE=off (or 0,
    none, false) turns caching off: None, unless required (files that need a home anyway, such as
    the FID network's weights), which then go to ~/.cache/ddpm."""
    setting = os.environ.get("DDPM_CACHE", "").strip()
    off = setting.lower() in ("off", "0", "none", "false")
    if off and not required:
        return None
    base = Path(setting).expanduser() if setting and not off else Path.home() / ".cache" / "ddpm"
    return base.joinpath(*parts)


def file_hash(path, algorithm="sha256"):
    """A file's digest as hex (names weights in caches and reports; checks downloads)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path, write):
    """write(binary file) into a temporary file beside `path`, flush it to disk, then rename it over
    `path`: a crash or a full disk mid-write never leaves a truncated file, and the previous file
    survives until the new one is complete. The file gets a normal file's mode. -> path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)         # mkstemp makes it owner-only
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def check_writable(folder, flag):
    """SystemExit in one line unless files can be written in `folder` (or, if it does not exist yet,
    in the nearest folder above it, where it would be made). Writes and removes one temporary file."""
    folder = Path(folder).absolute()
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(f"{probe} is not a folder")
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise SystemExit(f"error: {flag} {folder}: cannot write there ({type(e).__name__}: {e.strerror or e}); "
                         f"pass a {flag} you can write to") from None


class RunLock:
    """<run>.lock beside <run>.pt: one training run per checkpoint, so that two runs never overwrite
    each other's saves. The lock is an flock on the file, which the system drops when its process
    ends however it ends; the file says who holds it (pid, host, start time). A file left with a
    holder but no lock is a run that was killed: the next run takes it over and says so."""

    def __init__(self, ckpt_path):
        self.path = Path(ckpt_path).with_suffix(".lock")
        self.fd = None

    def acquire(self):
        """Take the lock -> a line about a stale lock taken over, or None; CheckpointError if it is held."""
        try:
            import fcntl
        except ImportError:                  # Windows: no flock; runs are not guarded against each other
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        holder = os.read(fd, 500).decode(errors="replace").strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            holder = holder or "a process"
            raise CheckpointError(f"{self.path.with_suffix('.pt')} is being trained by another run ({holder}, lock "
                                  f"{self.path}); wait for it to end, stop it, or pass another --run-name / "
                                  "--ckpt-dir") from None
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        self.fd = fd
        return f"took over the lock of an earlier run that ended without releasing it ({holder})" if holder else None

    def release(self):
        """Empty the file (no holder) and drop the lock."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


def save_checkpoint(obj, path):
    """torch.save, atomically (atomic_write)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


# ----------------------------------------------------------------------------- the layout

def model_settings(args, channels, image_size, num_classes):
    """The trainer's resolved flags -> (UNet keyword arguments, GaussianDiffusion keyword arguments):
    the one mapping from flags to the model, for make_config and benchmark.py."""
    model = dict(in_channels=channels, base_channels=args.base_channels, channel_mults=list(args.channel_mults),
                 num_res_blocks=args.num_res_blocks, attn_resolutions=list(args.attn_resolutions),
                 dropout=args.dropout, image_size=image_size, num_classes=num_classes)
    diffusion = dict(image_size=image_size, channels=channels, timesteps=args.timesteps, schedule=args.schedule,
                     objective=args.objective, variance=args.variance, clip_denoised=args.clip_denoised,
                     cond_drop_prob=args.cond_drop_prob, loss_weighting=args.loss_weighting,
                     min_snr_gamma=args.min_snr_gamma, t_sampling=args.t_sampling,
                     lognormal_mean=args.lognormal_mean)
    return model, diffusion


def make_config(args, images, class_names, num_classes):
    """The config every checkpoint carries, from the trainer's resolved flags (args) and the data:
    everything generate.py / fid.py / app.py need to rebuild the model, and the flags for --resume."""
    model_kwargs, diffusion_kwargs = model_settings(args, images.shape[1], images.shape[-1], num_classes)
    train = {k: v for k, v in vars(args).items() if not k.startswith("debug_")}
    # "dataset" is what data.load_dataset takes (fid.py reloads the real images from it); the
    # file names use args.run_name ("celeba" trains on dataset "faces").
    return {"dataset": str(args.dataset), "model": model_kwargs, "diffusion": diffusion_kwargs,
            "data": {"name": str(args.dataset), "image_size": images.shape[-1], "channels": images.shape[1],
                     "class_names": class_names, "num_images": len(images)},
            "train": train}


def save_run(path, ema_path, config, model, ema, optimizer, step, rng, data_state, stats):
    """A training run's two files, atomically: `path` holds everything --resume needs, `ema_path`
    only what sampling needs (the EMA weights in the model's dtypes, the config, the compute).
    stats: plain numbers of the run (nan_skipped, nan_streak, train_seconds, progress, images_seen,
    flops_per_image, train_flops, and rng_ranks under DDP). Refuses non-finite weights: the
    previous files are then left as they were."""
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ema_state = ema.state_dict()
    ema_state["shadow"] = {k: v.cpu() for k, v in ema_state["shadow"].items()}
    for tensors in (weights.values(), ema_state["shadow"].values()):
        if not all(bool(torch.isfinite(v).all()) for v in tensors if v.is_floating_point()):
            raise CheckpointError(f"refusing to save non-finite weights at step {step}; the last good "
                                  f"checkpoint is {path}")
    compute = {k: stats[k] for k in ("images_seen", "flops_per_image", "train_flops", "train_seconds")}
    save_checkpoint({"config": config, "model": weights, "ema": ema_state, "optimizer": optimizer.state_dict(),
                     "step": step, "rng": rng, "data_state": data_state, **stats,
                     "versions": {"torch": str(torch.__version__)}}, path)
    save_checkpoint({"config": config, "step": step, **compute,
                     "ema_model": {k: v.to(weights[k].dtype) for k, v in ema_state["shadow"].items()}}, ema_path)


LOCAL_PATHS = ("ckpt_dir", "sample_dir", "log_dir", "data_dir", "tensorboard", "debug_dump_dir")


def save_pretrained(ckpt, path, quality=None):
    """A shipped model (pretrained/): the EMA weights in half precision, the config, what the model has
    seen (steps, images, PFLOP, hours) and its measured quality, one line such as "FID-10k 30.1
    (ancestral DDPM, 50 steps)". Read back with load_for_sampling, which computes in float32."""
    weights = {k: v.half() if v.is_floating_point() else v for k, v in ema_weights(ckpt).items()}
    keep = ("step", "images_seen", "flops_per_image", "train_flops", "train_seconds")
    config = copy.deepcopy(ckpt["config"])
    for key in LOCAL_PATHS:            # the training machine's folders: meaningless in a clone, not shipped
        if key in config.get("train", {}):
            config["train"][key] = None
    return save_checkpoint({"config": config, "ema_model": weights, "quality": quality,
                            **{k: ckpt[k] for k in keep if k in ckpt}}, path)


# ----------------------------------------------------------------------------- reading

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
    # What the model has seen (older checkpoints: step × batch size, and no FLOPs).
    batch = config.get("train", {}).get("batch_size")
    diffusion.trained = {"step": ckpt.get("step"), "images_seen": ckpt.get("images_seen", (ckpt.get("step") or 0)
                                                                           * (batch or 0) or None),
                         "train_flops": ckpt.get("train_flops"), "train_seconds": ckpt.get("train_seconds")}
    return diffusion.to(device).eval(), config
