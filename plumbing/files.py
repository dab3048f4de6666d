"""Files: atomic writes, the cache folder, digests, the run's lock, and torch files read and written
safely (weights_only=True, so no pickled code ever runs). Nothing here knows the model, so loading
data or the FID networks does not import diffusion.py or unet.py.

    atomic_write(path, write), save_checkpoint(obj, path)   a crash never leaves a truncated file
    load_checkpoint(path)                                   -> dict, or CheckpointError saying what to do
    cache_dir(*parts), file_hash(path)                      the cache folder; a file's digest
    check_writable(folder, flag), RunLock(ckpt_path)        before a run: its folders, its lock
"""

import hashlib
import os
import pickle
import shutil
import socket
import tempfile
import time
import zipfile
from pathlib import Path

import torch


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
    """torch.save, atomically (atomic_write). torch.save's zip writer reports a write that fails part
    way (a full disk) as a RuntimeError; it is raised as the OSError it is, which callers handle."""
    def write(f):
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            free = shutil.disk_usage(Path(path).absolute().parent).free
            raise OSError(f"torch.save stopped part way ({str(e).splitlines()[0]}), as it does on a full disk; "
                          f"{free / 1e6:.0f} MB free there") from e
    return atomic_write(path, write)


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
