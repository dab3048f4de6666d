"""The trainers' command line: every setting, its default, its allowed range, and --resume's rules.

    args, explicit = parse_args(script_defaults, argv, presets, description)

Each train_<dataset>.py overrides some DEFAULTS; every default is a flag (`--help` lists them
all). A value outside its range is refused at parse time in one line that names the flag and
the range; settings that conflict with each other are refused before any data is loaded.
With --resume, the checkpoint's settings come back, except the flags given now.
checkpoint.make_config turns the resolved flags into the config every checkpoint stores.
"""

import argparse
import json
import math
import sys
from pathlib import Path

from diffusion import (DEFAULT_SAMPLER, DEFAULT_STEPS, LOSS_WEIGHTINGS, OBJECTIVES, P_MEAN, SAMPLERS, SCHEDULES,
                       T_SAMPLINGS, VARIANCES, GaussianDiffusion)
from plumbing.device import DEVICE_HELP
from plumbing.sampling import SAMPLER_HELP

# Every flag and its default; a train_*.py script overrides some of them.
DEFAULTS = dict(
    # data
    dataset="mnist", run_name=None, data_dir=None, image_size=None, limit_data=0, flip=False,
    class_cond=False, cond_drop_prob=0.1,
    # model (UNet)
    base_channels=32, channel_mults=[1, 2, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0,
    # diffusion
    timesteps=1000, schedule="linear", objective="eps", variance="beta_tilde", clip_denoised=True,
    loss_weighting="simple", min_snr_gamma=5.0, t_sampling="uniform", lognormal_mean=P_MEAN,
    # optimisation
    steps=10_000, max_pflop=None, budget_minutes=None, max_minutes=None, batch_size=128, lr=2e-4, lr_schedule="constant", weight_decay=0.0,
    warmup_steps=1000,
    grad_clip=1.0, ema_decay=0.9999, ema_warmup=False, ema_extra_decays=[], max_nan_steps=5,
    # feedback and outputs
    log_every=50, sample_every=1000, sample_count=64, sample_sampler=DEFAULT_SAMPLER, sample_steps=DEFAULT_STEPS, save_every=5000,
    eval_every=0, eval_samples=1000, ckpt_dir="checkpoints", sample_dir="samples", log_dir="runs",
    tensorboard=None, resume=False, overwrite=False, init_from=None,
    # system
    seed=0, device="auto", amp=True, compile=False, num_workers=4,
    # test hooks (hidden from --help)
    debug_nan_steps=[], debug_dump_dir=None, debug_sync_free=False, debug_stop_step=0,
)
LR_SCHEDULES = ("constant", "linear", "cosine")
# Settings that fix the weights' shapes or the diffusion process: a resumed run must keep them.
ARCH_KEYS = ("dataset", "image_size", "class_cond", "base_channels", "channel_mults", "num_res_blocks",
             "attn_resolutions", "timesteps", "schedule", "objective", "variance", "loss_weighting")
# What a checkpoint that predates these settings was trained with (its config has no such key).
BEFORE_OPTION = {"loss_weighting": "simple", "min_snr_gamma": 5.0, "lr_schedule": "constant",
                 "clip_denoised": True, "t_sampling": "uniform", "max_pflop": None, "budget_minutes": None,
                 "lognormal_mean": P_MEAN, "ema_extra_decays": [], "init_from": None}
# Settings of one session, never taken from the checkpoint on --resume.
SESSION_KEYS = ("resume", "overwrite", "device", "data_dir", "ckpt_dir", "sample_dir", "log_dir", "max_minutes",
                "num_workers", "amp", "compile", "tensorboard", "debug_nan_steps", "debug_dump_dir", "debug_sync_free",
                "debug_stop_step")


# ----------------------------------------------------------------------------- value types

def number(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: int or float within [low, high] (open where said), else one clear line."""
    if high is None:
        allowed = f"> {low:g}" if low_open else f"≥ {low:g}"
    else:
        allowed = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    word = "a whole number" if kind is int else "a number"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {word} {allowed}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {word} {allowed}, got {text!r}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text} is out of range: use {word} {allowed}")
        return value
    return parse


def int_list(text):
    """"1,2,2" -> [1, 2, 2]; "" or "none" -> []. Every entry a whole number ≥ 1."""
    text = text.strip().lower()
    if text in ("", "none", "[]"):
        return []
    try:
        values = [int(v) for v in text.replace(" ", "").strip("[]()").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers such as 1,2,2; got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every entry must be ≥ 1, got {text!r}")
    return values


POSITIVE, COUNT, SHARE = number(int, 1), number(int, 0), number(float, 0, 1, high_open=True)


def decay_list(text):
    """"0.9995,0.9998" -> [0.9995, 0.9998]; "" or "none" -> []. Each a decay in [0, 1), none twice."""
    text = text.strip().lower()
    if text in ("", "none", "[]"):
        return []
    values = [SHARE(v) for v in text.replace(" ", "").strip("[]()").split(",") if v]
    if len(set(values)) < len(values):
        raise argparse.ArgumentTypeError(f"a decay is given twice in {text!r}; list each once")
    return values


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the script's docstring as written and shows each default once, lists as 1,2,4."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        default = action.default
        if isinstance(default, (list, tuple)):
            default = ",".join(map(str, default)) or "none"
        return f"{text} (default: {str(default).replace('%', '%%')})"


# ----------------------------------------------------------------------------- the parser

def data_flags(g):
    """--help's "data" flags."""
    B = argparse.BooleanOptionalAction
    g.add_argument("--dataset", help="mnist, cifar10, faces (faces64.npz), celeba (all of CelebA, cropped once from "
                                     "img_align_celeba), a folder of images, or an .npz file "
                                     "with uint8 'images' N×H×W×C")
    g.add_argument("--data-dir", help="folder with <name>_train.npz / faces64.npz (default: $DDPM_DATA, else ./data)")
    g.add_argument("--image-size", type=POSITIVE, help="resize images to this side in pixels (default: the "
                                                       "dataset's own; 64 for a folder of images)")
    g.add_argument("--limit-data", type=COUNT, help="train on this many images spread over the set (0 = all); "
                                                    "for quick experiments and tests")
    g.add_argument("--flip", action=B, help="random horizontal flips (not for digits)")
    g.add_argument("--class-cond", action=B, help="condition on the class label (needs a labelled dataset); "
                                                  "enables classifier-free guidance at sampling time")
    g.add_argument("--cond-drop-prob", type=SHARE, help="share of labels replaced by the null label in training "
                                                        "(CFG), in [0, 1)")


def model_flags(g):
    """--help's "model (UNet)" flags."""
    g.add_argument("--base-channels", type=POSITIVE, help="channels of the first level")
    g.add_argument("--channel-mults", type=int_list, help="per-level channel multipliers, e.g. 1,2,2,2; each level "
                                                          "after the first halves the resolution")
    g.add_argument("--num-res-blocks", type=POSITIVE, help="residual blocks per level")
    g.add_argument("--attn-resolutions", type=int_list, help="feature-map sides (pixels) with self-attention, "
                                                             "e.g. 16; 'none' for no attention")
    g.add_argument("--dropout", type=SHARE, help="dropout inside residual blocks, in [0, 1)")


def diffusion_flags(g):
    """--help's "diffusion" flags."""
    B = argparse.BooleanOptionalAction
    g.add_argument("--timesteps", type=number(int, 2), help="T, the number of noising steps (≥ 2)")
    g.add_argument("--schedule", choices=sorted(SCHEDULES), help="β schedule")
    g.add_argument("--objective", choices=OBJECTIVES, help="what the network predicts: ε (DDPM), x_0 or v")
    g.add_argument("--variance", choices=VARIANCES, help="reverse-step variance σ_t²: β̃_t or β_t")
    g.add_argument("--clip-denoised", action=B, help="the model's sampling default: clamp each step's x̂_0 to "
                   "[−1, 1] (DDPM's code; generate.py --no-clip-denoised overrides it)")
    g.add_argument("--loss-weighting", choices=LOSS_WEIGHTINGS, help="weight of each t in the loss: simple (DDPM "
                   "eq. 14, all alike) or min_snr (Hang et al. 2023, Min-SNR-γ)")
    g.add_argument("--min-snr-gamma", type=number(float, 0, low_open=True), help="γ of --loss-weighting min_snr")
    g.add_argument("--t-sampling", choices=T_SAMPLINGS, help="how training draws t: uniform (DDPM Alg. 1) or "
                   "lognormal (EDM's ln σ ~ N(−1.2, 1.2²): the steps where the loss can still fall)")
    g.add_argument("--lognormal-mean", type=number(float, -5, 5),
                   help="the mean of ln σ for --t-sampling lognormal (EDM: −1.2; higher spends more steps on "
                        "heavy noise, as larger images need)")


def optimisation_flags(g):
    """--help's "optimisation" flags."""
    B = argparse.BooleanOptionalAction
    g.add_argument("--steps", type=POSITIVE, help="total optimiser steps (the run stops at this step)")
    g.add_argument("--max-pflop", type=number(float, 0, low_open=True),
                   help="the run's training budget in PFLOP (10^15; 3 × forward FLOPs × images seen), over all "
                        "its sittings: the lr schedule spans it, --resume goes on towards it, the run stops at it")
    g.add_argument("--budget-minutes", type=number(float, 0, low_open=True),
                   help="the run's budget in training minutes over all its sittings (like --max-pflop, in time)")
    g.add_argument("--max-minutes", type=number(float, 0, low_open=True),
                   help="wall-clock limit in minutes for this sitting, start-up and the final grid included; "
                        "the run stops cleanly, saves and can be --resume'd. Without --max-pflop or "
                        "--budget-minutes it is also the run's budget for --lr-schedule")
    g.add_argument("--batch-size", type=POSITIVE, help="images per step, summed over all processes")
    g.add_argument("--lr", type=number(float, 0, low_open=True), help="peak AdamW learning rate")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                   help="after warmup: constant (DDPM), or decay to 0 over the run, linear or cosine; the run's "
                        "end is the first reached of --steps, --max-pflop and --budget-minutes (without those "
                        "two, --max-minutes)")
    g.add_argument("--weight-decay", type=number(float, 0), help="AdamW weight decay (DDPM used none)")
    g.add_argument("--warmup-steps", type=COUNT, help="linear learning-rate warmup, in steps")
    g.add_argument("--grad-clip", type=number(float, 0, low_open=True), help="clip the gradient's global norm to this")
    g.add_argument("--ema-decay", type=SHARE, help="EMA decay per step, in [0, 1) (0.9999 ≈ a 10k-step average)")
    g.add_argument("--ema-warmup", action=B, help="EMA decay min(decay, (1+n)/(10+n)): for short runs")
    g.add_argument("--ema-extra-decays", type=decay_list, metavar="D1,D2",
                   help="more EMA decays kept beside --ema-decay, e.g. 0.9995,0.9998, to choose the EMA length "
                        "after training: each is written at every save to <run>_ema<decay>.pt (sampled like "
                        "<run>_ema.pt), with the same --ema-warmup. On --resume, a decay added starts from the "
                        "current weights and one left out is no longer updated (a line says which)")
    g.add_argument("--max-nan-steps", type=POSITIVE, help="abort after this many non-finite steps in a row")


def output_flags(g):
    """--help's "feedback and outputs" flags."""
    B = argparse.BooleanOptionalAction
    g.add_argument("--log-every", type=POSITIVE, help="steps between CSV / TensorBoard rows (step 1 is logged too)")
    g.add_argument("--sample-every", type=COUNT, help="steps between sample grids from the EMA model, also drawn "
                                                      "at the end (0 = no grids)")
    g.add_argument("--sample-count", type=POSITIVE, help="images per sample grid (the end-of-run grid may be "
                                                         "smaller, to keep it within a few %% of the run)")
    g.add_argument("--sample-sampler", choices=SAMPLERS, help=f"sampler for the grids; {SAMPLER_HELP}")
    g.add_argument("--sample-steps", type=POSITIVE, help="sampling steps for the grids, 1 … --timesteps")
    g.add_argument("--save-every", type=COUNT, help="steps between checkpoints (also saved at the end and on "
                                                    "Ctrl-C / SIGTERM; 0 = only then)")
    g.add_argument("--eval-every", type=COUNT, help="steps between proxy-FID evaluations (0 = off)")
    g.add_argument("--eval-samples", type=POSITIVE, help="generated images per evaluation")
    g.add_argument("--run-name", help="names the checkpoint, sample and log files (default: the dataset's name)")
    g.add_argument("--ckpt-dir", help="folder for <run>.pt (full state) and <run>_ema.pt (for generate.py)")
    g.add_argument("--sample-dir", help="folder for <run>_step<N>.png sample grids")
    g.add_argument("--log-dir", help="folder for <run>/log.csv, loss.png, eval.csv and TensorBoard events")
    g.add_argument("--tensorboard", action=B, help="TensorBoard event log in <log-dir>/<run>/ (default: on when "
                                                   "the tensorboard package is installed)")
    g.add_argument("--resume", action="store_true", help="continue <ckpt-dir>/<run>.pt with its settings; "
                                                         "flags given now override them (e.g. a larger --steps)")
    g.add_argument("--overwrite", action="store_true", help="start afresh even if <ckpt-dir>/<run>.pt exists")
    g.add_argument("--init-from", metavar="CKPT",
                   help="a new run whose weights start from CKPT's EMA weights (a finished run's _ema.pt, or "
                        "pretrained/cifar10.pt), with a fresh optimiser, lr warmup and schedule, and EMA: to "
                        "continue a campaign whose lr has run out. The model flags must match CKPT's; this run's "
                        "steps and PFLOP count from 0 (CKPT's own are printed at the start)")


def system_flags(g):
    """--help's "system" flags."""
    B = argparse.BooleanOptionalAction
    g.add_argument("--seed", type=COUNT, help="seeds the weights, the noise and the data order")
    g.add_argument("--device", help=DEVICE_HELP)
    g.add_argument("--amp", action=B, help="bf16 autocast on CUDA cards with native bf16 (compute capability "
                   "≥ 8) and on CPUs with native bf16 (AVX512-BF16 or AMX); ignored elsewhere")
    g.add_argument("--compile", action=B, help="torch.compile the UNet (CUDA; minutes to compile, faster after)")
    g.add_argument("--num-workers", type=COUNT, help="DataLoader workers, used only for a dataset that does not fit "
                                                     "on the GPU")
    g.add_argument("--debug-nan-steps", type=int_list, help=argparse.SUPPRESS)     # test hook
    g.add_argument("--debug-dump-dir", help=argparse.SUPPRESS)
    g.add_argument("--debug-stop-step", type=COUNT, help=argparse.SUPPRESS)         # test hook: end a sitting
    g.add_argument("--debug-sync-free", action="store_true", help=argparse.SUPPRESS)   # the CUDA step, on a CPU
    g.add_argument("--print-config", action="store_true", help="print the resolved settings as JSON and exit "
                   "(how tools/benchmark.py reads a trainer's model)")


def build_parser(defaults, presets, description):
    """The trainers' parser: every flag, in --help's groups, over `defaults`; a --<preset> flag per preset."""
    p = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    for title, add_flags in (("data", data_flags), ("model (UNet)", model_flags), ("diffusion", diffusion_flags),
                             ("optimisation", optimisation_flags), ("feedback and outputs", output_flags),
                             ("system", system_flags)):
        add_flags(p.add_argument_group(title))
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
    if ns.print_config:
        print(json.dumps({k: v for k, v in vars(ns).items() if k != "print_config" and k not in presets}))
        raise SystemExit(0)
    del ns.print_config
    explicit.discard("print_config")
    return ns, explicit


def check_consistent(args):
    """Settings that are fine alone but not together -> SystemExit with one line, before any work."""
    problems = []
    if args.sample_every:
        process = GaussianDiffusion(None, 1, 1, timesteps=args.timesteps, schedule=args.schedule)
        try:
            process.sampling_timesteps(args.sample_sampler, args.sample_steps)
        except ValueError as e:
            problems.append(f"--sample-steps {args.sample_steps} with --timesteps {args.timesteps}: {e}; lower "
                            "--sample-steps or pass --sample-every 0")
    if args.image_size is not None:
        factor = 2 ** (len(args.channel_mults) - 1)
        if args.image_size % factor:
            problems.append(f"--image-size {args.image_size} must be divisible by {factor} (the UNet halves it "
                            f"{len(args.channel_mults) - 1} times for --channel-mults "
                            f"{','.join(map(str, args.channel_mults))})")
    if not args.channel_mults:
        problems.append("--channel-mults needs at least one level, e.g. 1,2,2")
    if args.ema_decay in args.ema_extra_decays:
        problems.append(f"--ema-extra-decays holds {args.ema_decay}, the main --ema-decay (<run>_ema.pt keeps it); "
                        "leave it out of the extras")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


def schedule_note(args):
    """A line where --schedule linear meets a --timesteps other than DDPM's 1000 (else None): its β run
    from 1e-4 to 0.02 whatever T is, so with fewer steps x_T keeps much of the image, while sampling
    starts from pure noise. The cosine schedule is defined for any T."""
    if args.schedule != "linear" or args.timesteps == 1000:
        return None
    keep = float((1 - SCHEDULES["linear"](args.timesteps)).prod().sqrt())          # √ᾱ_T = √∏(1 − β_t)
    return (f"note: --schedule linear with --timesteps {args.timesteps}: DDPM's β from 1e-4 to 0.02 were set "
            f"for T = 1000; here √ᾱ_T = {keep:.2g}, so x_T keeps {keep:.0%} of the image while sampling starts "
            "from pure noise, which costs quality. --timesteps 1000 or --schedule cosine avoid it")


def resolve_resume(args, explicit, ckpt, path, say=print):
    """With --resume: take the checkpoint's settings, except the flags given now (which are printed)."""
    # A checkpoint from before an option existed was trained as the option's neutral value says.
    saved = {**BEFORE_OPTION, **ckpt["config"]["train"]}
    for key, value in saved.items():
        if key in SESSION_KEYS or not hasattr(args, key):
            continue
        if key in explicit and getattr(args, key) != value:
            if key in ARCH_KEYS:
                raise SystemExit(f"error: --resume: {path} was trained with --{key.replace('_', '-')} {value}; it cannot "
                                 f"change to {getattr(args, key)} (start a new run with another --run-name)")
            say(f"note: --{key.replace('_', '-')} changes from {value} to {getattr(args, key)} on resume"
                + ("; the run will not reproduce an uninterrupted one" if key in ("seed", "batch_size") else ""))
            continue
        setattr(args, key, value)
