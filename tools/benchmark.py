"""Speed of the training step and of sampling, for each trainer's default model. Prints numbers;
asserts nothing (speed targets live here, never in the unit tests).

    python -m tools.benchmark                                  # all three default configs, this machine
    python -m tools.benchmark --config cifar --batch-size 128 --compile   # the DDPM CIFAR-10 model on a GPU
    python -m tools.benchmark --config mnist --threads 2 --steps 20

A training step is what trainer.py does per batch: loss (eq. 14), backward, gradient clipping,
AdamW, EMA update, on random images of the right shape (the data pipeline is not timed). The
sampling figure is one network evaluation at the given batch (without guidance), from which DDIM
50-step and DDPM 1000-step throughput follow.
"""

import argparse
import math
import platform
import time

import torch

import train_celeba
import train_cifar
import train_mnist
from plumbing.checkpoint import model_settings
from plumbing.device import autocast as bf16_autocast, bf16_fast, cuda_fast_settings, pick_device, synchronize as sync
from diffusion import GaussianDiffusion
from ema import EMA
from plumbing.train_args import parse_args
from unet import UNet, forward_flops

# bf16 dense tensor-core peaks in TFLOP/s (NVIDIA data sheets, without sparsity), by words in the name
PEAK_BF16 = {"H100 SXM": 989.4, "H100 HBM3": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H200": 989.4,
             "A100": 312.0}
CONFIGS = {
    "mnist": (train_mnist.DEFAULTS, 28, 1),
    "cifar": (train_cifar.DEFAULTS, 32, 3),
    "cifar-small": ({**train_cifar.DEFAULTS, **train_cifar.PRESETS["small"][0]}, 32, 3),
    "cifar-cpu": ({**train_cifar.DEFAULTS, **train_cifar.PRESETS["cpu"][0]}, 32, 3),
    "celeba": (train_celeba.DEFAULTS, 64, 3),
}


def build(defaults, image_size, channels):
    """The model and diffusion a trainer with these defaults builds (checkpoint.model_settings), with
    10 classes when it is class-conditional."""
    args, _ = parse_args(defaults, [])
    model_kwargs, diffusion_kwargs = model_settings(args, channels, image_size, 10 if args.class_cond else None)
    model = UNet(**model_kwargs)
    return model, GaussianDiffusion(model, **diffusion_kwargs)


class DiffusersUNet(torch.nn.Module):
    """diffusers' UNet2DModel configured to the same architecture as unet.UNet (channels, levels,
    blocks per level, attention resolutions, adaptive group norm, 2·base time embedding), behind
    our forward(x, t, labels) -> out, so that the same GaussianDiffusion trains and samples it."""

    def __init__(self, defaults, image_size, channels):
        super().__init__()
        from diffusers import UNet2DModel
        mults, base = defaults["channel_mults"], defaults["base_channels"]
        attn = [image_size // 2 ** level in defaults["attn_resolutions"] for level in range(len(mults))]
        self.net = UNet2DModel(
            sample_size=image_size, in_channels=channels, out_channels=channels,
            layers_per_block=defaults["num_res_blocks"], block_out_channels=tuple(base * m for m in mults),
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            resnet_time_scale_shift="scale_shift", attention_head_dim=64, dropout=defaults["dropout"],
            norm_num_groups=32, time_embedding_dim=2 * base)
        self.num_classes = None

    def forward(self, x, t, labels=None):
        return self.net(x, t).sample


def measure(model, diffusion, device, batch, steps, warmup, compile_model, amp=True):
    """-> (train img/s, sample img/s) of one model: a full training step (loss, backward, clip,
    AdamW, EMA) and one network evaluation in eval mode, bf16 autocast where it is fast (bf16_fast)."""
    cuda = device.type == "cuda"
    model.to(device)
    diffusion.to(device)
    if cuda:
        model.to(memory_format=torch.channels_last)
    train_model = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    ema = EMA(model, 0.9999)
    autocast = bf16_autocast(device, amp)
    channels, size = diffusion.channels, diffusion.image_size
    x0 = torch.rand(batch, channels, size, size, device=device) * 2 - 1
    if cuda:
        x0 = x0.contiguous(memory_format=torch.channels_last)

    def train_step():
        with autocast:
            loss = diffusion.loss(x0, model=train_model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)

    for _ in range(warmup):
        train_step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step()
    sync(device)
    train_s = (time.perf_counter() - t0) / steps

    model.eval()
    t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
    with torch.no_grad(), autocast:
        for _ in range(warmup):
            train_model(x0, t)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            train_model(x0, t)
        sync(device)
    eval_s = (time.perf_counter() - t0) / steps
    model.train()
    return batch / train_s, batch / eval_s


def peak_tflops(device):
    """The card's bf16 dense peak from PEAK_BF16, or None (CPU, unknown card)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16.items():
        if all(word in name for word in key.split()):
            return value
    return None


def table(device, batch=128, tiny=False, budget_s=math.inf, config="cifar"):
    """The GPU stage's speed table: ours and diffusers' equal architecture, eager and compiled.
    Rows: {model, params, compiled, train_img_s, sample_img_s, gflops_fwd, train_tflops, util}."""
    defaults, image_size, channels = CONFIGS[config]
    if tiny:
        defaults = {**defaults, "base_channels": 32, "channel_mults": [1, 2], "num_res_blocks": 1}
    peak, rows, t0 = peak_tflops(device), [], time.perf_counter()
    builders = {"ours (unet.UNet)": lambda: build(defaults, image_size, channels)[0],
                "diffusers UNet2DModel": lambda: DiffusersUNet(defaults, image_size, channels)}
    for name, make in builders.items():
        for compiled in (False, True) if device.type == "cuda" else (False,):
            if time.perf_counter() - t0 > budget_s:
                rows.append({"model": name, "compiled": compiled, "skipped": "out of time"})
                continue
            try:
                torch.manual_seed(0)
                model = make()
            except ImportError as e:
                rows.append({"model": name, "skipped": f"not installed ({e})"})
                break
            diffusion = GaussianDiffusion(model, image_size, channels)
            x = torch.zeros(2, channels, image_size, image_size)
            gflops = forward_flops(model, x, torch.zeros(2, dtype=torch.long)) / 1e9
            train_img_s, sample_img_s = measure(model, diffusion, device, batch, 2 if tiny else 20, 1 if tiny else 5,
                                                compiled)
            train_tflops = 3 * gflops * train_img_s / 1e3              # forward + backward ≈ 3 forwards
            rows.append({"model": name, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                         "compiled": compiled, "batch": batch, "train_img_s": round(train_img_s, 1),
                         "sample_img_s": round(sample_img_s, 1), "gflops_fwd_per_img": round(gflops, 2),
                         "train_tflops": round(train_tflops, 1),
                         "train_util_vs_bf16_peak": round(train_tflops / peak, 3) if peak else None})
            print(rows[-1], flush=True)
            del model, diffusion
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "peak_bf16_tflops": peak, "rows": rows}


def bench(name, args, device):
    defaults, image_size, channels = CONFIGS[name]
    batch = args.batch_size or defaults["batch_size"]
    torch.manual_seed(0)
    model, diffusion = build(defaults, image_size, channels)
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
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast where it is fast: CUDA, CPUs with AVX512-BF16 or AMX")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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
