"""The GPU stage in one command: CIFAR-10 (FID ≤ 35 in ≤ 6 minutes), 64×64 faces, and a speed table.

    python -m tools.gpu_stage --prepare                     # here, once: pack data + wheels into .gpu/ (≤ 64 MiB)
    python -m tools.gpu_stage --out $OUT                    # on the GPU machine: everything, within 8 minutes
    python -m tools.gpu_stage --score runs/gpu_stage        # here: FID / proxy FID of the returned samples
    python -m tools.gpu_stage --device cpu --tiny --out runs/rehearsal    # the same command, tiny, in < 2 min

The minutes on the GPU (8 in all; machine start-up comes on top), in order of priority:
    CIFAR-10   5 min of training (torch.compile included), then 10,000 samples (about 0.5 min)
    faces      what is left but 1.3 min: train_celeba.py on faces64.npz, then a 64-image grid (0.3 min)
    speed      ≤ 1 min: our U-Net and diffusers' UNet2DModel of the same architecture, eager and
               compiled, train and sample img/s at batch 128 in bf16, FLOPs, TFLOP/s, % of peak
A part that does not fit in what is left is skipped and says so in summary.json.

What travels: the checkout and .gpu/ (git-ignored): the training images as JPEG mosaics
(CIFAR-10 q95 4:4:4, faces q95 4:4:4; the measured cost is in docs/gpu_stage.md), and the wheels of
diffusers and its pure-Python dependencies. What comes back (≤ 8 files): the 10,000 CIFAR
samples as uint8 .npz parts, both grids, logs.txt and summary.json (speed table and timings).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffusion import DEFAULT_SAMPLER, DEFAULT_STEPS
from plumbing.device import DEVICE_HELP, pick_device

PACK = Path(".gpu")
ROOT = Path(__file__).resolve().parents[1]     # the checkout: the trainers are run from here
CIFAR_JPEG, FACES_JPEG, LABELS = PACK / "cifar10_train_q95.jpg", PACK / "faces64_q95.jpg", PACK / "cifar10_labels.npy"
WHEELS = PACK / "wheels"
CARRY_LIMIT = 64 * 2**20
MOSAIC_COLUMNS = 250

# The CIFAR-10 recipe for ~5 minutes of one H100 (the paper's lr 2e-4 / EMA 0.9999 / batch 128
# is tuned for 800k steps; a few thousand steps want a larger batch, a higher peak lr, no
# dropout (nothing is memorised in 20 epochs), an EMA horizon of a few hundred steps, and the
# learning rate decayed linearly to 0 over the budget (on MNIST: proxy FID 0.73 -> 0.59).
CIFAR = ["--base-channels", "128", "--channel-mults", "1,2,2,2", "--num-res-blocks", "2", "--attn-resolutions", "16",
         "--dropout", "0.0", "--batch-size", "256", "--lr", "6e-4", "--warmup-steps", "200", "--lr-schedule", "linear",
         "--ema-decay", "0.999", "--ema-warmup", "--sample-every", "0", "--save-every", "0", "--log-every", "100"]
FACES = ["--base-channels", "128", "--channel-mults", "1,2,2,2", "--num-res-blocks", "1", "--attn-resolutions", "16",
         "--dropout", "0.0", "--batch-size", "128", "--lr", "4e-4", "--warmup-steps", "100", "--lr-schedule", "linear",
         "--ema-decay", "0.998", "--ema-warmup", "--sample-every", "0", "--save-every", "0", "--log-every", "50"]
TINY = ["--base-channels", "8", "--channel-mults", "1,2", "--num-res-blocks", "1", "--attn-resolutions", "none",
        "--batch-size", "16", "--limit-data", "256", "--timesteps", "50", "--sample-every", "0", "--save-every", "0",
        "--log-every", "5"]


# ----------------------------------------------------------------------------- packing (here)

def to_mosaic(images, columns=MOSAIC_COLUMNS):
    """uint8 (N, H, W, C) -> one (rows·H, columns·W, C) image (the last row padded with black)."""
    n, h, w, c = images.shape
    rows = math.ceil(n / columns)
    padded = np.zeros((rows * columns, h, w, c), np.uint8)
    padded[:n] = images
    return padded.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, c)


def from_mosaic(mosaic, n, size, columns=MOSAIC_COLUMNS):
    """The inverse of to_mosaic -> uint8 (n, size, size, C)."""
    rows = mosaic.shape[0] // size
    tiles = mosaic.reshape(rows, size, columns, size, -1).transpose(0, 2, 1, 3, 4).reshape(rows * columns, size, size, -1)
    return np.ascontiguousarray(tiles[:n])


def encode_jpeg(images, path, quality=95):
    """A mosaic JPEG, 4:4:4: one file instead of 50,000 headers (a 32×32 JPEG is mostly header)."""
    from PIL import Image
    Image.fromarray(to_mosaic(images)).save(path, "JPEG", quality=quality, subsampling=0, optimize=True)


def decode_jpeg(path, n, size):
    from PIL import Image
    with Image.open(path) as img:
        return from_mosaic(np.asarray(img.convert("RGB")), n, size)


def prepare(data_dir=None, wheels=True):
    """Pack what the GPU machine needs into .gpu/ and check that it fits one carry (64 MiB).
    wheels=False: the data only (the rehearsal test; diffusers is then the local one)."""
    from plumbing import data
    PACK.mkdir(exist_ok=True)
    cifar, labels, _ = data.load_dataset("cifar10", data_dir)
    encode_jpeg(cifar.permute(0, 2, 3, 1).numpy(), CIFAR_JPEG)
    np.save(LABELS, labels.numpy())
    faces, _, _ = data.load_dataset("faces", data_dir)
    encode_jpeg(faces.permute(0, 2, 3, 1).numpy(), FACES_JPEG)
    if wheels:
        download_wheels()
    sizes = {str(p): p.stat().st_size for p in sorted(PACK.rglob("*")) if p.is_file()}
    total = sum(sizes.values())
    for p, s in sizes.items():
        print(f"  {s / 2**20:7.2f} MiB  {p}")
    print(f"total {total / 2**20:.1f} MiB of the {CARRY_LIMIT / 2**20:.0f} MiB a device call may carry")
    if total > CARRY_LIMIT:
        raise SystemExit(f"error: .gpu/ is {total / 2**20:.1f} MiB, over the carry limit; drop some wheels")
    return total


def download_wheels():
    """diffusers and what it imports, for a machine without internet."""
    WHEELS.mkdir(exist_ok=True)
    # diffusers and what it imports; binary ones for the usual CPython versions of a GPU image.
    pure = ["diffusers", "huggingface_hub", "filelock", "fsspec", "packaging", "requests", "urllib3", "idna",
            "certifi", "charset_normalizer", "tqdm", "typing_extensions", "importlib_metadata", "zipp"]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(WHEELS), *pure], check=True)
    for py in ("3.10", "3.11", "3.12"):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(WHEELS),
                        "--only-binary=:all:", "--python-version", py, "--platform", "manylinux2014_x86_64",
                        "safetensors", "regex", "pyyaml"], check=True)


# ----------------------------------------------------------------------------- on the device

def unpack(folder, tiny):
    """.gpu/ -> folder/cifar10_train.npz and folder/faces64.npz (the trainers read .npz files)."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.load(LABELS)
    cifar = decode_jpeg(CIFAR_JPEG, len(labels), 32)
    faces = decode_jpeg(FACES_JPEG, 4800, 64)
    if tiny:
        cifar, labels, faces = cifar[::100], labels[::100], faces[::10]
    np.savez(folder / "cifar10_train.npz", images=cifar, labels=labels)
    np.savez(folder / "faces64.npz", images=faces)
    return folder / "cifar10_train.npz", folder / "faces64.npz"


