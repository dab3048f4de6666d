"""FID and KID between generated images and a dataset, and an offline proxy FID.

    python fid.py --samples samples/cifar10_50k.npz --dataset cifar10 --inception-weights PATH
    python fid.py --ckpt checkpoints/cifar10_ema.pt --n 50000 --sampler ddim --steps 100 --inception-weights PATH
    python fid.py --samples samples/mnist.npz --dataset mnist --proxy
    python fid.py --ckpt checkpoints/mnist_ema.pt --proxy --n 2000 --sampler ddim --steps 50
    python fid.py --train-proxy mnist                        # (re)train checkpoints/proxy_mnist.pt

FID (Heusel et al. 2017): fit a Gaussian to the 2048-d pool features of Inception-v3 for each
image set and take the Fréchet distance between them,
    d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2·(Σ₁Σ₂)^½).
The network is torch-fidelity's port of the TensorFlow "2015-12-05" Inception graph (the one
behind published FIDs); its weights (weights-inception-2015-12-05-6726825d.pth) are downloaded
where the network allows, else read from --inception-weights. KID (Bińkowski et al. 2018) is the
unbiased MMD² with the kernel k(x, y) = (xᵀy/d + 1)³, averaged over random subsets.

Proxy FID (not comparable with papers): the same Fréchet distance over the penultimate features
of a small CNN that this file trains on the dataset's training split (checkpoints/proxy_<name>.pt).
It needs no download and tracks sample quality during training. With labels (MNIST, CIFAR-10)
the CNN is a classifier, and two more numbers come out: the share of samples it recognises with
confidence > 0.9, and the class coverage, the entropy of the predicted-class histogram over
log K (1.0 = all classes equally often). Without labels (faces, image folders) the CNN learns
rotation prediction, a self-supervised pretext task (Gidaris et al. 2018: which of 0°, 90°,
180°, 270° was this image turned by?); confidence and coverage are then None.

Reference statistics (μ, Σ and a subset of features for KID) are cached per dataset, split,
size and feature network in checkpoints/fid_stats/.
"""

import argparse
import hashlib
import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import CheckpointError, load_checkpoint, pick_device, save_checkpoint

PROXY_LABEL = "proxy FID (not comparable with papers)"
INCEPTION_SHA256_PREFIX = "6726825d"       # torch-fidelity's weights-inception-2015-12-05-6726825d.pth
KID_REF_FEATURES = 10000                   # reference features kept in the cache for KID
PROXY_EPOCHS = {"mnist": 2, "cifar10": 15}  # others (faces, folders): PROXY_EPOCHS_DEFAULT
PROXY_EPOCHS_DEFAULT = 10
PROXY_WIDTH = {"mnist": 16}                 # channels of the first conv; others: 32


class FIDError(RuntimeError):
    """Something fid.py cannot do, with a message that says what to do instead."""


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

def match_channels(images, channels):
    """uint8 (N, C, H, W) -> (N, channels, H, W): grey repeated to RGB, or RGB averaged to grey."""
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 1:
        return images.expand(-1, channels, -1, -1)
    return images.float().mean(dim=1, keepdim=True).round().to(torch.uint8).expand(-1, channels, -1, -1)


def load_samples(path):
    """A folder of images or an .npz (generate.py --npz) -> (uint8 (N, C, H, W), metadata dict)."""
    from data import load_image_folder, load_npz
    path = Path(path)
    if path.is_dir():
        from PIL import Image
        first = next((p for p in sorted(path.rglob("*.png")) + sorted(path.rglob("*.jpg"))), None)
        if first is None:
            raise FIDError(f"no .png or .jpg images in {path}")
        with Image.open(first) as img:
            size = min(img.size)
        return load_image_folder(path, size), {}
    if not path.is_file():
        raise FIDError(f"samples {path} do not exist; write them with generate.py --npz or --out")
    images, _, _ = load_npz(path)
    with np.load(path, allow_pickle=False) as d:
        meta = {k: d[k].item() for k in ("sampler", "steps", "dataset", "ckpt", "guidance") if k in d.files and d[k].ndim == 0}
    return images, meta


