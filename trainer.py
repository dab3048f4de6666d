"""The one training loop that train_mnist.py, train_cifar.py and train_celeba.py share.

Each script passes a dict of defaults (and optional presets such as --small) to main(); every
default is a command-line flag, and `python train_<dataset>.py --help` lists them all.

    per step:  x_0 ~ data, L = diffusion.loss(x_0)  (eq. 14)  -> backward -> clip ‖g‖ to 1.0
               -> AdamW step at lr·min(1, step/warmup) -> EMA update

Outputs (only rank 0 writes):
    <ckpt-dir>/<run>.pt, <run>_ema.pt       full state for --resume; EMA weights for sampling
    <sample-dir>/<run>_step<N>.png          grids from the EMA model, fixed noise
    <log-dir>/<run>/log.csv, loss.png       loss, grad norm, lr, img/s; eval.csv with --eval-every

Exactness: data order is a function of (seed, epoch, position), and the checkpoint stores the
RNG states, so on the CPU a resumed run equals the uninterrupted one bit for bit. A step whose
gradient is NaN/inf is skipped (no optimiser or EMA update); several in a row abort the run.
DDP switches on when torchrun sets RANK: `torchrun --nproc_per_node=N train_cifar.py`.
"""

import argparse
import copy
import csv
import math
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

import data
from checkpoint import CheckpointError, load_checkpoint, pick_device, save_checkpoint
from diffusion import OBJECTIVES, SCHEDULES, VARIANCES, GaussianDiffusion
from ema import EMA
from unet import UNet

