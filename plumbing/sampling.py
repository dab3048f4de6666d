"""Sampling a checkpoint, as every script does it: the default fast sampler, the one check of the
sampling settings against a model, the command-line flags, and batched sampling to uint8 images.

    DEFAULT_SAMPLER, DEFAULT_STEPS          the fast default of generate.py, the demo, fid.py, the trainer
    BEST_SAMPLING, best_sampling(config)    a model's best measured sampling, used where no sampling flag is given
    resolve_sampling(diffusion, config, …)  -> (steps, labels, class) or SamplingError
    sample_images(diffusion, n, …)          -> (N, H, W, C) uint8, the same for the same seed on every device
    build_parser, open_from_args, settings_from_args, batches, write_outputs
                                            the steps generate.py shows; sample_from_args: them in one call

The same --seed gives the same images on every device: the noise comes from a CPU torch.Generator
(for the same --n and --batch-size). A conditional model without --class samples the classes in
turn (image i has class i mod K), so a grid with K columns shows one class per column.
"""

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from plumbing.checkpoint import CheckpointError, load_for_sampling, seen_in_all
from plumbing.data import default_class_names
from plumbing.files import check_writable
from plumbing.device import DEVICE_HELP, pick_device, synchronize, time_call
from diffusion import CHURN, DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS
from samplers import Guidance, as_guidance, check_guide
from plumbing.images import save_gif, save_grid, save_npz, save_pngs, to_uint8


def classes_in_turn(n, num_classes):
    """(n,) labels 0, 1, …, K−1, 0, 1, …: image i has class i mod K, so a K-column grid shows one
    class per column and n = m·K images hold m of each."""
    return torch.arange(n) % num_classes


BATCH_PIXELS = 256 * 32 * 32     # a default batch holds 256 images of 32×32, or as many pixels at a larger size


