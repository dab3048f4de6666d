"""Ship a trained model: its EMA weights in half precision, with its config, what it has seen and
its measured quality, into pretrained/, where generate.py and the demo open it on a fresh clone.

    python -m tools.ship ~/ddpm-cifar/cifar10_ema.pt pretrained/cifar10.pt --quality "FID-10k 28.4 (DDPM, 50 steps)"
    python generate.py --ckpt pretrained/cifar10.pt

Ship a model once, when it is finished: every version of a file in pretrained/ stays in every
clone's history.
"""

import argparse
import os

from plumbing.checkpoint import CheckpointError, load_checkpoint, load_for_sampling, save_pretrained


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="a checkpoint written by train_*.py (<run>_ema.pt or <run>.pt)")
    p.add_argument("out", help="the shipped file, e.g. pretrained/cifar10.pt")
    p.add_argument("--quality", default=None, help="its measured quality, one line, shown in the demo's menu")
    args = p.parse_args(argv)
    try:
        ckpt = load_checkpoint(args.ckpt)
        save_pretrained(ckpt, args.out, args.quality)
        load_for_sampling(args.out)                      # it opens as generate.py and the demo will open it
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {args.out}: {os.path.getsize(args.out) / 2**20:.1f} MiB, half-precision EMA weights, "
          f"step {ckpt.get('step')}, quality: {args.quality or 'not given'}")


if __name__ == "__main__":
    main()
