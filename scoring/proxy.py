"""The proxy FID's feature network: a small CNN that the project trains on a dataset itself, so
that sample quality can be measured offline (no Inception download) and inside the training loop.

    python fid.py --train-proxy mnist          # (re)train checkpoints/proxy_mnist.pt (about a minute)

With labels (MNIST, CIFAR-10) the CNN is a classifier: its penultimate features give the proxy
FID, and its class probabilities the share of confidently recognised samples and the class
coverage. Without labels (faces, image folders) it learns rotation prediction, a self-supervised
pretext task (Gidaris et al. 2018: which of 0°, 90°, 180°, 270° was this image turned by?).
Proxy scores compare runs of this project; they are never comparable with papers.
"""

import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from plumbing.files import file_hash, load_checkpoint, save_checkpoint
from plumbing.data import dataset_slug, flip_where, load_split, match_channels, resize_images, subset
from plumbing.images import to_model_range

PROXY_EPOCHS = {"mnist": 2, "cifar10": 15}  # others (faces, folders): PROXY_EPOCHS_DEFAULT
PROXY_EPOCHS_DEFAULT = 10
PROXY_WIDTH = {"mnist": 16}                 # channels of the first conv; others: 32


class ProxyError(RuntimeError):
    """A file that is not a proxy network, with a message that says what to do."""


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
        x = flip_where(x, torch.rand(B, generator=generator) < 0.5)
    return x


def proxy_path(dataset, ckpt_dir="checkpoints"):
    return os.path.join(ckpt_dir, f"proxy_{dataset_slug(dataset)}.pt")


def _held_out(images, labels, dataset, data_dir, image_size):
    """Train / test split: the official test split for MNIST and CIFAR-10, else every 10th image."""
    if dataset in ("mnist", "cifar10"):
        test_images, test_labels, _ = load_split(dataset, data_dir, image_size, split="test")
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
        x = to_model_range(images[start:start + batch_size])
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
    images, labels, class_names = load_split(dataset, data_dir, image_size, split="train")
    images, labels, test_images, test_labels = _held_out(images, labels, dataset, data_dir, image_size)
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
    t0 = time.time()
    fit(model, images, labels, task, iters, batch_size, lr, flip, g, device)
    acc = _accuracy(model, test_images, test_labels, task, device)
    print(f"proxy {dataset}: held-out {'accuracy' if task == 'classes' else 'rotation accuracy'} {acc:.2%} "
          f"on {len(test_images)} images ({time.time() - t0:.0f} s)")
    config = {"dataset": dataset, "task": task, "image_size": size, "channels": channels, "num_classes": num_classes,
              "width": width, "feature_dim": 128, "class_names": class_names if task == "classes" else None,
              "test_accuracy": acc, "test_images": len(test_images),
              "train": {"images": len(images), "iters": iters, "batch_size": batch_size, "lr": lr, "seed": seed}}
    save_checkpoint({"config": config, "model": {k: v.cpu() for k, v in model.state_dict().items()}}, path)
    return path


def fit(model, images, labels, task, iters, batch_size, lr, flip, g, device):
    """Train the proxy for `iters` full batches: AdamW, a linear warm-up, then cosine decay to 0. task
    "classes": predict labels; "rotation": predict which of 4 rotations a batch image was given.
    g: the CPU generator of the data order, augmentation and rotations."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    warmup = max(1, iters // 10)                        # linear warm-up, then cosine decay to 0
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, iters) / iters)))
    t0, it = time.time(), 0
    while it < iters:
        perm = torch.randperm(len(images), generator=g)
        for start in range(0, len(perm) - batch_size + 1, batch_size):            # full batches only
            idx = perm[start:start + batch_size]
            x = augment(to_model_range(images[idx]), flip, g)
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


class Proxy:
    """A trained ProxyNet ready to extract features: .features(uint8 images) -> (features, probs or None)."""

    def __init__(self, path, device="cpu"):
        ckpt = load_checkpoint(path)                    # weights_only=True: no pickled code runs
        c = ckpt["config"]
        if "task" not in c:
            raise ProxyError(f"{path} is a checkpoint but not a proxy network of fid.py; retrain it with "
                           f"python fid.py --train-proxy {c.get('dataset', 'mnist')}")
        self.config, self.path, self.device = c, os.fspath(path), device
        self.net = ProxyNet(c["channels"], c["num_classes"], c["image_size"], c["width"], c["feature_dim"])
        self.net.load_state_dict(ckpt["model"])
        self.net.to(device).eval()
        self.sha256 = file_hash(path)
        self.tag = f"proxy-{self.sha256[:8]}"
        kind = ("classifier, test accuracy" if c["task"] == "classes" else
                "self-supervised rotation-prediction CNN (Gidaris et al. 2018), held-out rotation accuracy")
        self.description = (f"{c['feature_dim']}-d penultimate features of {self.path} ({kind} "
                            f"{c['test_accuracy']:.2%}, {c['image_size']}px)")

    @torch.no_grad()
    def features(self, images, batch_size=500):
        """uint8 (N, C, H, W) -> float64 (N, D) features, and (N, K) class probabilities (classifier only)."""
        size = self.config["image_size"]
        feats, probs = [], []
        for chunk in images.split(batch_size):
            chunk = match_channels(chunk, self.config["channels"])
            if chunk.shape[-1] != size:
                chunk = resize_images(chunk, size)
            f = self.net.features(to_model_range(chunk).to(self.device))
            feats.append(f.cpu().double())                     # float64 on the host only (MPS has none)
            probs.append(self.net.head(f).softmax(1).cpu().double())
        probs = torch.cat(probs).numpy() if self.config["task"] == "classes" else None
        return torch.cat(feats).numpy(), probs


def get_proxy(dataset, data_dir=None, ckpt_dir="checkpoints", image_size=None, device="cpu", **train_kwargs):
    """Load ckpt_dir/proxy_<dataset>.pt, training and saving it first if it is missing."""
    path = proxy_path(dataset, ckpt_dir)
    if not os.path.exists(path):
        print(f"no proxy network at {path}: training it now (once; later runs reuse it)")
        train_proxy(dataset, data_dir, ckpt_dir, image_size, device=device, path=path, **train_kwargs)
    return Proxy(path, device)
