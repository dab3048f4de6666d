"""proxy.py: the proxy network, trained for a few iterations on real MNIST and on unlabelled
images, and metrics.proxy_metrics, the trainer's evaluation hook built on it."""

import numpy as np
import pytest
import torch

import fid
from scoring import metrics
from scoring import proxy
from plumbing.data import load_split
from diffusion import DEFAULT_SAMPLER


TINY_TRAIN = {"limit": 300, "max_iters": 25, "batch_size": 64}


@pytest.fixture
def mnist_proxy(data_dir, tmp_path):
    path = proxy.train_proxy("mnist", data_dir, tmp_path, **TINY_TRAIN)
    return proxy.Proxy(path)


def test_proxy_features_real_vs_real_small_real_vs_noise_large(mnist_proxy, data_dir):
    real, labels, _ = load_split("mnist", data_dir, split="test", limit=600)
    a, b = real[0::2], real[1::2]
    noise = torch.randint(0, 256, a.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fa, pa = mnist_proxy.features(a)
    fb, _ = mnist_proxy.features(b)
    fn, pn = mnist_proxy.features(noise)
    real_real = metrics.frechet_distance(*metrics.feature_stats(fa), *metrics.feature_stats(fb))
    real_noise = metrics.frechet_distance(*metrics.feature_stats(fa), *metrics.feature_stats(fn))
    assert fa.shape == (300, 128) and pa.shape == (300, 10)
    assert real_noise > 10 * real_real
    assert np.allclose(pa.sum(axis=1), 1) and np.allclose(pn.sum(axis=1), 1)          # class probabilities
    assert mnist_proxy.config["task"] == "classes"       # (its shares: test_fid.py; 25 steps teach it little)


def test_proxy_metrics_trains_a_missing_proxy_and_scores_a_checkpoint(tiny_checkpoint, data_dir, tmp_path, capsys):
    from plumbing.checkpoint import load_for_sampling
    diffusion, config = load_for_sampling(tiny_checkpoint(num_classes=10, class_names=[str(i) for i in range(10)]))
    ckpt_dir = tmp_path / "ck"
    m = metrics.proxy_metrics(diffusion, config, data_dir, num_samples=40, ckpt_dir=ckpt_dir, steps=3, batch_size=20,
                          ref_limit=400, proxy_train_kwargs=TINY_TRAIN)
    assert "training proxy classifier for mnist" in capsys.readouterr().out
    assert (ckpt_dir / "proxy_mnist.pt").exists() and list((ckpt_dir / "fid_stats").glob("mnist_train_8px_400_*.npz"))
    assert set(m) == {"proxy_fid", "confident", "coverage", "n", "sampler", "steps"}
    assert m["proxy_fid"] > 0
    assert (m["n"], m["sampler"], m["steps"]) == (40, DEFAULT_SAMPLER, 3)      # the fast default sampler
    again = metrics.proxy_metrics(diffusion, config, data_dir, num_samples=40, ckpt_dir=ckpt_dir, steps=3, batch_size=20,
                              ref_limit=400)
    assert again == m                                        # seeded noise, cached proxy and statistics
    assert "training" not in capsys.readouterr().out


def test_unlabelled_data_gets_a_rotation_proxy_without_confidence(tmp_path):
    # smooth blobs, so that a rotation is visible (pure noise would look the same turned)
    yy, xx = np.mgrid[0:16, 0:16]
    rng = np.random.RandomState(0)
    images = np.stack([np.clip(255 * np.exp(-((xx - cx) ** 2 + (yy - 3 - cy) ** 2) / 8.0), 0, 255)
                       for cx, cy in rng.randint(3, 12, (120, 2))]).astype(np.uint8)[..., None].repeat(3, -1)
    dataset = str(tmp_path / "blobs.npz")
    np.savez(dataset, images=images)
    path = proxy.train_proxy(dataset, ckpt_dir=tmp_path, max_iters=5, batch_size=32)
    net = proxy.Proxy(path)
    feats, probs = net.features(torch.from_numpy(images).permute(0, 3, 1, 2))
    assert net.config["task"] == "rotation" and "rotation" in net.description
    assert feats.shape == (120, 128) and probs is None


def test_cli_proxy_scores_an_npz_of_samples(mnist_proxy, data_dir, tmp_path, capsys):
    real, _, _ = load_split("mnist", data_dir, split="test", limit=50)
    samples = tmp_path / "s.npz"
    np.savez(samples, images=real.permute(0, 2, 3, 1).numpy(), sampler=np.asarray("ddim"), steps=np.asarray(50))
    ckpt_dir = mnist_proxy.path.rsplit("/", 1)[0]
    result = fid.main(["--samples", str(samples), "--dataset", "mnist", "--split", "test", "--ref-limit", "500", "--proxy",
                       "--ckpt-dir", ckpt_dir, "--kid-subset-size", "50", "--kid-subsets", "2", "--device", "cpu",
                       "--data-dir", str(data_dir)])
    out = capsys.readouterr().out
    assert "proxy FID (not comparable with papers)" in out and "n=50 vs mnist test (500 images), sampler=ddim, steps=50" in out
    noise = tmp_path / "noise.npz"                     # the same CLI on noise: the scores must tell them apart
    np.savez(noise, images=np.random.default_rng(0).integers(0, 256, (50, 28, 28, 1), dtype=np.uint8))
    worse = fid.main(["--samples", str(noise), "--dataset", "mnist", "--split", "test", "--ref-limit", "500", "--proxy",
                      "--ckpt-dir", ckpt_dir, "--kid-subset-size", "50", "--kid-subsets", "2", "--device", "cpu",
                      "--data-dir", str(data_dir)])
    assert result["proxy_fid"] < worse["proxy_fid"] / 10   # (the fixture's proxy is trained too briefly to be sure of digits)
