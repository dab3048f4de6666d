"""Images in and out of the model's range, and the files they are written to.

    to_model_range(uint8) -> [−1, 1];  to_uint8([−1, 1]) -> uint8, the inverse (NonFiniteImages for NaN pixels)
    make_grid, to_pil, save_grid, save_pngs, save_npz (for fid.py), save_gif (x_t beside x̂_0)

Arrays are (N, H, W, C) uint8 on the way out, C = 1 (grey) or 3 (colour).
"""

import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_model_range(x):
    """uint8 images (N, C, H, W) -> float32 in [−1, 1]: x/127.5 − 1 (DDPM §4: data scaled to [−1, 1])."""
    return x.float() / 127.5 - 1.0


class NonFiniteImages(ValueError):
    """Samples with NaN or infinite pixels, which a cast to uint8 would turn into black without a word."""


def to_uint8(x):
    """(N, C, H, W) float in [−1, 1] -> (N, H, W, C) uint8 numpy array, the inverse of to_model_range;
    NonFiniteImages where a pixel is NaN or infinite (checked on the host copy: no extra synchronisation)."""
    x = x.detach().float().cpu()
    bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
    if bad:
        raise NonFiniteImages(f"{bad} of {len(x)} images have NaN or infinite pixels: the network's output was "
                              "not finite (a damaged checkpoint, or reduced precision overflowing on this device: "
                              "try --no-amp or --device cpu); nothing was written from them")
    x = ((x.clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_grid(images, ncol=None, padding=2, pad_value=255):
    """(N, H, W, C) uint8 -> one (rows·(H+p)+p, ncol·(W+p)+p, C) uint8 image, filled row by row."""
    n, h, w, c = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = img
    return grid


def to_pil(array):
    """(H, W, C) uint8 with C = 1 or 3 -> PIL image ("L" or "RGB")."""
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def ensure_parent(path):
    """Create the folder a file is about to be written to."""
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)


def save_grid(images, path, ncol=None):
    ensure_parent(path)
    to_pil(make_grid(images, ncol)).save(path)


def save_pngs(images, folder):
    """One PNG per image: folder/00000.png, 00001.png, …"""
    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(images):
        to_pil(img).save(os.path.join(folder, f"{i:05d}.png"))


def save_npz(images, path, **meta):
    """uint8 (N, H, W, C) under key "images", plus plain metadata (sampler, steps, …) that fid.py prints.
    Only arrays of numbers and strings: np.load(path) reads it without pickle."""
    ensure_parent(path)
    extra = {k: np.asarray("" if v is None else v) for k, v in meta.items()}
    np.savez(path, images=images, **extra)


def save_gif(trajectory, path, ncol=None, max_images=64, frame_ms=60, hold_ms=1500):
    """Animate a sample(..., trajectory_every=k) trajectory: x_t on the left, x̂_0 on the right.

    trajectory: list of (t, x_t, x̂_0), each (N, C, H, W) on the CPU. x_t is clamped to [−1, 1]
    for display (early x_t are mostly noise with values beyond that range).
    """
    if ncol:
        max_images = max(ncol, max_images // ncol * ncol)                   # whole rows only
    frames = []
    for t, xt, x0 in trajectory:
        left = make_grid(to_uint8(xt[:max_images]), ncol)
        right = make_grid(to_uint8(x0[:max_images]), ncol)
        h, w, c = left.shape
        header = 14
        canvas = np.full((h + header, 2 * w + 8, c), 255, np.uint8)
        canvas[header:, :w] = left
        canvas[header:, w + 8:] = right
        frame = to_pil(canvas).convert("RGB")
        draw = ImageDraw.Draw(frame)
        draw.text((2, 1), f"x_t  t={t + 1:.0f}", fill=(0, 0, 0))        # paper's step t+1 (t is 0-based; EDM's fractional)
        draw.text((w + 10, 1), "predicted x_0", fill=(0, 0, 0))
        frames.append(frame)
    durations = [frame_ms] * (len(frames) - 1) + [hold_ms]
    ensure_parent(path)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
