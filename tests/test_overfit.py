"""A tiny UNet trained with GaussianDiffusion.loss memorises 8 fixed images: the whole stack learns."""

import statistics

import pytest
import torch

from diffusion import GaussianDiffusion
from unet import UNet



def test_tiny_unet_overfits_8_fixed_images():
    torch.manual_seed(0)
    images = (torch.rand(8, 1, 8, 8) > 0.5).float() * 2 - 1                   # 8 fixed ±1 patterns
    batch = images.repeat(4, 1, 1, 1)                                          # (32, 1, 8, 8): 4 draws of t, ε each
    model = UNet(in_channels=1, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                 attn_resolutions=(), dropout=0.0, image_size=8)
    diffusion = GaussianDiffusion(model, image_size=8, channels=1, timesteps=100)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)

    losses = []
    for _ in range(200):
        loss = diffusion.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    # a fresh model predicts ε = 0, so L_simple starts at E‖ε‖² = 1
    assert losses[0] == pytest.approx(1.0, abs=0.15)
    first, last = statistics.mean(losses[:10]), statistics.mean(losses[-10:])
    assert last < 0.3 * first, (first, last)
