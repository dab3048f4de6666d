"""Speed of the training step and of sampling, for each trainer's default model. Prints numbers;
asserts nothing (speed targets live here, never in the unit tests).

    python -m tools.benchmark                                  # all five configs (three trainers, --small, --cpu)
    python -m tools.benchmark --config cifar --batch-size 128 --compile   # the DDPM CIFAR-10 model on a GPU
    python -m tools.benchmark --config mnist --threads 2 --steps 20

A training step is what trainer.py does per batch: loss (eq. 14), backward, gradient clipping,
AdamW, EMA update, on random images of the right shape (the data pipeline is not timed). The
sampling figure is one network evaluation at the given batch (without guidance), from which DDIM
50-step and DDPM 1000-step throughput follow.
"""

import argparse
import platform

import torch

from plumbing.device import DEVICE_HELP, bf16_fast, cuda_fast_settings, pick_device
from plumbing.sampling import THREADS_HELP, set_threads
from tools.speed import CONFIGS, build, measure, trainer_settings


def bench(name, args, device):
    settings, image_size, channels = trainer_settings(name)
    batch = args.batch_size or settings["batch_size"]
    torch.manual_seed(0)
    model, diffusion = build(settings, image_size, channels)
    train_img_s, eval_img_s = measure(model, diffusion, device, batch, args.steps, args.warmup, args.compile, args.amp)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{name:12s} {params:6.2f}M params  {channels}×{image_size}×{image_size}  batch {batch:4d}  "
          f"train {train_img_s:8.1f} img/s  net eval {1000 * batch / eval_img_s:7.1f} ms -> "
          f"DDIM-50 {eval_img_s / 50:8.2f} img/s, DDPM-1000 {eval_img_s / 1000:7.3f} img/s", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS) + ["all"], default="all", help="which trainer's default model")
    p.add_argument("--batch-size", type=int, help="images per step (default: the trainer's)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (cuDNN autotune, compile)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast where it is fast: CUDA, CPUs with AVX512-BF16 or AMX")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    args = p.parse_args(argv)
    if args.threads is not None:
        set_threads(args.threads)
    device = pick_device(args.device)
    if device.type == "cuda":
        cuda_fast_settings()
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device {device} ({hw}); torch {torch.__version__}; bf16 autocast {args.amp and bf16_fast(device)}; "
          f"compile {args.compile}; {args.steps} timed steps after {args.warmup} warmup")
    for name in (CONFIGS if args.config == "all" else [args.config]):
        bench(name, args, device)


if __name__ == "__main__":
    main()
