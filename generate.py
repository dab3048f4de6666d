"""Sample a trained checkpoint: a grid PNG, single PNGs, an .npz for FID, a GIF of the denoising.

    python generate.py --ckpt checkpoints/mnist_ema.pt                      # 64 images: ancestral DDPM, 50 steps
    python generate.py --ckpt checkpoints/mnist_ema.pt --steps 1000         # the paper's Algorithm 2, all T steps
    python generate.py --ckpt checkpoints/mnist_ema.pt --sampler ddim --steps 50 --gif samples/mnist.gif
    python generate.py --ckpt checkpoints/cifar10_ema.pt --class cat --guidance 2 --n 16
    python generate.py --ckpt checkpoints/cifar10_ema.pt --n 50000 --batch-size 500 \\
        --npz samples/cifar10_50k.npz --no-grid                              # for fid.py

Without --ckpt it samples checkpoints/mnist_ema.pt, or on a fresh clone the shipped pretrained/mnist.pt.
Everything about the model (architecture, image size, channels, schedule, objective, class names)
comes from the config stored in the checkpoint; the flags only choose how to sample. The same
--seed gives the same images on every device. A conditional model without --class samples the
classes in turn (image i has class i mod K), so a grid with K columns shows one class per column.
"""

from plumbing.sampling import build_parser, sample_from_args, write_outputs


def main(argv=None):
    args = build_parser(__doc__).parse_args(argv)
    images, labels, resolved, config, trajectory = sample_from_args(args)
    write_outputs(args, images, labels, resolved, config, trajectory)


if __name__ == "__main__":
    main()