# Every flag and its default; a train_*.py script overrides some of them.
DEFAULTS = dict(
    # data
    dataset="mnist", run_name=None, data_dir=None, image_size=None, limit_data=0, flip=False,
    class_cond=False, cond_drop_prob=0.1,
    # model (UNet)
    base_channels=32, channel_mults=[1, 2, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0,
    # diffusion
    timesteps=1000, schedule="linear", objective="eps", variance="beta_tilde",
    # optimisation
    steps=10_000, max_minutes=None, batch_size=128, lr=2e-4, weight_decay=0.0, warmup_steps=1000,
    grad_clip=1.0, ema_decay=0.9999, ema_warmup=False, max_nan_steps=5,
    # feedback and outputs
    log_every=50, sample_every=1000, sample_count=64, sample_sampler="ddpm", sample_steps=100, save_every=5000,
    eval_every=0, eval_samples=1000, ckpt_dir="checkpoints", sample_dir="samples", log_dir="runs",
    resume=False, overwrite=False,
    # system
    seed=0, device="auto", amp=True, compile=False, num_workers=4,
    # test hooks (hidden from --help)
    debug_nan_steps=[], debug_dump_dir=None,
)
# Settings that fix the weights' shapes or the diffusion process: a resumed run must keep them.
ARCH_KEYS = ("dataset", "image_size", "class_cond", "base_channels", "channel_mults", "num_res_blocks",
             "attn_resolutions", "timesteps", "schedule", "objective", "variance")
# Settings of one session, never taken from the checkpoint on --resume.
SESSION_KEYS = ("resume", "overwrite", "device", "data_dir", "ckpt_dir", "sample_dir", "log_dir", "max_minutes",
                "num_workers", "amp", "compile", "debug_nan_steps", "debug_dump_dir")


def int_list(text):
    """"1,2,2" -> [1, 2, 2]; "" or "none" -> []."""
    text = text.strip().lower()
    if text in ("", "none", "[]"):
        return []
    try:
        return [int(v) for v in text.replace(" ", "").strip("[]()").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,2; got {text!r}") from None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the script's docstring as written and shows every default."""


def build_parser(defaults, presets, description):
    p = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    B = argparse.BooleanOptionalAction
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="mnist, cifar10, faces (faces64.npz), a folder of images, or an .npz file "
                                     "with uint8 'images' N×H×W×C")
    g.add_argument("--data-dir", help="folder with <name>_train.npz / faces64.npz (default: $DDPM_DATA, else "
                                      "./data; on the project machines ../shared/data)")
    g.add_argument("--image-size", type=int, help="resize images to this side in pixels (default: the dataset's own; "
                                                  "64 for a folder of images)")
    g.add_argument("--limit-data", type=int, help="train on this many images spread over the set (0 = all); "
                                                  "for quick experiments and tests")
    g.add_argument("--flip", action=B, help="random horizontal flips (not for digits)")
    g.add_argument("--class-cond", action=B, help="condition on the class label (needs a labelled dataset); "
                                                  "enables classifier-free guidance at sampling time")
    g.add_argument("--cond-drop-prob", type=float, help="share of labels replaced by the null label in training (CFG)")
    g = p.add_argument_group("model (UNet)")
    g.add_argument("--base-channels", type=int, help="channels of the first level")
    g.add_argument("--channel-mults", type=int_list, help="per-level channel multipliers, e.g. 1,2,2,2; each level "
                                                          "after the first halves the resolution")
    g.add_argument("--num-res-blocks", type=int, help="residual blocks per level")
    g.add_argument("--attn-resolutions", type=int_list, help="feature-map sides (pixels) with self-attention, "
                                                             "e.g. 16; 'none' for no attention")
    g.add_argument("--dropout", type=float, help="dropout inside residual blocks")
    g = p.add_argument_group("diffusion")
    g.add_argument("--timesteps", type=int, help="T, the number of noising steps")
    g.add_argument("--schedule", choices=sorted(SCHEDULES), help="β schedule")
    g.add_argument("--objective", choices=OBJECTIVES, help="what the network predicts: ε (DDPM), x_0 or v")
    g.add_argument("--variance", choices=VARIANCES, help="reverse-step variance σ_t²: β̃_t or β_t")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help="total optimiser steps (the run stops at this step)")
    g.add_argument("--max-minutes", type=float, help="wall-clock budget in minutes for this session; the run "
                                                     "stops cleanly, saves and can be --resume'd")
    g.add_argument("--batch-size", type=int, help="images per step, summed over all processes")
    g.add_argument("--lr", type=float, help="peak AdamW learning rate")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (DDPM used none)")
    g.add_argument("--warmup-steps", type=int, help="linear learning-rate warmup, in steps")
    g.add_argument("--grad-clip", type=float, help="clip the gradient's global norm to this")
    g.add_argument("--ema-decay", type=float, help="EMA decay per step (0.9999 ≈ a 10k-step average)")
    g.add_argument("--ema-warmup", action=B, help="EMA decay min(decay, (1+n)/(10+n)): for short runs")
    g.add_argument("--max-nan-steps", type=int, help="abort after this many non-finite steps in a row")
    g = p.add_argument_group("feedback and outputs")
    g.add_argument("--log-every", type=int, help="steps between CSV log rows")
    g.add_argument("--sample-every", type=int, help="steps between sample grids from the EMA model, also drawn "
                                                    "at the end (0 = no grids)")
    g.add_argument("--sample-count", type=int, help="images per sample grid")
    g.add_argument("--sample-sampler", choices=("ddpm", "ddim"), help="sampler for the grids: ancestral DDPM on "
                   "a respaced chain, or deterministic DDIM (which leaves noisy backgrounds on young models)")
    g.add_argument("--sample-steps", type=int, help="sampling steps for the grids")
    g.add_argument("--save-every", type=int, help="steps between checkpoints (also saved at the end and on "
                                                  "Ctrl-C / SIGTERM)")
    g.add_argument("--eval-every", type=int, help="steps between fid.proxy_metrics evaluations (0 = off)")
    g.add_argument("--eval-samples", type=int, help="generated images per evaluation")
    g.add_argument("--run-name", help="names the checkpoint, sample and log files; None = the dataset's name")
    g.add_argument("--ckpt-dir", help="folder for <run>.pt (full state) and <run>_ema.pt (for generate.py)")
    g.add_argument("--sample-dir", help="folder for <run>_step<N>.png sample grids")
    g.add_argument("--log-dir", help="folder for <run>/log.csv, loss.png and eval.csv")
    g.add_argument("--resume", action="store_true", help="continue <ckpt-dir>/<run>.pt with its settings; "
                                                         "flags given now override them (e.g. a larger --steps)")
    g.add_argument("--overwrite", action="store_true", help="start afresh even if <ckpt-dir>/<run>.pt exists")
    g = p.add_argument_group("system")
    g.add_argument("--seed", type=int, help="seeds the weights, the noise and the data order")
    g.add_argument("--device", help="auto (CUDA, then Apple MPS, then CPU), cuda, mps or cpu")
    g.add_argument("--amp", action=B, help="bf16 autocast on CUDA (ignored elsewhere)")
    g.add_argument("--compile", action=B, help="torch.compile the UNet (CUDA; minutes to compile, faster after)")
    g.add_argument("--num-workers", type=int, help="DataLoader workers, used only for a dataset that does not fit "
                                                   "on the GPU")
    g.add_argument("--debug-nan-steps", type=int_list, help=argparse.SUPPRESS)     # test hook
    g.add_argument("--debug-dump-dir", help=argparse.SUPPRESS)
    for name, (_, help_text) in presets.items():
        p.add_argument(f"--{name}", action="store_true", help=f"preset: {help_text}")
    p.set_defaults(**defaults)
    return p


