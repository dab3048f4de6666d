"""CIFAR-10 samples: a labelled 10×10 grid, or 50,000 images for FID, in one command.

    python generate_cifar.py                                         # samples/cifar10_grid_edm50_w3_s0.28-5.42.png
    python generate_cifar.py --sampler ddpm                          # samples/cifar10_grid_ddpm50.png, unguided
    python generate_cifar.py --steps 1000                            # the paper's Algorithm 2, all 1000 steps
    python generate_cifar.py --guidance 2 --guidance-interval 0.28 5.42   # samples/cifar10_grid_ddpm50_w2_s0.28-5.42.png
    python generate_cifar.py --sampler ddim --steps 100 --guidance 1  # samples/cifar10_grid_ddim100_w1.png
    python generate_cifar.py --n 50000 --batch-size 1000 --npz samples/cifar10_50k.npz
    python fid.py --samples samples/cifar10_50k.npz --dataset cifar10 --inception-weights PATH

Conditional model: one row per class, the class name at the left of its row; the images are
drawn with the classes in turn, so 50,000 of them hold 5,000 per class. Unconditional model: a
plain 10×10 grid. With no sampling flag the CIFAR-10 model samples its best measured way, as in
generate.py: EDM's Heun, --steps 50, churn 0, w = 3 only where 0.28 < σ ≤ 5.42 (66 calls per
image; FID-10k 17.1 for the shipped model against 28.4 unguided). Any sampling flag gives
generate.py's plain defaults for the rest: ancestral DDPM on 50 of the T steps, w = 0; --steps 1000
alone is the paper's Algorithm 2 (FID 3.17 in Ho et al. Table 1). Without --ckpt it samples
checkpoints/cifar10_ema.pt, or on a fresh clone the shipped pretrained/cifar10.pt. All other flags
are generate.py's.
"""


import numpy as np
from PIL import Image, ImageDraw

from plumbing.data import default_class_names
from plumbing.images import ensure_parent, make_grid, to_pil
from plumbing.sampling import build_parser, guidance_tag, sample_from_args, write_outputs

GRID = "samples/<run>_grid_<sampler><steps><w>.png"   # the default grid path; <w>: sampling.guidance_tag


def labelled_grid(images, labels, class_names, per_class=10, zoom=1, padding=2):
    """(N, H, W, C) uint8 with labels (N,) -> PIL image: row k holds the first `per_class` images of
    class k, with the class name drawn to the left of the row."""
    rows = [images[labels == k][:per_class] for k in range(len(class_names))]
    n, h, w, c = images.shape
    cells = np.zeros((len(rows) * per_class, h, w, c), np.uint8) + 255
    for k, row in enumerate(rows):
        cells[k * per_class:k * per_class + len(row)] = row
    grid = to_pil(make_grid(cells, per_class, padding)).convert("RGB")
    if zoom > 1:
        grid = grid.resize((grid.width * zoom, grid.height * zoom), Image.NEAREST)
    margin = 8 + 6 * max(len(name) for name in class_names)         # the default font is ~6 px per character
    canvas = Image.new("RGB", (grid.width + margin, grid.height), "white")
    canvas.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    row_h = (h + padding) * zoom
    for k, name in enumerate(class_names):
        draw.text((4, padding * zoom + k * row_h + row_h // 2 - 6), name, fill=(0, 0, 0))
    return canvas


def main(argv=None):
    p = build_parser(__doc__, ckpt="checkpoints/cifar10_ema.pt", n=100, grid=GRID,
                     shipped="pretrained/cifar10.pt")
    p.add_argument("--per-class", type=int, default=10, help="images per class row in the labelled grid (default: 10)")
    p.add_argument("--zoom", type=int, default=1, help="enlarge the grid by this integer factor (default: 1)")
    args = p.parse_args(argv)
    images, labels, resolved, config, trajectory = sample_from_args(args)
    write_outputs(args, images, labels, resolved, config, trajectory, grid=False)     # all but the grid
    if args.no_grid:
        return
    grid_path = args.grid or GRID.replace("<run>", resolved["run"]).replace(       # a guided grid never
        "<sampler>", args.sampler).replace("<steps>", str(resolved["steps"])).replace(  # replaces w = 0's
        "<w>", guidance_tag(resolved))
    ensure_parent(grid_path)
    if labels is not None and args.class_ is None:
        names = default_class_names(config["model"]["num_classes"], config.get("data", {}).get("class_names"))
        labelled_grid(images, labels.numpy(), names, args.per_class, args.zoom).save(grid_path)
        print(f"wrote labelled grid {grid_path} (one row per class, {args.per_class} per row)")
    else:
        grid = to_pil(make_grid(images[:100], 10)).convert("RGB")
        if args.zoom > 1:
            grid = grid.resize((grid.width * args.zoom, grid.height * args.zoom), Image.NEAREST)
        grid.save(grid_path)
        print(f"wrote grid {grid_path} ({min(len(images), 100)} images, 10 per row)")


if __name__ == "__main__":
    main()