def install_diffusers():
    """diffusers from .gpu/wheels, if this machine lacks it (the GPU machine has no internet)."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(WHEELS),
                        "diffusers"], check=False, timeout=120)


def train(script, name, dataset, minutes, flags, work, device, tiny):
    """One trainer run, as a command (`python train_cifar.py …`) -> (EMA checkpoint path, seconds)."""
    t0 = time.time()
    argv = ["--dataset", str(dataset), "--run-name", name, "--max-minutes", f"{minutes:.3f}", "--steps", "1000000",
            "--ckpt-dir", str(work / "checkpoints"), "--sample-dir", str(work / "samples"),
            "--log-dir", str(work / "runs"), "--device", device, "--overwrite", "--no-tensorboard",
            *flags, *(TINY if tiny else []), *([] if device == "cpu" else ["--compile"])]
    subprocess.run([sys.executable, str(ROOT / script), *argv], check=True)
    return work / "checkpoints" / f"{name}_ema.pt", time.time() - t0


def sample(ckpt, n, sampler, steps, device, batch, compile_model):
    """n images from an EMA checkpoint in bf16 -> (uint8 (n, H, W, C), seconds)."""
    from plumbing.checkpoint import load_for_sampling
    from plumbing.device import synchronize
    from plumbing.sampling import sample_images
    diffusion, config = load_for_sampling(ckpt, device)
    if compile_model:
        diffusion.model = torch.compile(diffusion.model)
    t0 = time.time()                      # (load_for_sampling runs the network in bf16 on the GPU)
    images = sample_images(diffusion, n, sampler=sampler, steps=steps, batch_size=batch, seed=0, progress=False)
    synchronize(device)
    return images, time.time() - t0


def run(args):
    from plumbing.images import save_grid
    t_start = time.time()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(args.device)
    if args.tiny:                                           # the rehearsal: the same parts in about a minute
        args.minutes, args.cifar_minutes, args.speed_minutes = 1.2, 0.15, 0.25
    summary = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "parts": {}}

    def left():
        return args.minutes * 60 - (time.time() - t_start)

    cifar_npz, faces_npz = unpack(work / "data", args.tiny)
    # 1. CIFAR-10: train, then 10,000 samples with the fast sampler
    ckpt, seconds = train("train_cifar.py", "cifar10", cifar_npz, args.cifar_minutes, CIFAR, work, str(device), args.tiny)
    n, steps = (40, 5) if args.tiny else (10_000, args.sampler_steps)
    images, sample_seconds = sample(ckpt, n, args.sampler, steps, device, 2000, compile_model=device.type == "cuda")
    for k, part in enumerate(np.array_split(images, math.ceil(images.nbytes / (12 * 2**20)))):
        np.savez(out / f"cifar10_samples_part{k}.npz", images=part, sampler=np.asarray(args.sampler),
                 steps=np.asarray(steps), dataset=np.asarray("cifar10"))
    save_grid(images[:100], out / "cifar10_grid.png", ncol=10)
    summary["parts"]["cifar10"] = {"train_seconds": round(seconds, 1), "samples": n, "sampler": args.sampler,
                                   "steps": steps, "sample_seconds": round(sample_seconds, 1)}
    # 2. faces, with what is left but the speed table's share
    face_minutes = left() / 60 - args.speed_minutes - (0.1 if args.tiny else 0.3)     # the face grid's share
    if face_minutes > 0.1:
        ckpt, seconds = train("train_celeba.py", "celeba", faces_npz, face_minutes, FACES, work, str(device), args.tiny)
        grid, grid_seconds = sample(ckpt, 64, args.sampler, steps, device, 64, compile_model=False)
        save_grid(grid, out / "faces_grid.png", ncol=8)
        summary["parts"]["faces"] = {"train_seconds": round(seconds, 1), "grid_seconds": round(grid_seconds, 1)}
    else:
        summary["parts"]["faces"] = f"skipped: {face_minutes:.1f} min left"
    # 3. speed, if it fits
    if left() > 10:
        install_diffusers()
        from tools import speed
        summary["speed"] = speed.table(device, batch=8 if args.tiny else 128, tiny=args.tiny, budget_s=left() - 5)
    else:
        summary["speed"] = f"skipped: {left():.0f} s left"
    summary["total_seconds"] = round(time.time() - t_start, 1)
    logs = [f"== {p}\n{p.read_text()}" for p in sorted((work / "runs").rglob("log.csv"))]
    (out / "logs.txt").write_text("\n".join(logs))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


# ----------------------------------------------------------------------------- scoring (here)

def score(folder, data_dir=None):
    """Standard FID-10k against the CIFAR-10 test set and the proxy FID of the returned samples;
    writes samples/cifar10_gpu_1k.npz (the first 1,000) for the repository."""
    parts = sorted(Path(folder).glob("cifar10_samples_part*.npz"), key=lambda p: int(p.stem.split("part")[1]))
    images = np.concatenate([np.load(p)["images"] for p in parts])
    Path("samples").mkdir(exist_ok=True)
    np.savez_compressed("samples/cifar10_gpu_1k.npz", images=images[:1000])
    np.savez(Path(folder) / "cifar10_samples.npz", images=images, dataset=np.asarray("cifar10"))
    common = ["--samples", str(Path(folder) / "cifar10_samples.npz"), "--dataset", "cifar10"]
    if data_dir:
        common += ["--data-dir", str(data_dir)]
    results = {}
    for key, extra in (("fid_test", ["--split", "test"]), ("proxy_train", ["--proxy"])):   # fid.py, as a command
        out = Path(folder) / f"{key}.json"
        subprocess.run([sys.executable, "fid.py", *common, *extra, "--json", str(out)], check=True)
        results[key] = json.loads(out.read_text())
    (Path(folder) / "scores.json").write_text(json.dumps(results, indent=2))
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", action="store_true", help="pack .gpu/ here (data mosaics and wheels)")
    p.add_argument("--score", metavar="DIR", help="score the samples a GPU run returned into DIR")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_stage"), help="where the run's files go")
    p.add_argument("--work", default="runs/gpu_work", help="checkpoints and logs of the run (not returned)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--tiny", action="store_true", help="the rehearsal: tiny models, data and minutes")
    p.add_argument("--minutes", type=float, default=8.0, help="the whole run's wall-clock budget")
    p.add_argument("--cifar-minutes", type=float, default=5.0, help="CIFAR-10 training, compile included")
    p.add_argument("--speed-minutes", type=float, default=1.0, help="kept for the speed table")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER, help="sampler for the 10,000 CIFAR samples (default: "
                                                             "%(default)s)")
    p.add_argument("--sampler-steps", type=int, default=DEFAULT_STEPS, help="its network calls per image (default: "
                                                                          "%(default)s)")
    p.add_argument("--data-dir", default=None, help="--prepare / --score: the offline datasets")
    args = p.parse_args(argv)
    if args.prepare:
        return prepare(args.data_dir)
    if args.score:
        return score(args.score, args.data_dir)
    if not CIFAR_JPEG.exists():
        raise SystemExit("error: .gpu/ is not packed; run python -m tools.gpu_stage --prepare first (here, not on the GPU)")
    return run(args)


if __name__ == "__main__":
    main()
