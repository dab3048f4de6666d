"""The ε-model: a U-Net conditioned on time (and optionally a class) through adaptive group norm.

It knows nothing about diffusion. It maps a noisy image and an integer step to a tensor of the
same shape; GaussianDiffusion decides whether that tensor means ε, x_0 or v.

    forward(x, t, labels=None) -> out      x: (B, C, H, W) float, t: (B,) int (float between steps
                                           for EDM's sampler), labels: (B,) int

Architecture (Ho et al. 2020, appendix B, which follows PixelCNN++ / Wide ResNet):
  conv_in -> [ResBlock × num_res_blocks (+ attention) -> Downsample] per level -> middle
  (ResBlock, attention, ResBlock) -> [ResBlock × (num_res_blocks + 1) on concatenated skips
  (+ attention) -> Upsample] per level -> GroupNorm, SiLU, conv_out.

Departure from the paper, on purpose: the time embedding enters each residual block as the
scale and shift of its second GroupNorm, h = GN(h)·(1 + γ) + β ("adaptive group norm", as in
Dhariwal & Nichol 2021), instead of a bias added before it. To keep the DDPM CIFAR-10 model near
its published size (35.7M parameters; ours has 35.52M) the embedding is 2·base_channels wide
rather than 4·: the scale γ doubles every block's projection, and the narrower embedding pays for it.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of integer steps (Vaswani et al. 2017, as used by Ho et al.).

    t: (B,) ints or floats -> (B, dim) with [cos(t·ω_k), sin(t·ω_k)], ω_k = max_period^(−k/(dim/2)).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]                                  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)              # (B, dim) for even dim


def null_labels(num_classes, n, device=None):
    """(n,) copies of the null label, index num_classes: "no class", for classifier-free guidance
    (Ho & Salimans 2022) and for a conditional model sampled without labels."""
    return torch.full((n,), num_classes, dtype=torch.long, device=device)


def group_norm(channels):
    # 32 groups as in the paper; fewer when the width is small (tiny test and MNIST models).
    groups = math.gcd(32, channels)
    return nn.GroupNorm(groups, channels)


def zero_module(module):
    """Zero a layer's weights so the residual branch starts as the identity (and a fresh model
    predicts 0, i.e. ε ≈ 0: the loss starts at E‖ε‖² = 1 instead of something huge)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """x -> GN, SiLU, conv -> AdaGN(emb), SiLU, dropout, conv(zero init) -> + skip(x)."""

    def __init__(self, in_ch, out_ch, emb_dim, dropout):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)      # -> (γ, β) for the adaptive norm
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        gamma, beta = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)   # (B, out, 1, 1) each
        h = self.norm2(h) * (1 + gamma) + beta                                       # adaptive group norm
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Self-attention over the H·W positions, multi-head, through F.scaled_dot_product_attention."""

    def __init__(self, channels, head_dim=64):
        super().__init__()
        self.heads = channels // head_dim if channels % head_dim == 0 else 1   # heads of head_dim channels
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)                 # (B, heads, HW, C/heads) each
        h = F.scaled_dot_product_attention(q, k, v)                   # softmax(q·kᵀ/√d)·v
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """ε_θ(x_t, t[, y]).

    in_channels: image channels (1 for MNIST, 3 for colour); the output has the same count.
    base_channels, channel_mults: level i has base_channels·channel_mults[i] channels.
    num_res_blocks: residual blocks per level on the way down (one more on the way up).
    attn_resolutions: feature-map sizes (in pixels, e.g. (16,)) that get self-attention.
    dropout: inside every residual block.
    image_size: the side of the (square) input; each level but the last halves it, so it must
        divide by 2^(len(channel_mults) − 1).
    num_classes: if set, the model is class-conditional; label num_classes is the "null" label
        used for classifier-free guidance (and for labels=None).
    """

    def __init__(self, in_channels, base_channels, channel_mults, num_res_blocks,
                 attn_resolutions, dropout, image_size, num_classes=None, emb_mult=2, head_dim=64):
        super().__init__()
        channel_mults = tuple(channel_mults)
        attn_resolutions = tuple(attn_resolutions)
        factor = 2 ** (len(channel_mults) - 1)
        if image_size % factor:
            raise ValueError(f"image_size {image_size} does not halve evenly {len(channel_mults) - 1} times "
                             f"(channel_mults={channel_mults}); use fewer levels or a size divisible by {factor}")
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.base_channels = base_channels
        emb_dim = emb_mult * base_channels

        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # num_classes real labels plus one null label (index num_classes) for classifier-free guidance.
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch, res = base_channels, image_size
        for level, mult in enumerate(channel_mults):
            out = base_channels * mult
            for _ in range(num_res_blocks):
                self.down.append(self._block(ch, out, emb_dim, dropout, res in attn_resolutions, head_dim))
                ch = out
                skip_channels.append(ch)
            if level != len(channel_mults) - 1:
                self.down.append(Downsample(ch))
                res //= 2
                skip_channels.append(ch)

        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), Attention(ch, head_dim),
                                  ResBlock(ch, ch, emb_dim, dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            out = base_channels * mult
            for _ in range(num_res_blocks + 1):
                self.up.append(self._block(ch + skip_channels.pop(), out, emb_dim, dropout,
                                           res in attn_resolutions, head_dim))
                ch = out
            if level != 0:
                self.up.append(Upsample(ch))
                res *= 2

        self.norm_out = group_norm(ch)
        self.conv_out = zero_module(nn.Conv2d(ch, in_channels, 3, padding=1))

    @staticmethod
    def _block(in_ch, out_ch, emb_dim, dropout, attn, head_dim):
        layers = [ResBlock(in_ch, out_ch, emb_dim, dropout)]
        if attn:
            layers.append(Attention(out_ch, head_dim))
        return nn.ModuleList(layers)

    @staticmethod
    def _run(layer, h, emb):
        if isinstance(layer, nn.ModuleList):           # ResBlock (+ Attention)
            for sub in layer:
                h = sub(h, emb) if isinstance(sub, ResBlock) else sub(h)
            return h
        return layer(h)                                # Downsample / Upsample

    def forward(self, x, t, labels=None):
        """x: (B, C, H, W), t: (B,) steps in [0, T − 1], ints or floats (EDM), labels: (B,) ints or None -> (B, C, H, W)."""
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet built for {self.in_channels}×{self.image_size}×{self.image_size} inputs, "
                             f"got {tuple(x.shape[1:])}")
        emb = self.time_mlp(timestep_embedding(t, self.base_channels))       # (B, emb_dim)
        if self.label_emb is not None:
            if labels is None:                                               # unconditional = null label
                labels = null_labels(self.num_classes, t.shape[0], t.device)
            emb = emb + self.label_emb(labels)
        elif labels is not None:
            raise ValueError("labels were given to an unconditional UNet (built with num_classes=None)")

        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = self._run(layer, h, emb)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(layer, h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def forward_flops(model, x, t, labels=None):
    """FLOPs of one forward pass per image (torch.utils.flop_counter; a multiply-add counts 2).
    Convolutions, matmuls and attention are counted; norms and activations are not. Training an
    image costs about 3 × this (forward, and a backward of twice the forward)."""
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    model.eval()                                   # no dropout: the count draws no random numbers
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x, t, labels) if labels is not None else model(x, t)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / x.shape[0]
