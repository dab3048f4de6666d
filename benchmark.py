"""Speed of the training step and of sampling, for each trainer's default model. Prints numbers;
asserts nothing (speed targets live here, never in the unit tests).

    python benchmark.py                                  # all three default configs, this machine
    python benchmark.py --config cifar --batch-size 128 --compile   # the DDPM CIFAR-10 model on a GPU
    python benchmark.py --config mnist --threads 2 --steps 20

A training step is what trainer.py does per batch: loss (eq. 14), backward, gradient clipping,
AdamW, EMA update, on random images of the right shape (the data pipeline is not timed). The
sampling figure is one network evaluation at the given batch (without guidance), from which DDIM
50-step and DDPM 1000-step throughput follow.
"""

import argparse
import platform
import time

import torch

import train_celeba
import train_cifar
import train_mnist
from checkpoint import pick_device, synchronize as sync
from diffusion import GaussianDiffusion
from ema import EMA
from unet import UNet

CONFIGS = {
    "mnist": (train_mnist.DEFAULTS, 28, 1),
    "cifar": (train_cifar.DEFAULTS, 32, 3),
    "cifar-small": ({**train_cifar.DEFAULTS, **train_cifar.PRESETS["small"][0]}, 32, 3),
    "celeba": (train_celeba.DEFAULTS, 64, 3),
}


def build(defaults, image_size, channels):
    model = UNet(in_channels=channels, base_channels=defaults["base_channels"],
                 channel_mults=defaults["channel_mults"], num_res_blocks=defaults["num_res_blocks"],
                 attn_resolutions=defaults["attn_resolutions"], dropout=defaults["dropout"], image_size=image_size)
    return model, GaussianDiffusion(model, image_size, channels, timesteps=defaults.get("timesteps", 1000))


def bench(name, args, device):
    defaults, image_size, channels = CONFIGS[name]
    batch = args.batch_size or defaults["batch_size"]
    torch.manual_seed(0)
    model, diffusion = build(defaults, image_size, channels)
    model.to(device)
    diffusion.to(device)
    cuda = device.type == "cuda"
    if cuda:
        model.to(memory_format=torch.channels_last)
    train_model = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = EMA(model, 0.9999)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and args.amp)
    x0 = torch.rand(batch, channels, image_size, image_size, device=device) * 2 - 1
    if cuda:
        x0 = x0.contiguous(memory_format=torch.channels_last)

    def train_step():
        with amp:
            loss = diffusion.loss(x0, model=train_model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)

    for _ in range(args.warmup):
        train_step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step()
    sync(device)
    train_s = (time.perf_counter() - t0) / args.steps

    model.eval()
    t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
    with torch.no_grad(), amp:
        for _ in range(args.warmup):
            train_model(x0, t)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            train_model(x0, t)
        sync(device)
    eval_s = (time.perf_counter() - t0) / args.steps

    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{name:12s} {params:6.2f}M params  {channels}×{image_size}×{image_size}  batch {batch:4d}  "
          f"train {batch / train_s:8.1f} img/s ({1000 * train_s:7.1f} ms/step)  "
          f"net eval {1000 * eval_s:7.1f} ms -> DDIM-50 {batch / (50 * eval_s):8.2f} img/s, "
          f"DDPM-1000 {batch / (1000 * eval_s):7.3f} img/s", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS) + ["all"], default="all", help="which trainer's default model")
    p.add_argument("--batch-size", type=int, help="images per step (default: the trainer's)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (cuDNN autotune, compile)")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device {device} ({hw}); torch {torch.__version__}; amp {args.amp and device.type == 'cuda'}; "
          f"compile {args.compile}; {args.steps} timed steps after {args.warmup} warmup")
    for name in (CONFIGS if args.config == "all" else [args.config]):
        bench(name, args, device)


if __name__ == "__main__":
    main()