def default_batch_size(image_size):
    """256 images up to 32×32; fewer above, so that a batch holds 256·32² pixels (64×64: 64). On the
    2-core CPU, one call of the 64×64 faces model took 5.9 ms per image at batch 64, 6.4 at 125,
    7.6 at 250 and at 32: a batch that outgrows the cache costs more than the calls it saves.
    A larger --batch-size suits a GPU."""
    return max(1, min(256, BATCH_PIXELS // image_size ** 2))


def batches(n, batch_size, labels=None, device="cpu"):
    """Yield (b, y) for n images in batches of batch_size: the batch's size and its labels on `device`
    ((b,) ints), or None for an unconditional model. generate.py's loop and sample_images share it."""
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        yield b, (labels[start:start + b].to(device) if labels is not None else None)


@torch.no_grad()
def sample_images(diffusion, n, *, batch_size=None, seed=0, labels=None, progress=True, trajectory_every=None,
                  **settings):
    """Draw n images batch by batch -> (N, H, W, C) uint8 numpy (and the first batch's trajectory
    if trajectory_every is set). labels: (n,) int tensor or None; settings: sampler, steps, eta,
    guidance (GaussianDiffusion.reverse_steps' keywords). All noise comes from one CPU generator
    seeded with `seed`, so the images do not depend on the device. batch_size: default_batch_size."""
    batch_size = batch_size or default_batch_size(diffusion.image_size)
    generator = torch.Generator().manual_seed(seed)
    device = diffusion.betas.device
    images, trajectory = [], None
    for b, y in batches(n, batch_size, labels, device):
        every = trajectory_every if trajectory is None else None
        out = diffusion.sample(b, labels=y, generator=generator, progress=progress, trajectory_every=every,
                               **settings)
        x, trajectory = out if every else (out, trajectory)
        images.append(to_uint8(x))
        if progress and n > batch_size:
            print(f"  {sum(map(len, images))}/{n} images")
    images = np.concatenate(images)
    return (images, trajectory) if trajectory_every else images


class SamplingError(ValueError):
    """Sampling settings a model cannot take; .setting names which one ("steps", "class", …)."""

    def __init__(self, setting, message):
        super().__init__(message)
        self.setting = setting


def resolve_class(value, num_classes, class_names=None):
    """A class as a name ("cat") or an index ("3", 3) -> int, or SamplingError listing the choices."""
    names = default_class_names(num_classes, class_names)
    if str(value) in names:
        return names.index(str(value))
    if str(value).lstrip("-").isdigit() and 0 <= int(value) < num_classes:
        return int(value)
    raise SamplingError("class", f"unknown class {value!r}; this model knows {num_classes} classes: "
                        + ", ".join(f"{i}={name}" for i, name in enumerate(names)))


def resolve_sampling(diffusion, config, *, sampler, steps, n, class_=None, guidance=0.0, cap_steps=False,
                     guide=False):
    """The one check of the sampling settings against a model, for generate.py, fid.py and app.py.

    -> (steps the sampler will take, labels (n,) or None, class index or None). class_ None means
    the classes in turn on a conditional model. cap_steps: a default `steps` above the model's T
    is taken as T (a model with a short chain); without it, it is refused. Raises SamplingError
    saying what was wrong and what to do; the scripts turn it into one line (SystemExit, gr.Error).
    guide: a guide model is given (autoguidance), so w needs no classes."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SamplingError("n", f"the number of images must be a whole number ≥ 1, got {n!r}")
    try:
        steps = len(diffusion.sampling_timesteps(sampler, steps, cap_steps=cap_steps))
    except ValueError as e:
        raise SamplingError("sampler" if sampler not in SAMPLERS else "steps", str(e)) from None
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
            or guidance < 0:
        raise SamplingError("guidance", f"the guidance weight w must be a number ≥ 0 (0 = none), got {guidance!r}")
    num_classes = config["model"].get("num_classes")
    if num_classes is None:
        if class_ is not None or (guidance and not guide):
            setting = "class" if class_ is not None else "guidance"
            raise SamplingError(setting, "only for class-conditional models, but this checkpoint is "
                                "unconditional (config model.num_classes is None); leave it out")
        return steps, None, None
    if class_ is None:
        return steps, classes_in_turn(n, num_classes), None
    c = resolve_class(class_, num_classes, config.get("data", {}).get("class_names"))
    return steps, torch.full((n,), c, dtype=torch.long), c


THREADS_HELP = "CPU threads for PyTorch (default: PyTorch's, one per core); 1 is faster on a busy machine"


def set_threads(threads):
    """--threads (THREADS_HELP): PyTorch's CPU threads (generate.py, fid.py, the demo, tools.benchmark), or
    SystemExit if not ≥ 1."""
    if threads < 1:
        raise SystemExit(f"error: --threads {threads}: use a whole number ≥ 1 (or leave it out: one per core)")
    torch.set_num_threads(threads)


def open_checkpoint(path, device, amp=True):
    """load_for_sampling, with every CheckpointError turned into a one-line exit message."""
    try:
        return load_for_sampling(path, device, amp)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None


def default_checkpoint(trained, shipped):
    """No --ckpt: the checkpoint your training wrote, else the shipped model (saying so), else `trained`,
    whose absence open_checkpoint then reports with the command that makes it."""
    if os.path.exists(trained) or not os.path.exists(shipped):
        return trained
    print(f"no {trained} here (train one with train_*.py): sampling the shipped model {shipped}")
    return shipped


# The samplers in one line, for every --sampler flag (generate.py, fid.py, the trainers' --sample-sampler).
SAMPLER_HELP = ("ddpm: DDPM Algorithm 2 (ancestral; respaced below T steps); ddim: DDIM eq. 12 (η = 0: "
                "deterministic); edm: EDM Alg. 2 (stochastic Heun with churn); dpmpp2m: DPM-Solver++(2M), an ODE solver")


# The best sampling measured for a model, by the dataset it learned (docs/samplers.md, "Guidance levers"):
# generate.py, generate_cifar.py and the demo sample this way when no sampling flag is given. CIFAR-10:
# EDM's Heun over 50 calls with churn 0 (deterministic), w = 3 only where 0.28 < σ ≤ 5.42 (66 calls per
# image): FID-10k 17.1 for the shipped model, against 28.4 for the plain default (and 17.6 for churn 5,
# w = 2). Any sampling flag turns it off, and the flags left out then take PLAIN_SAMPLING's values:
# ancestral DDPM, 50 steps, w = 0.
BEST_SAMPLING = {
    "cifar10": dict(sampler="edm", steps=50, churn=0.0, guidance=3.0, guidance_interval=(0.28, 5.42)),
}
PLAIN_SAMPLING = dict(sampler=DEFAULT_SAMPLER, eta=0.0, guidance=0.0)
SAMPLING_FLAGS = ("sampler", "steps", "eta", "churn", "guidance", "guidance_interval", "guide")   # None: left out


def best_sampling(config):
    """This model's best measured sampling (BEST_SAMPLING, by the config's dataset), or None. Only for a
    class-conditional model trained with label dropout: guidance needs its unconditional output."""
    best = BEST_SAMPLING.get(config.get("dataset"))
    guidable = config["model"].get("num_classes") and (config.get("diffusion") or {}).get("cond_drop_prob")
    return dict(best) if best and guidable else None


def best_sampling_flags(best):
    """BEST_SAMPLING's entry as the command-line flags that ask for it."""
    lo, hi = best["guidance_interval"]
    return (f"--sampler {best['sampler']} --steps {best['steps']} --churn {best['churn']:g} "
            f"--guidance {best['guidance']:g} --guidance-interval {lo:g} {hi:g}")


def fill_sampling(args, config):
    """The sampling flags left out (None) -> this model's best sampling where no sampling flag was given
    and the script offers it (args.best_sampling: generate.py, generate_cifar.py; not fid.py, whose
    scores keep the flags they name), else PLAIN_SAMPLING. Says which, in one line, when it is the best."""
    given = any(getattr(args, flag) is not None for flag in SAMPLING_FLAGS)
    best = best_sampling(config) if getattr(args, "best_sampling", False) and not given else None
    for key, value in {**PLAIN_SAMPLING, **(best or {})}.items():
        if key == "steps":
            args.default_steps = value           # a default: capped at a short chain's T, never refused
        elif getattr(args, key) is None:
            setattr(args, key, value)
    if best:
        print(f"no sampling flags: this {config['dataset']} model's best measured sampling, "
              f"{best_sampling_flags(best)} (docs/samplers.md); any sampling flag gives the plain defaults instead "
              "(ancestral DDPM, 50 steps, w = 0)")


def add_sampling_args(p, n=64, steps=DEFAULT_STEPS, best=False):
    """The flags that say how to sample a checkpoint; generate.py, generate_cifar.py and fid.py share them.
    steps: the default --steps (None: all T for ddpm, 50 for the others). best: with no sampling flag
    given, sample the model's BEST_SAMPLING where it has one (fill_sampling)."""
    p.set_defaults(best_sampling=best)
    best_words = "; with no sampling flag at all, a CIFAR-10 model's best measured sampling instead" if best else ""
    p.add_argument("--sampler", default=None, choices=SAMPLERS,
                   help=f"{SAMPLER_HELP} (default: {DEFAULT_SAMPLER}{best_words})")
    p.add_argument("--steps", type=int, default=None,
                   help="network evaluations per image, 1 … T (a guided one costs two calls); T with ddpm is "
                        "Algorithm 2's full chain (default: "
                        + (f"{steps}, at most T)" if steps else "all T for ddpm, 50 for the others)"))
    p.set_defaults(default_steps=steps)
    p.add_argument("--eta", type=float, default=None, help="DDIM η in [0, 1]: 0 deterministic, 1 ≈ DDPM (default: 0)")
    p.add_argument("--churn", type=float, default=None,
                   help=f"edm: S_churn, the noise added back per step (0 = deterministic Heun; default: {CHURN:g})")
    p.add_argument("--n", type=int, default=n, help="number of images (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward pass (default: 256, fewer above 32×32 so a batch holds as many "
                        "pixels: 64 at 64×64)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; same seed, same images (default: 0)")
    p.add_argument("--class", dest="class_", metavar="CLASS", default=None,
                   help="conditional models: a class name or index for every image (default: classes in turn)")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"guidance weight w: (1+w)·cond − w·uncond, classifier-free (default: 0{best_words})")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("SIGMA_LO", "SIGMA_HI"), default=None,
                   help="apply w only where SIGMA_LO < σ_t ≤ SIGMA_HI, σ_t = √((1−ᾱ_t)/ᾱ_t), one network call "
                        "elsewhere (Kynkäänniemi et al. 2024; e.g. 0.28 5.42; 0 inf: every step; default: every step)")
    p.add_argument("--guide", metavar="CKPT", default=None,
                   help="autoguidance (Karras et al. 2024): (1+w)·model − w·guide, the guide a shorter-trained or "
                        "smaller model of the same recipe, in place of the unconditional output; works for "
                        "unconditional models too (default: none, classifier-free)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="run the network in bf16 where that is fast: CUDA, and CPUs with AVX512-BF16 or AMX "
                        "(--no-amp: float32; default: on)")
    p.add_argument("--clip-denoised", action=argparse.BooleanOptionalAction, default=None,
                   help="clamp each step's x̂_0 to [−1, 1] (DDPM's code; --no-clip-denoised: the equations as "
                        "written; default: the checkpoint's, off for train_mnist.py's models)")
    return p


