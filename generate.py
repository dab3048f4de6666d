"""Sample a trained checkpoint: a grid PNG, single PNGs, an .npz for FID, a GIF of the denoising.

    python generate.py --ckpt checkpoints/mnist_ema.pt                      # 64 images: ancestral DDPM, 50 steps
    python generate.py --ckpt checkpoints/mnist_ema.pt --steps 1000         # the paper's Algorithm 2, all T steps
    python generate.py --ckpt checkpoints/mnist_ema.pt --sampler ddim --steps 50 --gif samples/mnist.gif
    python generate.py --ckpt pretrained/cifar10.pt --n 16                  # CIFAR-10: its best sampling (below)
    python generate.py --ckpt checkpoints/cifar10_ema.pt --class cat --guidance 2 --n 16
    python generate.py --ckpt checkpoints/cifar10_ema.pt --n 50000 --batch-size 500 \\
        --npz samples/cifar10_50k.npz --no-grid                              # for fid.py

Without --ckpt it samples checkpoints/mnist_ema.pt, or on a fresh clone the shipped pretrained/mnist.pt.
Everything about the model (architecture, image size, channels, schedule, objective, class names)
comes from the config stored in the checkpoint; the flags only choose how to sample. With no
sampling flag at all (--sampler, --steps, --eta, --churn, --guidance, --guidance-interval, --guide),
a model with a best measured sampling takes it (plumbing/sampling.py's BEST_SAMPLING): for CIFAR-10,
EDM's Heun, --steps 50, churn 0, w = 3 only where 0.28 < σ ≤ 5.42 (66 calls per image, FID-10k
17.1 against 28.4 for the plain default; docs/samplers.md). Any sampling flag gives the plain
defaults for the flags left out: ancestral DDPM on 50 steps, w = 0. The same
--seed gives the same images on every device. A conditional model without --class samples the
classes in turn (image i has class i mod K), so a grid with K columns shows one class per column.
"""

import time

import numpy as np
import torch

from plumbing.images import NonFiniteImages, to_uint8
from plumbing.sampling import (batches, build_parser, gif_every, open_from_args, settings_from_args, timed,
                               write_outputs)


def main(argv=None):
    args = build_parser(__doc__).parse_args(argv)

    # 1. The checkpoint: the UNet and GaussianDiffusion rebuilt from the config it stores, EMA weights.
    diffusion, config = open_from_args(args)

    # 2. The sampler: --sampler and --steps (default: ancestral DDPM on 50 of the T steps), the labels
    #    (--class, else the classes in turn), guidance; checked against this model and printed.
    settings, labels, resolved = settings_from_args(args, diffusion, config)

    # 3. Batch by batch: x_T ~ N(0, I), then the sampler's reverse steps (diffusion.sample). All the
    #    noise comes from one CPU generator, so a seed gives the same images on every device.
    generator = torch.Generator().manual_seed(args.seed)
    keep_every = gif_every(args, settings["steps"])         # --gif: the first batch's x_t and x̂_0 along the way
    images, trajectory = [], None
    t0 = time.perf_counter()
    for b, y in batches(args.n, args.batch_size, labels, diffusion.betas.device):
        if keep_every and trajectory is None:
            x, trajectory = diffusion.sample(b, labels=y, generator=generator, trajectory_every=keep_every, **settings)
        else:
            x = diffusion.sample(b, labels=y, generator=generator, **settings)       # (b, C, H, W) in [−1, 1]
        try:
            images.append(to_uint8(x))                                               # (b, H, W, C) uint8
        except NonFiniteImages as e:
            raise SystemExit(f"error: {e}") from None
        if args.n > args.batch_size:
            print(f"  {sum(map(len, images))}/{args.n} images")
    timed(resolved, args.n, t0, diffusion.betas.device)

    # 4. The images: the grid, and --out PNGs, --npz, --gif as asked.
    write_outputs(args, np.concatenate(images), labels, resolved, config, trajectory)


if __name__ == "__main__":
    main()