def load_reference(dataset, data_dir=None, image_size=None, split="train", limit=None):
    """The real images: data.load_dataset at image_size, optionally an even subset of `limit`."""
    from data import load_dataset, subset
    images, labels, class_names = load_dataset(dataset, data_dir, image_size, train=(split == "train"))
    images, labels = subset(images, labels, limit)
    return images, labels, class_names


def dataset_slug(dataset):
    """"mnist" -> "mnist"; "photos/faces.npz" or "photos/" -> "faces" / "photos" (for file names)."""
    return dataset if "/" not in str(dataset) and "." not in str(dataset) else Path(str(dataset).rstrip("/")).stem


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- Inception-v3

class Inception:
    """torch-fidelity's TF-exact Inception-v3 -> 2048-d pool features of uint8 images (any size;
    it resizes to 299×299 bilinearly as TensorFlow 1.x did). `exact` says whether the weights are
    the published ones (sha256 starts with 6726825d); other weights give scores that are not FID."""

    def __init__(self, weights_path=None, device="cpu"):
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
        if weights_path is None:
            weights_path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))
            if not os.path.exists(weights_path):
                try:
                    os.makedirs(os.path.dirname(weights_path), exist_ok=True)
                    torch.hub.download_url_to_file(URL_INCEPTION_V3, weights_path, hash_prefix=INCEPTION_SHA256_PREFIX)
                except Exception as e:             # offline, firewall, proxy, ...
                    raise FIDError(f"the FID Inception weights are not in {weights_path} and could not be "
                                   f"downloaded from {URL_INCEPTION_V3} ({type(e).__name__}: {e}). Pass "
                                   "--inception-weights PATH to a copy of weights-inception-2015-12-05-6726825d.pth, "
                                   "or use --proxy for the offline proxy FID.") from None
        weights_path = os.fspath(weights_path)
        if not os.path.isfile(weights_path):
            raise FIDError(f"--inception-weights {weights_path} does not exist. Pass the path to "
                           "weights-inception-2015-12-05-6726825d.pth (torch-fidelity's release), or use --proxy.")
        self.sha256 = file_sha256(weights_path)
        self.exact = self.sha256.startswith(INCEPTION_SHA256_PREFIX)
        try:
            # torch-fidelity reads the file with weights_only=False; read it safely first, so a file
            # carrying pickled code is refused before that.
            torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise FIDError(f"refusing Inception weights {weights_path}: not a plain PyTorch state dict ({e})") from None
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                   feature_extractor_weights_path=weights_path).to(device)
        except RuntimeError as e:
            raise FIDError(f"{weights_path} is not a state dict of torch-fidelity's FeatureExtractorInceptionV3 ({e})") from None
        self.device = device
        self.tag = "inception" if self.exact else f"inception-{self.sha256[:8]}"
        self.description = ("Inception-v3 (TF 2015-12-05 weights, torch-fidelity), 2048-d pool features" if self.exact else
                            f"Inception-v3 with NON-standard weights (sha256 {self.sha256[:8]}…, expected "
                            f"{INCEPTION_SHA256_PREFIX}…): scores are not FID")
        if not self.exact:
            warnings.warn(self.description)

    @torch.no_grad()
    def features(self, images, batch_size=50):
        """uint8 (N, C, H, W) -> float64 numpy (N, 2048)."""
        out = []
        for chunk in images.split(batch_size):
            out.append(self.net(match_channels(chunk, 3).to(self.device))[0].double().cpu())
        return torch.cat(out).numpy()


# ----------------------------------------------------------------------------- the proxy network

