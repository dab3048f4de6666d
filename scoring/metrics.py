"""FID, KID and the proxy metrics: the distances between feature sets, reference statistics cached
per dataset and feature network, and the trainer's evaluation hook. fid.py is their command line.

FID (Heusel et al. 2017): fit a Gaussian to the 2048-d pool features of Inception-v3 for each
image set and take the Fréchet distance between them,
    d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2·(Σ₁Σ₂)^½).
KID (Bińkowski et al. 2018) is the unbiased MMD² with the kernel k(x, y) = (xᵀy/d + 1)³, averaged
over random subsets. The feature networks live in inception.py (Inception-v3) and proxy.py.
"""

import math
import os
import warnings

import numpy as np
import scipy.linalg
import torch

from plumbing.files import atomic_write
from plumbing.data import dataset_slug, load_split, source_tag
from diffusion import DEFAULT_SAMPLER, DEFAULT_STEPS
from scoring.inception import Inception
from scoring.proxy import get_proxy
from plumbing.sampling import resolve_sampling, sample_images

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


# ----------------------------------------------------------------------------- reference statistics

def reference_stats(extractor, dataset, data_dir=None, image_size=None, split="train", cache_dir="checkpoints/fid_stats",
                    limit=None, batch_size=None):
    """μ, Σ (and up to KID_REF_FEATURES features) of the real images under `extractor` (Inception
    or Proxy), cached in cache_dir as <dataset>_<split>_<size>px[_<limit>]_<source>_<network tag>.npz,
    <source> the data's own tag (data.source_tag: which copy of the dataset, as it is now)."""
    def cached():
        source = source_tag(dataset, data_dir, train=split == "train")
        return os.path.join(cache_dir, f"{dataset_slug(dataset)}_{split}_{image_size or 'native'}px"
                                       f"{f'_{limit}' if limit else ''}_{source}_{extractor.tag}.npz")
    path = cached()
    if os.path.exists(path):
        with np.load(path, allow_pickle=False) as d:
            return {k: d[k] for k in d.files}
    images, _, _ = load_split(dataset, data_dir, image_size, split, limit)
    path = cached()                               # the tag of what was read, downloaded or built just now
    print(f"computing reference statistics: {dataset} {split}, {len(images)} images, {extractor.tag} -> {path}")
    feats, _ = _features(extractor, images, batch_size)
    mu, sigma = feature_stats(feats)
    keep = np.random.RandomState(0).permutation(len(feats))[:KID_REF_FEATURES]
    stats = {"mu": mu, "sigma": sigma, "features": feats[np.sort(keep)].astype(np.float32), "n": np.asarray(len(feats))}
    atomic_write(path, lambda f: np.savez(f, **stats))
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
                  sampler=DEFAULT_SAMPLER, steps=DEFAULT_STEPS, batch_size=None, seed=0, ref_limit=None, proxy_train_kwargs=None):
    """The trainer's evaluation hook: sample the (EMA) model and score it with the proxy network.

    Trains and saves ckpt_dir/proxy_<dataset>.pt first if it is missing, and caches the training
    split's reference statistics in ckpt_dir/fid_stats/. Class-conditional models draw the classes
    in turn, without guidance. The noise is seeded, so successive calls in one run are comparable.
    Returns {"proxy_fid", "confident", "coverage", "n", "sampler", "steps"}; confident and
    coverage are None for unlabelled datasets. batch_size: None is sampling.default_batch_size.
    ref_limit / proxy_train_kwargs: small runs (tests).
    """
    device = torch.device(device) if device is not None else diffusion.betas.device
    dataset = config["dataset"]
    image_size = config.get("data", {}).get("image_size") or config["diffusion"]["image_size"]
    proxy = get_proxy(dataset, data_dir, ckpt_dir, image_size, device, **(proxy_train_kwargs or {}))
    ref = reference_stats(proxy, dataset, data_dir, proxy.config["image_size"], "train",
                          os.path.join(ckpt_dir, "fid_stats"), ref_limit)
    steps, labels, _ = resolve_sampling(diffusion, config, sampler=sampler, steps=steps, n=num_samples, cap_steps=True)
    was_training = diffusion.training
    diffusion.eval()
    try:
        images = sample_images(diffusion, num_samples, sampler=sampler, steps=steps, labels=labels,
                                        batch_size=batch_size, seed=seed, progress=False)
    finally:
        diffusion.train(was_training)
    s = score(proxy, torch.from_numpy(images).permute(0, 3, 1, 2), ref)
    return {"proxy_fid": s["fd"], "confident": s["confident"], "coverage": s["coverage"],
            "n": num_samples, "sampler": sampler, "steps": steps}


# ----------------------------------------------------------------------------- copies of training images

def nearest_pixel_distances(images, reference, batch_size=500):
    """For each image, the pixel L2 distance (RMS over pixels, in [0, 255] units) to its nearest
    reference image, and that image's index. uint8 (N, C, H, W) and (M, C, H, W) -> ((N,), (N,))."""
    ref = reference.reshape(len(reference), -1).double()                          # (M, D)
    ref_sq = (ref ** 2).sum(1)                                                    # ‖r‖²
    dists, index = [], []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].reshape(-1, ref.shape[1]).double()
        d2 = (x ** 2).sum(1, keepdim=True) + ref_sq[None] - 2 * x @ ref.T         # ‖x − r‖², (b, M)
        best, where = d2.clamp(min=0).min(1)
        dists.append((best / ref.shape[1]).sqrt())
        index.append(where)
    return torch.cat(dists), torch.cat(index)


def copy_check(samples, train, held_out, quantile=0.01):
    """Memorisation: how close samples come to the training images, against how close images the
    model never saw (held_out) come. A sample is a near-copy when it is closer to its nearest training
    image than all but `quantile` of the held-out images are to theirs.
    -> {"threshold", "near_copy_share", "sample_median", "held_out_median", "distances", "nearest"}."""
    d_samples, nearest = nearest_pixel_distances(samples, train)
    d_held, _ = nearest_pixel_distances(held_out, train)
    threshold = torch.quantile(d_held, quantile).item()
    return {"threshold": threshold, "near_copy_share": (d_samples < threshold).double().mean().item(),
            "sample_median": d_samples.median().item(), "held_out_median": d_held.median().item(),
            "distances": d_samples, "nearest": nearest}