def build_parser(description=__doc__, ckpt="checkpoints/mnist_ema.pt", n=64,
                 grid="samples/<run>_<sampler><steps><w>.png", steps=DEFAULT_STEPS, shipped="pretrained/mnist.pt"):
    """ckpt: the default --ckpt, what the trainer writes; shipped: the model in pretrained/ used where
    ckpt does not exist, so that a fresh clone samples without training."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None,
                   help=f"checkpoint written by train_*.py or ship.py (default: {ckpt}, or the shipped {shipped} "
                        "where that does not exist)")
    p.set_defaults(trained_ckpt=ckpt, shipped_ckpt=shipped)
    add_sampling_args(p, n, steps, best=True)
    p.add_argument("--grid", default=None, help=f"grid PNG (default: {grid}; <w>: the guidance, e.g. _w3_s0.28-5.42)")
    p.add_argument("--no-grid", action="store_true", help="do not write a grid")
    p.add_argument("--ncol", type=int, default=None, help="grid columns (default: K classes, else √n)")
    p.add_argument("--out", default=None, help="folder for one PNG per image (00000.png, …)")
    p.add_argument("--npz", default=None, help=".npz with uint8 images N×H×W×C under key 'images' (for fid.py)")
    p.add_argument("--gif", default=None, help="animated GIF of the first batch's trajectory (x_t | x̂_0)")
    p.add_argument("--gif-frames", type=int, default=50, help="about this many GIF frames (default: %(default)s)")
    return p


def open_from_args(args):
    """The checks of the flags that need no model, then the checkpoint (args.ckpt, else the trained or
    the shipped default) opened on args.device -> (GaussianDiffusion with the EMA weights, config)."""
    if args.threads is not None:
        set_threads(args.threads)
    if args.batch_size is not None and args.batch_size < 1:
        raise SystemExit("error: --batch-size must be at least 1")
    if args.eta is not None and not 0 <= args.eta <= 1:
        raise SystemExit(f"error: --eta {args.eta}: DDIM's η is in [0, 1] (0 deterministic, 1 the DDPM posterior's "
                         "noise); above 1 a step would add more noise than it removes")
    if args.churn is not None and ((args.sampler or DEFAULT_SAMPLER) != "edm" or args.churn < 0):
        raise SystemExit(f"error: --churn {args.churn}: only for --sampler edm, and ≥ 0 (0 = deterministic Heun)")
    check_outputs(args)
    if args.ckpt is None:
        args.ckpt = default_checkpoint(args.trained_ckpt, args.shipped_ckpt)
    diffusion, config = open_checkpoint(args.ckpt, pick_device(args.device), args.amp)
    fill_sampling(args, config)                  # the flags left out: the model's best sampling, or the plain defaults
    return diffusion, config


def check_outputs(args):
    """The output flags (generate.py, generate_cifar.py), checked before the sampling that they would
    otherwise fail after: counts at least 1, files in folders that can be written, --out a folder."""
    for flag in ("ncol", "gif_frames", "per_class", "zoom"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{flag.replace('_', '-')} {value}: must be at least 1")
    for flag in ("grid", "npz", "gif"):
        path = getattr(args, flag, None)
        if path and Path(path).is_dir():
            raise SystemExit(f"error: --{flag} {path} is a folder; give a file name in it")
        if path:
            check_writable(Path(path).absolute().parent, f"--{flag}")
    out = getattr(args, "out", None)
    if out and Path(out).exists() and not Path(out).is_dir():
        raise SystemExit(f"error: --out {out} is a file; give a folder for the PNGs (made if missing)")
    if out:
        check_writable(out, "--out")


def settings_from_args(args, diffusion, config):
    """The sampling flags checked against the model (resolve_sampling) and printed in one line, with
    what the model has seen and an estimate of the time -> (diffusion.sample's keywords: sampler,
    steps, eta, guidance, clip_denoised, churn; labels (n,) or None; the resolved settings)."""
    args.batch_size = args.batch_size or default_batch_size(diffusion.image_size)
    requested = args.steps if args.steps is not None else getattr(args, "default_steps", None)
    try:
        steps, labels, _ = resolve_sampling(diffusion, config, sampler=args.sampler, steps=requested, n=args.n,
                                            class_=args.class_, guidance=args.guidance, cap_steps=args.steps is None,
                                            guide=args.guide is not None)
    except SamplingError as e:
        raise SystemExit(f"error: --{e.setting}: {e}") from None
    guidance = guidance_from_args(args, diffusion)
    churn = {"churn": args.churn} if args.sampler == "edm" and args.churn is not None else {}
    calls = guidance.calls(diffusion.sigma_table, diffusion.sampling_timesteps(args.sampler, steps, **churn),
                           labels=labels is not None)
    dataset = config.get("dataset", "model")
    run_name = config.get("train", {}).get("run_name") or dataset      # the name the trainer gave its files
    names = config.get("data", {}).get("class_names")
    label_desc = "unconditional"
    if labels is not None:
        label_desc = (f"class {names[labels[0]] if names else int(labels[0])} for all" if args.class_ is not None
                      else "classes in turn (i mod K)")
    resolved = {"ckpt": args.ckpt, "run": run_name, "dataset": dataset, "image": f"{diffusion.image_size}×{diffusion.image_size}×{diffusion.channels}",
                "T": diffusion.num_timesteps, "schedule": diffusion.schedule, "objective": diffusion.objective,
                "sampler": args.sampler, "steps": steps, "eta": args.eta if args.sampler == "ddim" else None,
                "churn": (CHURN if args.churn is None else args.churn) if args.sampler == "edm" else None,
                "labels": label_desc, "guidance": args.guidance if labels is not None or args.guide else None,
                "guidance_interval": args.guidance_interval, "guide": args.guide,
                "clip_denoised": diffusion.clips(args.clip_denoised), "n": args.n, "batch_size": args.batch_size,
                "seed": args.seed, "device": str(diffusion.betas.device),
                "precision": "bf16 autocast" if diffusion.amp else "float32"}
    print("generate: " + ", ".join(f"{k}={v}" for k, v in resolved.items() if v is not None))
    describe_training(diffusion, config, shipped=getattr(args, "shipped_ckpt", None), ckpt=args.ckpt)
    print(f"about {estimate_seconds(diffusion, min(args.batch_size, args.n), args.n, calls):.0f} s to sample "
          f"{args.n} images ({steps} steps{f', {calls} network calls each with guidance' if calls > steps else ''}; "
          f"timed here on a warm call)")
    resolved["calls"] = calls
    settings = dict(sampler=args.sampler, steps=steps, eta=args.eta, guidance=guidance,
                    clip_denoised=args.clip_denoised, **churn)
    return settings, labels, resolved


def guidance_from_args(args, diffusion):
    """--guidance, --guidance-interval and --guide -> a samplers.Guidance (the guide loaded beside the
    model, on its device), or one line saying what was wrong."""
    lo, hi = args.guidance_interval or (0.0, math.inf)
    guide = None
    if args.guide is not None:
        if not args.guidance:
            raise SystemExit("error: --guide: autoguidance needs a weight, e.g. --guidance 1")
        guide, _ = open_checkpoint(args.guide, diffusion.betas.device, args.amp)
        try:
            check_guide(diffusion, guide)
        except ValueError as e:
            raise SystemExit(f"error: --guide {args.guide}: {e}") from None
    try:
        return as_guidance(Guidance(args.guidance, lo, hi, guide))
    except ValueError as e:
        raise SystemExit(f"error: --guidance-interval: {e}") from None


def guidance_tag(resolved):
    """A file-name tag for the guidance settled in `resolved`: "" without, "_w1" for classifier-free
    w = 1, "_w2_s0.28-5.42" in a σ interval, "_w1_guide" for autoguidance; so that a guided grid
    never overwrites an unguided one."""
    if not resolved.get("guidance"):
        return ""
    tag = f"_w{resolved['guidance']:g}"
    if resolved.get("guidance_interval"):
        tag += "_s{:g}-{:g}".format(*resolved["guidance_interval"])
    return tag + ("_guide" if resolved.get("guide") else "")


def gif_every(args, steps):
    """--gif: keep every k-th step of the first batch's trajectory, for about --gif-frames frames; else None."""
    return max(1, steps // args.gif_frames) if getattr(args, "gif", None) else None


def timed(resolved, n, t0, device):
    """After sampling n images since t0 (time.perf_counter): the seconds into `resolved`, and one line."""
    synchronize(device)
    resolved["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"sampled {n} images in {resolved['seconds']} s ({n / max(resolved['seconds'], 1e-9):.1f} img/s)")


def sample_from_args(args):
    """generate.py's steps in one call, for fid.py --ckpt and generate_cifar.py: open the checkpoint,
    check the flags, sample -> (images uint8 N×H×W×C, labels or None, resolved settings, config,
    trajectory or None)."""
    diffusion, config = open_from_args(args)
    settings, labels, resolved = settings_from_args(args, diffusion, config)
    trajectory_every = gif_every(args, settings["steps"])
    t0 = time.perf_counter()
    out = sample_images(diffusion, args.n, labels=labels, batch_size=args.batch_size, seed=args.seed,
                        trajectory_every=trajectory_every, **settings)
    timed(resolved, args.n, t0, diffusion.betas.device)
    images, trajectory = out if trajectory_every else (out, None)
    return images, labels, resolved, config, trajectory


def describe_training(diffusion, config, shipped=None, ckpt=None):
    """One line: what the model has seen (steps, images, PFLOP, hours); a warning if under one epoch,
    naming the shipped model (`shipped`, where it exists and is not `ckpt`) to sample instead."""
    seen = getattr(diffusion, "trained", None) or {}
    if seen.get("step") is None:
        return
    images = seen_in_all(seen)["images_seen"] if seen.get("images_seen") is not None else None
    line = f"checkpoint: trained {compute_words(seen)}"
    if seen.get("before"):                     # --init-from: the weights it started from had seen these
        line += f" from weights that had seen {compute_words(seen['before'])}; {compute_words(seen_in_all(seen))} in all"
    print(line)
    n_data = config.get("data", {}).get("num_images")
    if images is not None and n_data and images < n_data:
        instead = (f"; for the shipped model, pass --ckpt {shipped}" if shipped and os.path.exists(shipped)
                   and not (ckpt and os.path.exists(ckpt) and os.path.samefile(ckpt, shipped)) else "")
        print(f"warning: this model has seen {images:,} images, less than one pass over its {n_data:,} training "
              f"images: expect its samples to be mostly noise{instead}")


def compute_words(seen):
    """{step, images_seen, train_flops, train_seconds} -> "32,282 steps, 2,066,048 images, 5 PFLOP, 7.81 h"."""
    images, flops, hours = seen.get("images_seen"), seen.get("train_flops"), (seen.get("train_seconds") or 0) / 3600
    return (f"{seen['step']:,} steps" + (f", {images:,} images" if images else "")
            + (f", {flops / 1e15:.3g} PFLOP" if flops else "") + (f", {hours:.2f} h" if hours else ""))


@torch.no_grad()
def estimate_seconds(diffusion, batch, n, calls):
    """Seconds to sample n images at `calls` network calls each, from a warm timed call at this batch size."""
    device = diffusion.betas.device
    x = torch.zeros(batch, diffusion.channels, diffusion.image_size, diffusion.image_size, device=device)
    t = torch.full((batch,), diffusion.num_timesteps - 1, dtype=torch.long, device=device)
    return time_call(lambda: diffusion.network(x, t), device) * calls * math.ceil(n / batch)


def write_outputs(args, images, labels, resolved, config, trajectory=None, grid=True):
    """Write what the flags ask for: the grid (unless --no-grid or grid=False), PNGs, .npz, GIF."""
    dataset, steps = resolved["dataset"], resolved["steps"]
    name = resolved["run"]
    num_classes = config["model"].get("num_classes")
    ncol = args.ncol or (num_classes if labels is not None and args.class_ is None and args.n >= num_classes else None)
    if grid and not args.no_grid:
        path = args.grid or os.path.join("samples", f"{name}_{args.sampler}{steps}{guidance_tag(resolved)}.png")
        save_grid(images[:256], path, ncol)
        print(f"wrote grid {path} ({min(args.n, 256)} images)")
    if args.out:
        save_pngs(images, args.out)
        print(f"wrote {len(images)} PNGs to {args.out}/")
    if args.npz:
        extra = {"labels": labels.numpy()} if labels is not None else {}      # unconditional: no labels key
        save_npz(images, args.npz, **extra, dataset=dataset, sampler=args.sampler, steps=steps, eta=args.eta,
                 churn=resolved["churn"], calls=resolved["calls"], guidance=args.guidance,
                 guidance_tag=guidance_tag(resolved), seed=args.seed, ckpt=os.path.basename(args.ckpt))
        print(f"wrote {args.npz}: images {images.shape} uint8")
    if args.gif:
        save_gif(trajectory, args.gif, ncol)
        print(f"wrote {args.gif} ({len(trajectory)} frames)")