class ProxyNet(nn.Module):
    """A small all-convolutional CNN: (conv-BN-ReLU)×2 → pool → (conv-BN-ReLU)×2 → pool → conv-BN-ReLU
    → global average pool = the `feature_dim`-d features → linear → logits.

    Images larger than 32 px enter with a stride-2 first conv (64×64 faces cost what 32×32 does).
    """

    def __init__(self, channels, num_classes, image_size, width=32, feature_dim=128):
        super().__init__()

        def block(c_in, c_out, stride=1):
            return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        w = width
        self.body = nn.Sequential(
            *block(channels, w, 2 if image_size > 32 else 1), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, feature_dim), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(feature_dim, num_classes))

    def features(self, x):
        """x: (B, C, H, W) in [−1, 1] -> (B, feature_dim), the penultimate layer."""
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def to_unit(images):
    """uint8 -> float in [−1, 1]."""
    return images.float() / 127.5 - 1


def rotate_batch(x, k):
    """x: (B, C, H, W), k: (B,) in {0, 1, 2, 3} -> each image turned by k·90°."""
    return torch.stack([torch.rot90(img, int(r), dims=(-2, -1)) for img, r in zip(x, k)])


def augment(x, flip, generator):
    """Random translation by up to H/8 pixels (reflect padding) and, if flip, random mirroring."""
    B, C, H, W = x.shape
    pad = max(1, H // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, B), generator=generator)
    x = torch.stack([padded[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(B)])
    if flip:
        mirror = torch.rand(B, generator=generator) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    return x


def proxy_path(dataset, ckpt_dir="checkpoints"):
    return os.path.join(ckpt_dir, f"proxy_{dataset_slug(dataset)}.pt")


def _held_out(images, labels, dataset, data_dir, image_size):
    """Train / test split: the official test split for MNIST and CIFAR-10, else every 10th image."""
    if dataset in ("mnist", "cifar10"):
        test_images, test_labels, _ = load_reference(dataset, data_dir, image_size, split="test")
        return images, labels, test_images, test_labels
    test = torch.zeros(len(images), dtype=torch.bool)
    test[::10] = True
    if labels is None:
        return images[~test], None, images[test], None
    return images[~test], labels[~test], images[test], labels[test]


@torch.no_grad()
def _accuracy(model, images, labels, task, device, batch_size=500):
    model.eval()
    correct = 0
    g = torch.Generator().manual_seed(1)
    for start in range(0, len(images), batch_size):
        x = to_unit(images[start:start + batch_size])
        if task == "rotation":
            y = torch.randint(0, 4, (len(x),), generator=g)
            x = rotate_batch(x, y)
        else:
            y = labels[start:start + batch_size]
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    return correct / len(images)


def train_proxy(dataset, data_dir=None, ckpt_dir="checkpoints", image_size=None, epochs=None, max_iters=None,
                limit=None, batch_size=128, lr=3e-3, width=None, device=None, seed=0, path=None):
    """Train the proxy CNN on the dataset's training split and save it (weights-only) to
    ckpt_dir/proxy_<dataset>.pt. With labels: a classifier; without: rotation prediction.
    limit: use an even subset of that many training images; max_iters: stop early (both for tests).
    Returns the saved path."""
    device = torch.device(device or "cpu")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels, class_names = load_reference(dataset, data_dir, image_size, split="train")
    images, labels, test_images, test_labels = _held_out(images, labels, dataset, data_dir, image_size)
    from data import subset
    images, labels = subset(images, labels, limit)
    test_images, test_labels = subset(test_images, test_labels, limit)
    batch_size = min(batch_size, len(images))
    task = "classes" if labels is not None else "rotation"
    num_classes = int(labels.max()) + 1 if task == "classes" else 4
    channels, size = images.shape[1], images.shape[-1]
    flip = channels == 3                                      # mirror photos, never digits
    epochs = epochs or PROXY_EPOCHS.get(dataset, PROXY_EPOCHS_DEFAULT)
    width = width or PROXY_WIDTH.get(dataset, 32)
    steps_per_epoch = max(1, len(images) // batch_size)
    iters = min(max_iters or epochs * steps_per_epoch, epochs * steps_per_epoch)
    path = path or proxy_path(dataset, ckpt_dir)
    what = "classifier" if task == "classes" else "rotation-prediction CNN (self-supervised, Gidaris et al. 2018)"
    print(f"training proxy {what} for {dataset}: {len(images)} images {size}×{size}×{channels}, "
          f"{iters} iterations (batch {batch_size}, {epochs} epochs max) on {device} -> {path}")

    model = ProxyNet(channels, num_classes, size, width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    warmup = max(1, iters // 10)                        # linear warm-up, then cosine decay to 0
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, iters) / iters)))
    t0, it = time.time(), 0
    while it < iters:
        perm = torch.randperm(len(images), generator=g)
        for start in range(0, len(perm) - batch_size + 1, batch_size):            # full batches only
            idx = perm[start:start + batch_size]
            x = augment(to_unit(images[idx]), flip, g)
            if task == "rotation":
                y = torch.randint(0, 4, (len(x),), generator=g)
                x = rotate_batch(x, y)
            else:
                y = labels[idx]
            model.train()
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            it += 1
            if it % 100 == 0 or it == iters:
                print(f"  iter {it}/{iters}  loss {loss.item():.4f}  ({time.time() - t0:.0f} s)")
            if it >= iters:
                break
    acc = _accuracy(model, test_images, test_labels, task, device)
    print(f"proxy {dataset}: held-out {'accuracy' if task == 'classes' else 'rotation accuracy'} {acc:.2%} "
          f"on {len(test_images)} images ({time.time() - t0:.0f} s)")
    config = {"dataset": dataset, "task": task, "image_size": size, "channels": channels, "num_classes": num_classes,
              "width": width, "feature_dim": 128, "class_names": class_names if task == "classes" else None,
              "test_accuracy": acc, "test_images": len(test_images),
              "train": {"images": len(images), "iters": iters, "batch_size": batch_size, "lr": lr, "seed": seed}}
    save_checkpoint({"config": config, "model": {k: v.cpu() for k, v in model.state_dict().items()}}, path)
    return path


class Proxy:
    """A trained ProxyNet ready to extract features: .features(uint8 images) -> (features, probs or None)."""

    def __init__(self, path, device="cpu"):
        ckpt = load_checkpoint(path)                    # weights_only=True: no pickled code runs
        c = ckpt["config"]
        if "task" not in c:
            raise FIDError(f"{path} is a checkpoint but not a proxy network of fid.py; retrain it with "
                           f"python fid.py --train-proxy {c.get('dataset', 'mnist')}")
        self.config, self.path, self.device = c, os.fspath(path), device
        self.net = ProxyNet(c["channels"], c["num_classes"], c["image_size"], c["width"], c["feature_dim"])
        self.net.load_state_dict(ckpt["model"])
        self.net.to(device).eval()
        self.sha256 = file_sha256(path)
        self.tag = f"proxy-{self.sha256[:8]}"
        kind = ("classifier, test accuracy" if c["task"] == "classes" else
                "self-supervised rotation-prediction CNN (Gidaris et al. 2018), held-out rotation accuracy")
        self.description = (f"{c['feature_dim']}-d penultimate features of {self.path} ({kind} "
                            f"{c['test_accuracy']:.2%}, {c['image_size']}px)")

    @torch.no_grad()
    def features(self, images, batch_size=500):
        """uint8 (N, C, H, W) -> float64 (N, D) features, and (N, K) class probabilities (classifier only)."""
        from data import resize_images
        size = self.config["image_size"]
        feats, probs = [], []
        for chunk in images.split(batch_size):
            chunk = match_channels(chunk, self.config["channels"])
            if chunk.shape[-1] != size:
                chunk = resize_images(chunk, size)
            f = self.net.features(to_unit(chunk).to(self.device))
            feats.append(f.double().cpu())
            probs.append(self.net.head(f).softmax(1).double().cpu())
        probs = torch.cat(probs).numpy() if self.config["task"] == "classes" else None
        return torch.cat(feats).numpy(), probs


def get_proxy(dataset, data_dir=None, ckpt_dir="checkpoints", image_size=None, device="cpu", **train_kwargs):
    """Load ckpt_dir/proxy_<dataset>.pt, training and saving it first if it is missing."""
    path = proxy_path(dataset, ckpt_dir)
    if not os.path.exists(path):
        print(f"no proxy network at {path}: training it now (once; later runs reuse it)")
        train_proxy(dataset, data_dir, ckpt_dir, image_size, device=device, path=path, **train_kwargs)
    return Proxy(path, device)


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
    images, _, _ = load_reference(dataset, data_dir, image_size, split, limit)
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
    """Sample the (EMA) model and score it with the proxy network of config["dataset"].

    Trains and saves ckpt_dir/proxy_<dataset>.pt first if it is missing, and caches the training
    split's reference statistics in ckpt_dir/fid_stats/. Class-conditional models draw the classes
    in turn, without guidance. The noise is seeded, so successive calls in one run are comparable.
    Returns {"proxy_fid", "confident", "coverage", "n", "sampler", "steps"}; confident and
    coverage are None for unlabelled datasets. ref_limit / proxy_train_kwargs: small runs (tests).
    """
    from generate import sample_images
    device = torch.device(device) if device is not None else diffusion.betas.device
    dataset = config["dataset"]
    image_size = config.get("data", {}).get("image_size") or config["diffusion"]["image_size"]
    proxy = get_proxy(dataset, data_dir, ckpt_dir, image_size, device, **(proxy_train_kwargs or {}))
    ref = reference_stats(proxy, dataset, data_dir, proxy.config["image_size"], "train",
                          os.path.join(ckpt_dir, "fid_stats"), ref_limit)
    steps = min(steps, diffusion.num_timesteps) if steps else None
    num_classes = config["model"].get("num_classes")
    labels = torch.arange(num_samples) % num_classes if num_classes else None
    was_training = diffusion.training
    diffusion.eval()
    try:
        images = sample_images(diffusion, num_samples, sampler, steps, 0.0, labels, 0.0, batch_size, seed, progress=False)
    finally:
        diffusion.train(was_training)
    s = score(proxy, torch.from_numpy(images).permute(0, 3, 1, 2), ref)
    return {"proxy_fid": s["fd"], "confident": s["confident"], "coverage": s["coverage"],
            "n": num_samples, "sampler": sampler, "steps": steps or diffusion.num_timesteps}


# ----------------------------------------------------------------------------- command line

def fmt(x, digits=4):
    return "None" if x is None else f"{x:.{digits}g}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to score (one of)")
    src.add_argument("--samples", help="a folder of images or an .npz with uint8 'images' N×H×W×C (generate.py --npz)")
    src.add_argument("--ckpt", help="a checkpoint: sample it now with --n / --sampler / --steps")
    src.add_argument("--train-proxy", metavar="DATASET", help="only (re)train the proxy network for DATASET and exit")
    p.add_argument("--dataset", help="reference: mnist, cifar10, faces, a folder or .npz (default: the checkpoint's)")
    p.add_argument("--split", default="train", choices=("train", "test"), help="reference split (default: train)")
    p.add_argument("--ref-limit", type=int, default=None, help="use an even subset of this many reference images")
    p.add_argument("--data-dir", default=None, help="folder with <name>_train.npz … (default: $DDPM_DATA, else ./data)")
    p.add_argument("--proxy", action="store_true", help="offline proxy FID with the project's small CNN instead of Inception")
    p.add_argument("--inception-weights", default=None,
                   help="local weights-inception-2015-12-05-6726825d.pth (default: download to the torch hub cache)")
    p.add_argument("--n", type=int, default=50000, help="--ckpt: number of samples (default: %(default)s)")
    p.add_argument("--sampler", default="ddim", choices=("ddpm", "ddim"), help="--ckpt: sampler (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="--ckpt: steps (default: 50 for ddim, T for ddpm)")
    p.add_argument("--eta", type=float, default=0.0, help="--ckpt: DDIM η (default: 0)")
    p.add_argument("--guidance", type=float, default=0.0, help="--ckpt: classifier-free guidance w (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="--ckpt: noise seed (default: 0)")
    p.add_argument("--batch-size", type=int, default=256, help="--ckpt: images per sampling batch (default: 256)")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID: number of subsets (default: 100)")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID: images per subset (default: 1000)")
    p.add_argument("--ckpt-dir", default="checkpoints", help="where proxy_<dataset>.pt and fid_stats/ live")
    p.add_argument("--proxy-epochs", type=int, default=None,
                   help=f"--train-proxy: epochs (default: {PROXY_EPOCHS}, else {PROXY_EPOCHS_DEFAULT})")
    p.add_argument("--proxy-limit", type=int, default=None, help="--train-proxy: use only this many training images")
    p.add_argument("--json", default=None, help="also write the scores to this JSON file")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    args = p.parse_args(argv)
    try:
        return _main(args, p)
    except (FIDError, CheckpointError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def _main(args, parser):
    device = pick_device(args.device)
    if args.train_proxy:
        path = train_proxy(args.train_proxy, args.data_dir, args.ckpt_dir, epochs=args.proxy_epochs,
                           limit=args.proxy_limit, device=device)
        print(f"saved {path}")
        return None
    if bool(args.samples) == bool(args.ckpt):
        parser.error("give exactly one of --samples (a folder or .npz) or --ckpt (sample a checkpoint now)")

    if args.ckpt:
        from generate import open_checkpoint, resolve_sampling, sample_images
        diffusion, config = open_checkpoint(args.ckpt, device)
        args.class_ = None                                   # classes in turn for conditional models
        steps, labels, _ = resolve_sampling(args, diffusion, config)
        dataset = args.dataset or config["dataset"]
        meta = {"sampler": args.sampler, "steps": steps}
        print(f"sampling {args.n} images from {args.ckpt}: {args.sampler}, {steps} steps, seed {args.seed}"
              + (f", classes in turn, guidance {args.guidance}" if labels is not None else ""))
        images = sample_images(diffusion, args.n, args.sampler, steps, args.eta, labels, args.guidance,
                               args.batch_size, args.seed)
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
        del diffusion
    else:
        images, meta = load_samples(args.samples)
        dataset = args.dataset or meta.get("dataset")
        if not dataset:
            parser.error("--samples needs --dataset (mnist, cifar10, faces, a folder or an .npz) to compare against")
    n = len(images)
    size = images.shape[-1]
    where = f"n={n}, sampler={meta.get('sampler', 'unknown')}, steps={meta.get('steps', 'unknown')}"

    if args.proxy:
        extractor = get_proxy(dataset, args.data_dir, args.ckpt_dir, size, device)
        ref_size, label = extractor.config["image_size"], PROXY_LABEL
    else:
        extractor = Inception(args.inception_weights, device)
        ref_size = size                    # the real images at the samples' size, as the model saw them
        label = "FID" if extractor.exact else "FID with non-standard Inception weights (not FID)"
    ref = reference_stats(extractor, dataset, args.data_dir, ref_size, args.split,
                          os.path.join(args.ckpt_dir, "fid_stats"), args.ref_limit)
    s = score(extractor, images, ref, args.kid_subsets, args.kid_subset_size)
    kid_label = "proxy KID (not comparable with papers)" if args.proxy else "KID"
    print(f"features: {extractor.description}")
    print(f"reference: {dataset} {args.split} ({int(ref['n'])} images)")
    print(f"{label}: {s['fd']:.3f}   [{where}]")
    print(f"{kid_label}: {s['kid']:.5f} ± {s['kid_std']:.5f}   [{where}]")
    if args.proxy:
        print(f"confident (> 0.9): {fmt(s['confident'])}   [{where}]")
        print(f"class coverage (normalized entropy, 1.0 = even): {fmt(s['coverage'])}   [{where}]")
    result = {("proxy_fid" if args.proxy else "fid"): s["fd"], ("proxy_kid" if args.proxy else "kid"): s["kid"],
              "kid_std": s["kid_std"], "confident": s["confident"], "coverage": s["coverage"], "n": n,
              "sampler": meta.get("sampler"), "steps": meta.get("steps"), "dataset": dataset, "split": args.split,
              "features": extractor.description, "label": label}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