_UNSET = object()


def parse_args(defaults, argv=None, presets=None, description=None):
    """-> (args, explicit): the resolved flags and the names given on the command line."""
    presets = presets or {}
    argv = sys.argv[1:] if argv is None else list(argv)
    unknown = set(defaults) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown default(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    merged = {**DEFAULTS, **defaults}
    for name, (values, _) in presets.items():
        if f"--{name}" in argv:
            merged.update(values)
    parser = build_parser(merged, presets, description)
    # Parse into a namespace pre-filled with a marker: argparse leaves it wherever no flag was
    # given, which tells the explicit flags apart from defaults (needed by --resume).
    dests = [a.dest for a in parser._actions if a.dest != "help"]
    ns = parser.parse_args(argv, argparse.Namespace(**{d: _UNSET for d in dests}))
    explicit = {d for d in dests if getattr(ns, d) is not _UNSET}
    for d in dests:
        if getattr(ns, d) is _UNSET:
            setattr(ns, d, parser.get_default(d))
    ns.run_name = ns.run_name or Path(str(ns.dataset)).stem
    return ns, explicit


# ----------------------------------------------------------------------------- helpers

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


def all_agree(flag, device, world):
    """True if `flag` is true on any rank (so that all ranks stop at the same step)."""
    if world == 1:
        return bool(flag)
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state      # numpy / python `random` are not used by training (the data order is stateless)


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def all_finite(tensors):
    return all(bool(torch.isfinite(v).all()) for v in tensors if v.is_floating_point())


class RunLog:
    """log.csv (one row per --log-every steps), eval.csv and loss.png under <log-dir>/<run>/."""

    FIELDS = ["step", "loss", "grad_norm", "lr", "img_per_s", "minutes", "nan_skipped"]

    def __init__(self, folder, resume_step=None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rows = self._read("log.csv", resume_step)
        self.eval_rows = self._read("eval.csv", resume_step)
        self._write("log.csv", self.FIELDS, self.rows)
        if self.eval_rows:
            self._write("eval.csv", list(self.eval_rows[0]), self.eval_rows)

    def _read(self, name, resume_step):
        """On resume keep the rows up to the checkpoint's step (later ones were never saved)."""
        path = self.folder / name
        if resume_step is None or not path.exists():
            return []
        with open(path, newline="") as f:
            return [r for r in csv.DictReader(f) if int(float(r["step"])) <= resume_step]

    def _write(self, name, fields, rows):
        with open(self.folder / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def log(self, row):
        self.rows.append(row)
        with open(self.folder / "log.csv", "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.FIELDS, extrasaction="ignore").writerow(row)

    def log_eval(self, row):
        self.eval_rows.append(row)
        self._write("eval.csv", list(row), self.eval_rows)

    def plot(self, title):
        if not self.rows:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        steps = [int(float(r["step"])) for r in self.rows]
        loss = [float(r["loss"]) for r in self.rows]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss (mean over --log-every steps)")
        k = max(1, len(loss) // 20)                                         # moving average
        if len(loss) > k > 1:
            smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
            ax.plot(steps, smooth, lw=1.5, label=f"moving average of {k}")
        ax.set(xlabel="step", ylabel="L_simple (MSE)", yscale="log", title=title)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.folder / "loss.png", dpi=100)
        plt.close(fig)


# ----------------------------------------------------------------------------- the run

def resolve_resume(args, explicit, say=print):
    """With --resume: load <ckpt-dir>/<run>.pt and take its settings, except the flags given now."""
    path = Path(args.ckpt_dir) / f"{args.run_name}.pt"
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise SystemExit(f"--resume: {e}")
    if "optimizer" not in ckpt:
        raise SystemExit(f"--resume: {path} holds no optimiser state (is it an _ema.pt file?)")
    saved = ckpt["config"]["train"]
    for key, value in saved.items():
        if key in SESSION_KEYS or not hasattr(args, key):
            continue
        if key in explicit and getattr(args, key) != value:
            if key in ARCH_KEYS:
                raise SystemExit(f"--resume: {path} was trained with --{key.replace('_', '-')} {value}; it cannot "
                                 f"change to {getattr(args, key)} (start a new run with another --run-name)")
            say(f"note: --{key.replace('_', '-')} changes from {value} to {getattr(args, key)} on resume"
                  + ("; the run will not reproduce an uninterrupted one" if key in ("seed", "batch_size") else ""))
            continue
        setattr(args, key, value)
    return ckpt


def make_config(args, images, class_names, num_classes):
    model_kwargs = dict(in_channels=images.shape[1], base_channels=args.base_channels,
                        channel_mults=list(args.channel_mults), num_res_blocks=args.num_res_blocks,
                        attn_resolutions=list(args.attn_resolutions), dropout=args.dropout,
                        image_size=images.shape[-1], num_classes=num_classes)
    diffusion_kwargs = dict(image_size=images.shape[-1], channels=images.shape[1], timesteps=args.timesteps,
                            schedule=args.schedule, objective=args.objective, variance=args.variance,
                            cond_drop_prob=args.cond_drop_prob)
    train = {k: v for k, v in vars(args).items() if not k.startswith("debug_")}
    # "dataset" is what data.load_dataset takes (fid.py reloads the real images from it); the
    # file names use args.run_name ("celeba" trains on dataset "faces").
    return {"dataset": str(args.dataset), "model": model_kwargs, "diffusion": diffusion_kwargs,
            "data": {"name": str(args.dataset), "image_size": images.shape[-1], "channels": images.shape[1],
                     "class_names": class_names},
            "train": train}


def train(args, explicit):
    t_start = time.time()
    device, rank, world = setup_distributed(args)
    master = rank == 0
    say = print if master else (lambda *a, **k: None)

    ckpt_path = Path(args.ckpt_dir) / f"{args.run_name}.pt"
    ckpt = None
    if args.resume:
        ckpt = resolve_resume(args, explicit, say)
    elif ckpt_path.exists() and not args.overwrite:
        raise SystemExit(f"{ckpt_path} already exists: pass --resume to continue it, --overwrite to start afresh "
                         "and replace it, or another --ckpt-dir / --run-name")

    # ---------------------------------------------------------------- data
    try:
        images, labels, class_names = data.load_dataset(args.dataset, args.data_dir, args.image_size, train=True)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    images, labels = data.subset(images, labels, args.limit_data)
    num_classes = None
    if args.class_cond:
        if labels is None:
            raise SystemExit(f"--class-cond: dataset {args.dataset} has no labels; train without --class-cond")
        num_classes = len(class_names) if class_names else int(labels.max()) + 1
        class_names = class_names or [str(i) for i in range(num_classes)]
    else:
        class_names = None     # an unconditional model knows no classes
    config = make_config(args, images, class_names, num_classes)
    batches = data.Batches(images, labels if args.class_cond else None, args.batch_size, seed=args.seed,
                           flip=args.flip, device=device, rank=rank, world_size=world, num_workers=args.num_workers)

    # ---------------------------------------------------------------- model, optimiser, EMA
    torch.manual_seed(args.seed)
    model = UNet(**config["model"]).to(device)
    diffusion = GaussianDiffusion(model, **config["diffusion"]).to(device)
    ema_model = copy.deepcopy(model).eval().requires_grad_(False)
    ema_diffusion = GaussianDiffusion(ema_model, **config["diffusion"]).to(device)     # samples with EMA weights
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    ema = EMA(model, args.ema_decay, warmup=args.ema_warmup)
    step, nan_skipped, nan_streak, elapsed_before = 0, 0, 0, 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        ema.load_state_dict(ckpt["ema"])
        batches.load_state_dict(ckpt["data_state"])
        step, nan_skipped, nan_streak = ckpt["step"], ckpt["nan_skipped"], ckpt["nan_streak"]
        elapsed_before = ckpt.get("train_seconds", 0.0)
        states = ckpt.get("rng_ranks") or [ckpt["rng"]]
        if len(states) == world:
            set_rng_state(states[rank], device)
        else:                       # resumed on another number of processes: fresh noise streams
            torch.manual_seed(args.seed + 1000 * rank + step)
    elif world > 1:
        torch.manual_seed(args.seed + 1000 * rank)     # same initial weights, different noise per rank

    use_cuda = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_cuda and args.amp)
    train_model = model
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        model.to(memory_format=torch.channels_last)
    if args.compile:
        train_model = torch.compile(model)              # `model` (uncompiled) is what gets saved
    if world > 1:
        train_model = DDP(train_model, device_ids=[device.index] if use_cuda else None)

    n_params = sum(p.numel() for p in model.parameters())
    say(f"=== {args.run_name}: {len(images)} images {tuple(images.shape[1:])}, classes: {class_names}")
    say(f"=== UNet {n_params / 1e6:.2f}M parameters on {device}"
        f"{f' × {world} processes (DDP)' if world > 1 else ''}"
        f"{', bf16 autocast' if use_cuda and args.amp else ''}{', compiled' if args.compile else ''}")
    say(textwrap.fill("=== config: " + "  ".join(f"{k}={v}" for k, v in sorted(config["train"].items())),
                      width=110, subsequent_indent="    ", break_long_words=False, break_on_hyphens=False))
    if ckpt is not None:
        say(f"=== resuming {ckpt_path} at step {step} (epoch {batches.epoch}, batch {batches.index})")
    if step >= args.steps:
        say(f"{ckpt_path} is already at step {step} ≥ --steps {args.steps}; pass a larger --steps to train on")
        return

    runlog = RunLog(Path(args.log_dir) / args.run_name, step if ckpt is not None else None) if master else None

    # ---------------------------------------------------------------- save, sample, evaluate

    def save():
        states = [None] * world
        if world > 1:
            dist.all_gather_object(states, rng_state(device))
        if not master:
            return
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        ema_state = ema.state_dict()
        ema_state["shadow"] = {k: v.cpu() for k, v in ema_state["shadow"].items()}
        if not (all_finite(weights.values()) and all_finite(ema_state["shadow"].values())):
            raise SystemExit(f"refusing to save non-finite weights at step {step}; "
                             f"the last good checkpoint is {ckpt_path}")
        full = {"config": config, "model": weights, "ema": ema_state, "optimizer": opt.state_dict(),
                "step": step, "rng": rng_state(device), "data_state": batches.state_dict(),
                "nan_skipped": nan_skipped, "nan_streak": nan_streak,
                "train_seconds": elapsed_before + time.time() - t_loop,
                "versions": {"torch": str(torch.__version__)}}
        if world > 1:
            full["rng_ranks"] = states
        save_checkpoint(full, ckpt_path)
        dtypes = {k: v.dtype for k, v in weights.items()}
        save_checkpoint({"config": config, "ema_model": {k: v.to(dtypes[k]) for k, v in ema_state["shadow"].items()},
                         "step": step}, ckpt_path.with_name(f"{args.run_name}_ema.pt"))

    def sample_grid():
        from generate import save_grid, to_uint8
        ema.copy_to(ema_model)
        n, nrow = args.sample_count, max(1, int(math.sqrt(args.sample_count)))
        labels_ = None
        if num_classes:                                     # one column per class, full rows
            nrow = min(num_classes, 16)
            n = math.ceil(n / nrow) * nrow
            labels_ = torch.arange(n, device=device) % num_classes
        gen = torch.Generator().manual_seed(1234)          # the same x_T at every step: comparable grids
        with torch.random.fork_rng(devices=[device] if use_cuda else []):
            x = ema_diffusion.sample(n, sampler=args.sample_sampler, steps=args.sample_steps, labels=labels_,
                                     generator=gen, progress=False)
        path = Path(args.sample_dir) / f"{args.run_name}_step{step}.png"
        save_grid(to_uint8(x), path, ncol=nrow)
        return path

    def evaluate():
        try:
            import fid
        except ImportError as e:
            tqdm.write(f"--eval-every: cannot import fid.py ({e}); evaluation is off for this run")
            args.eval_every = 0
            return
        ema.copy_to(ema_model)
        try:
            with torch.random.fork_rng(devices=[device] if use_cuda else []):
                metrics = fid.proxy_metrics(ema_diffusion, config, data_dir=args.data_dir,
                                            num_samples=args.eval_samples, device=device, ckpt_dir=args.ckpt_dir)
        except Exception as e:            # a broken evaluation must not end a long training run
            tqdm.write(f"eval @ step {step} failed ({type(e).__name__}: {e}); training goes on")
            return
        row = {"step": step, **{k: float(v) if isinstance(v, (int, float)) else v for k, v in metrics.items()}}
        runlog.log_eval(row)
        tqdm.write(f"eval @ step {step}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in row.items() if k != "step"))

    # ---------------------------------------------------------------- stop on Ctrl-C / SIGTERM
    stop = {"signal": None}

    def on_signal(signum, frame):
        if stop["signal"] is not None:                      # second Ctrl-C: leave now, no save
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name
        if master:
            tqdm.write(f"{stop['signal']}: finishing this step, then saving {ckpt_path} (Ctrl-C again to quit "
                       "without saving)")

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    # ---------------------------------------------------------------- the loop
    t_loop = time.time()
    t_log, n_log, loss_sum, gnorm_sum, n_ok = time.time(), 0, 0.0, 0.0, 0
    pbar = tqdm(total=args.steps, initial=step, disable=not master, dynamic_ncols=True, desc=args.run_name)
    reason = "reached --steps"
    try:
        while step < args.steps:
            x0, y = next(batches)                                               # (B/W, C, H, W) in [−1, 1]
            if use_cuda:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup_steps))    # linear warmup
            for group in opt.param_groups:
                group["lr"] = lr
            with amp:
                loss = diffusion.loss(x0, y, model=train_model)                # eq. 14
            if step + 1 in args.debug_nan_steps:
                loss = loss * float("nan")                                      # test hook
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            step += 1
            # With DDP the gradients are already averaged, so every rank takes the same decision.
            if torch.isfinite(grad_norm):
                opt.step()
                ema.update(model)
                nan_streak = 0
                loss_sum, gnorm_sum, n_ok = loss_sum + loss.item(), gnorm_sum + grad_norm.item(), n_ok + 1
            else:
                nan_skipped, nan_streak = nan_skipped + 1, nan_streak + 1
                if master:
                    tqdm.write(f"step {step}: loss {loss.item()}, gradient norm {grad_norm.item()}: skipped "
                               f"({nan_streak} in a row, {nan_skipped} in all)")
                if nan_streak >= args.max_nan_steps:
                    raise SystemExit(f"aborting: {nan_streak} non-finite steps in a row at step {step}. The weights "
                                     f"were not touched by them; the last checkpoint is {ckpt_path}. Try a lower "
                                     f"--lr, a longer --warmup-steps, or --no-amp.")
            pbar.update(1)
            n_log += 1

            if master and (step % args.log_every == 0 or step == args.steps):
                dt = time.time() - t_log
                img_s = n_log * args.batch_size / max(dt, 1e-9)
                row = {"step": step, "loss": loss_sum / n_ok if n_ok else math.nan,
                       "grad_norm": gnorm_sum / n_ok if n_ok else math.nan,
                       "lr": lr, "img_per_s": img_s, "minutes": (elapsed_before + time.time() - t_loop) / 60,
                       "nan_skipped": nan_skipped}
                runlog.log(row)
                budget = {} if args.max_minutes is None else {     # the bar's ETA is for --steps; this is for the clock
                    "min_left": f"{max(0.0, args.max_minutes - (time.time() - t_start) / 60):.1f}"}
                pbar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{img_s:.0f}", lr=f"{lr:.2g}", **budget)
                loss_sum, gnorm_sum, n_ok, t_log, n_log = 0.0, 0.0, 0, time.time(), 0

            t_pause = time.time()
            sample_now = args.sample_every and step % args.sample_every == 0
            eval_now = args.eval_every and step % args.eval_every == 0
            if sample_now and master:
                tqdm.write(f"step {step}: samples in {sample_grid()}")
                runlog.plot(f"{args.run_name}: training loss")
            if eval_now and master:
                evaluate()
            if world > 1 and (sample_now or eval_now):
                dist.barrier()                              # the other ranks wait for rank 0
            if args.save_every and step % args.save_every == 0 and step < args.steps:
                save()
            t_log += time.time() - t_pause                 # img/s counts training time only

            out_of_time = args.max_minutes is not None and time.time() - t_start >= 60 * args.max_minutes
            if all_agree(out_of_time or stop["signal"] is not None, device, world):
                reason = stop["signal"] or f"--max-minutes {args.max_minutes} used up"
                break
    finally:
        pbar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)

    # ---------------------------------------------------------------- the end: save, sample, plot
    save()
    if master:
        say(f"=== stopped at step {step} ({reason}) after {(time.time() - t_start) / 60:.1f} min; "
            f"saved {ckpt_path} and {ckpt_path.with_name(f'{args.run_name}_ema.pt')}")
        if nan_skipped:
            say(f"=== {nan_skipped} non-finite steps were skipped")
        if args.sample_every and step % args.sample_every:
            say(f"=== samples in {sample_grid()}")
        runlog.plot(f"{args.run_name}: training loss")
    if args.debug_dump_dir:                                   # test hook: each rank's final weights
        Path(args.debug_dump_dir).mkdir(parents=True, exist_ok=True)
        torch.save({"model": {k: v.cpu() for k, v in model.state_dict().items()},
                    "ema": {k: v.cpu() for k, v in ema.shadow.items()}},
                   Path(args.debug_dump_dir) / f"rank{rank}.pt")


def main(defaults, argv=None, presets=None, description=None):
    """Parse the command line over `defaults` (and `presets`: {name: (values, help)}) and train."""
    args, explicit = parse_args(defaults, argv, presets, description)
    try:
        train(args, explicit)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
