"""Speed of the training step and of sampling: the measurements that tools/benchmark.py prints and
the GPU stage's speed table (tools/gpu_stage.py) records.

    trainer_settings(config)            a trainer's resolved flags, from `python train_<x>.py --print-config`
    build(settings, size, channels)     -> (UNet, GaussianDiffusion) as that trainer builds them
    measure(model, diffusion, device, batch, steps, warmup, compile)   -> (train img/s, sample img/s)
    table(device, batch, ...)           ours and diffusers' UNet2DModel of the same architecture

A training step is what trainer.py does per batch: loss (eq. 14), backward, gradient clipping,
AdamW, EMA update, on random images of the right shape (the data pipeline is not timed). The
sampling figure is one network evaluation at the given batch (without guidance).
"""

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from plumbing.budget import training_flops
from plumbing.checkpoint import model_settings
from plumbing.device import autocast as bf16_autocast, synchronize as sync
from diffusion import GaussianDiffusion
from ema import EMA
from unet import UNet, forward_flops

# bf16 dense tensor-core peaks in TFLOP/s (NVIDIA data sheets, without sparsity), by words in the name
PEAK_BF16 = {"H100 SXM": 989.4, "H100 HBM3": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H200": 989.4,
             "A100": 312.0}
# name -> (the trainer, its preset flags, image side, channels): the models the trainers build
CONFIGS = {
    "mnist": ("train_mnist.py", [], 28, 1),
    "cifar": ("train_cifar.py", [], 32, 3),
    "cifar-small": ("train_cifar.py", ["--small"], 32, 3),
    "cifar-cpu": ("train_cifar.py", ["--cpu"], 32, 3),
    "celeba": ("train_celeba.py", [], 64, 3),
}
ROOT = Path(__file__).resolve().parents[1]


def trainer_settings(config):
    """A config's resolved training flags -> (settings dict, image side, channels), read from the
    trainer itself: `python train_<x>.py --print-config [preset]` (a script is run, never imported)."""
    script, flags, image_size, channels = CONFIGS[config]
    out = subprocess.run([sys.executable, script, "--print-config", *flags], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout), image_size, channels


def build(settings, image_size, channels):
    """The model and diffusion a trainer with these resolved settings builds (checkpoint.model_settings),
    with 10 classes when it is class-conditional."""
    args = argparse.Namespace(**settings)
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
    defaults, image_size, channels = trainer_settings(config)
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
            train_tflops = training_flops(gflops, train_img_s) / 1e3     # forward + backward ≈ 3 forwards
            rows.append({"model": name, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                         "compiled": compiled, "batch": batch, "train_img_s": round(train_img_s, 1),
                         "sample_img_s": round(sample_img_s, 1), "gflops_fwd_per_img": round(gflops, 2),
                         "train_tflops": round(train_tflops, 1),
                         "train_util_vs_bf16_peak": round(train_tflops / peak, 3) if peak else None})
            print(rows[-1], flush=True)
            del model, diffusion
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "peak_bf16_tflops": peak, "rows": rows}
