"""fid.py: the Fréchet distance and KID as formulas, the Inception pipeline end to end (stand-in
weights), and the proxy network (tiny training runs on real MNIST and on unlabelled images)."""

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

import fid
from scoring import metrics



def random_features(n, d, seed, shift=0.0):
    """n draws of one correlated Gaussian in d dimensions (the same for every seed), shifted by `shift`."""
    mixing = np.random.RandomState(1234).randn(d, d) / np.sqrt(d)
    return np.random.RandomState(seed).randn(n, d) @ mixing + shift


# ----------------------------------------------------------------------------- the distances

def test_frechet_distance_equals_the_formula_computed_with_scipy():
    f1, f2 = random_features(500, 16, 0), random_features(400, 16, 1, shift=0.3)
    mu1, s1 = f1.mean(0), np.cov(f1, rowvar=False)
    mu2, s2 = f2.mean(0), np.cov(f2, rowvar=False)
    direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert np.allclose(metrics.feature_stats(f1)[0], mu1) and np.allclose(metrics.feature_stats(f1)[1], s1)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-9)


def test_frechet_distance_of_diagonal_gaussians_is_mean_gap_plus_sqrt_variance_gap():
    # Σ₁, Σ₂ diagonal: d² = ‖μ₁ − μ₂‖² + Σ_i (√a_i − √b_i)²
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1 + 0 + 4 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-9)


def test_identical_sets_score_zero_and_shifted_sets_score_higher():
    f = random_features(300, 8, 2)
    mu, sigma = metrics.feature_stats(f)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    scores = [metrics.frechet_distance(mu, sigma, *metrics.feature_stats(f + s)) for s in (0.1, 0.5, 1.0)]
    assert scores == sorted(scores) and scores[0] > 0
    assert scores[-1] == pytest.approx(8 * 1.0 ** 2, rel=1e-6)          # a pure shift: d² = ‖shift‖²


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    f1, f2 = random_features(400, 8, 3), random_features(400, 8, 4)
    same, _ = metrics.kernel_distance(f1, f2, subsets=10, subset_size=200)
    shifted, _ = metrics.kernel_distance(f1, f2 + 1.0, subsets=10, subset_size=200)
    assert abs(same) < 0.05 and shifted > 10 * abs(same) and shifted > 0.1


def test_confidence_and_coverage():
    even = np.eye(4)[np.arange(100) % 4] * 0.97 + 0.01                   # confident, all 4 classes evenly
    one = np.tile([0.5, 0.2, 0.2, 0.1], (100, 1))                         # unsure, always class 0
    assert metrics.confident_share(even) == 1.0 and metrics.class_coverage(even) == pytest.approx(1.0)
    assert metrics.confident_share(one) == 0.0 and metrics.class_coverage(one) == pytest.approx(0.0)


# ----------------------------------------------------------------------------- Inception, end to end

@pytest.fixture
def stand_in_inception(tmp_path_factory, monkeypatch):
    """A state dict of torch-fidelity's FeatureExtractorInceptionV3 with random values (right shapes)."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe
    path = tmp_path_factory.mktemp("inception") / "stand_in.pth"
    with monkeypatch.context() as m:                # build the network without its (unavailable) weights
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("stand-in", ["2048"])
    torch.save(net.state_dict(), path)
    return path


def tiny_npz(path, n, seed, channels=3, size=16):
    rng = np.random.RandomState(seed)
    np.savez(path, images=rng.randint(0, 256, (n, size, size, channels), dtype=np.uint8))
    return path


def test_inception_fid_runs_end_to_end_with_stand_in_weights(stand_in_inception, tmp_path, capsys, monkeypatch):
    # scipy's sqrtm of a 2048×2048 matrix takes minutes on a busy 2-core CPU: here the distance is
    # taken over the first 32 features (frechet_distance itself is tested above); all else is real.
    real_frechet_distance, seen = metrics.frechet_distance, []

    def frechet_distance_on_32_features(mu1, sigma1, mu2, sigma2):
        seen.append((mu1.shape, sigma1.shape, mu2.shape, sigma2.shape))
        return real_frechet_distance(mu1[:32], sigma1[:32, :32], mu2[:32], sigma2[:32, :32])
    monkeypatch.setattr(metrics, "frechet_distance", frechet_distance_on_32_features)
    samples, reference = tiny_npz(tmp_path / "s.npz", 4, 0, channels=1), tiny_npz(tmp_path / "r.npz", 4, 1)
    argv = ["--samples", str(samples), "--dataset", str(reference), "--inception-weights", str(stand_in_inception),
            "--ckpt-dir", str(tmp_path / "ck"), "--kid-subsets", "2", "--kid-subset-size", "4", "--device", "cpu"]
    with pytest.warns(UserWarning, match="NON-standard"):
        result = fid.main(argv)
    out = capsys.readouterr().out
    assert seen == [((2048,), (2048, 2048), (2048,), (2048, 2048))]
    assert np.isfinite(result["fid"]) and np.isfinite(result["kid"])
    assert "not FID" in out and "n=4 vs r train (4 images), sampler=unknown, steps=unknown" in out
    cached = list((tmp_path / "ck" / "fid_stats").glob("r_train_16px_*_inception-*.npz"))
    assert len(cached) == 1
    with np.load(cached[0]) as d:
        assert d["mu"].shape == (2048,) and d["sigma"].shape == (2048, 2048) and d["features"].shape == (4, 2048)

    # --first N scores the file's first N images only (a score beside a floor measured at that n)
    with pytest.warns(UserWarning, match="NON-standard"):
        first = fid.main(argv + ["--first", "3"])
    assert first["n"] == 3 and "n=3 vs r train" in capsys.readouterr().out
    assert first["fid"] != result["fid"]
    for bad in ("0", "1", "5"):                    # 1: no covariance (scipy's sqrtm failed with an internal error)
        with pytest.raises(SystemExit):
            fid.main(argv + ["--first", bad])
        err = capsys.readouterr().err
        assert f"--first {bad}: " in err and "holds 4 images; give 2 … 4" in err


def test_several_sample_sets_score_as_one_joined_set(stand_in_inception, tmp_path, capsys, monkeypatch):
    # generate.py runs with seeds 1 … 5 scored as one set of 10,000: their images joined in order,
    # the metadata they agree on; sets of different image shapes are refused with what to do
    rng = np.random.RandomState(0)
    parts = [rng.randint(0, 256, (n, 16, 16, 3), dtype=np.uint8) for n in (3, 2)]
    for k, (images, steps) in enumerate(zip(parts, (50, 100))):
        np.savez(tmp_path / f"p{k}.npz", images=images, sampler=np.asarray("ddpm"), steps=np.asarray(steps))
    paths = [tmp_path / "p0.npz", tmp_path / "p1.npz"]
    images, meta = fid.load_sample_sets(paths)
    assert torch.equal(images, torch.from_numpy(np.concatenate(parts)).permute(0, 3, 1, 2))
    assert meta == {"sampler": "ddpm"}                                   # steps differ: not claimed

    monkeypatch.setattr(metrics, "frechet_distance",
                        lambda m1, s1, m2, s2, f=metrics.frechet_distance: f(m1[:32], s1[:32, :32], m2[:32], s2[:32, :32]))
    common = ["--dataset", str(tiny_npz(tmp_path / "r.npz", 4, 2)), "--inception-weights", str(stand_in_inception),
              "--ckpt-dir", str(tmp_path / "ck"), "--kid-subsets", "2", "--kid-subset-size", "4", "--device", "cpu"]
    with pytest.warns(UserWarning, match="NON-standard"):
        joined = fid.main(["--samples", *map(str, paths), "--first", "4"] + common)
    assert joined["n"] == 4 and "n=4 vs r train (4 images), sampler=ddpm, steps=unknown" in capsys.readouterr().out
    small = tiny_npz(tmp_path / "small.npz", 2, 3, size=8)
    with pytest.raises(SystemExit):
        fid.main(["--samples", str(paths[0]), str(small)] + common)
    err = capsys.readouterr().err
    assert "differ in image shape" in err and "(3, 8, 8)" in err and "score them separately" in err


def test_missing_inception_weights_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(fid.InceptionError, match="--proxy"):
        fid.Inception(tmp_path / "nope.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))       # no published weights
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))                      # no converted weights
    samples = tiny_npz(tmp_path / "s.npz", 4, 0)
    with pytest.raises(SystemExit) as e:
        fid.main(["--samples", str(samples), "--dataset", "mnist", "--ckpt-dir", str(tmp_path / "ck")])
    assert "--get-inception" in str(e.value) and "--proxy" in str(e.value)




def test_fid_ckpt_refuses_missing_weights_before_it_samples(tiny_checkpoint, tmp_path, monkeypatch):
    from diffusion import GaussianDiffusion
    monkeypatch.setattr(GaussianDiffusion, "reverse_steps", lambda *a, **k: pytest.fail("sampled before refusing"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))       # no published weights
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))                      # no converted weights
    with pytest.raises(SystemExit) as e:
        fid.main(["--ckpt", str(tiny_checkpoint()), "--n", "2", "--steps", "2", "--dataset", "mnist",
                  "--ckpt-dir", str(tmp_path / "ck"), "--device", "cpu"])
    assert "--get-inception" in str(e.value)


@pytest.mark.parametrize("flags, message", [
    (["--ref-limit", "1"], "--ref-limit 1: the real images' covariance needs at least 2"),
    (["--kid-subsets", "0"], "KID needs at least 1 subset of at least 2 images"),
])
def test_reference_and_kid_sizes_that_cannot_give_a_score_are_refused(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(fid, "Inception", lambda *a, **k: pytest.fail("went on to score"))
    with pytest.raises(SystemExit):
        fid.main(["--samples", str(tiny_npz(tmp_path / "s.npz", 4, 0)), "--dataset", str(tiny_npz(tmp_path / "r.npz", 4, 1)),
                  "--ckpt-dir", str(tmp_path / "ck"), *flags])
    assert message in capsys.readouterr().err


def test_reference_statistics_of_two_copies_of_a_dataset_are_cached_apart(tmp_path, monkeypatch):
    """Two files of one name (a/ref.npz, b/ref.npz), and one file written anew, each get their own
    statistics: the cache's name carries the copy's tag (data.source_tag). The features here are
    each image's mean colour."""
    import os
    from types import SimpleNamespace
    monkeypatch.setattr(metrics, "_features", lambda ex, images, batch_size=None:
                        (images.double().mean(dim=(2, 3)).numpy(), None))
    extractor, cache = SimpleNamespace(tag="mean"), str(tmp_path / "stats")
    a, b = tmp_path / "a" / "ref.npz", tmp_path / "b" / "ref.npz"
    for path, value in ((a, 0), (b, 200)):
        path.parent.mkdir()
        np.savez(path, images=np.full((4, 8, 8, 3), value, np.uint8))
    assert metrics.reference_stats(extractor, str(a), cache_dir=cache)["mu"].tolist() == [0, 0, 0]
    assert metrics.reference_stats(extractor, str(b), cache_dir=cache)["mu"].tolist() == [200, 200, 200]
    np.savez(a, images=np.full((4, 8, 8, 3), 100, np.uint8))                 # a written anew
    os.utime(a, ns=(1, 1))                                                   # surely at another time
    assert metrics.reference_stats(extractor, str(a), cache_dir=cache)["mu"].tolist() == [100, 100, 100]
    assert metrics.reference_stats(extractor, str(b), cache_dir=cache)["mu"].tolist() == [200, 200, 200]
    assert len(os.listdir(cache)) == 3


def test_a_folders_statistics_are_made_anew_when_a_file_below_it_changes(tmp_path, monkeypatch):
    """A folder of images as the reference: a file rewritten in place in a subfolder, or one added
    there, changes no time of the folder itself; its statistics must not be reused all the same."""
    import os
    from types import SimpleNamespace
    from PIL import Image
    monkeypatch.setattr(metrics, "_features", lambda ex, images, batch_size=None:
                        (images.double().mean(dim=(2, 3)).numpy(), None))
    extractor, cache = SimpleNamespace(tag="mean"), str(tmp_path / "stats")
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for name, value in (("a.png", 0), ("sub/b.png", 0)):
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(folder / name)
    stamp = os.stat(folder).st_mtime_ns, os.stat(folder / "sub").st_mtime_ns

    def mean():
        return metrics.reference_stats(extractor, str(folder), cache_dir=cache, image_size=8)["mu"].tolist()

    def keep_folder_times():
        os.utime(folder, ns=(stamp[0], stamp[0]))
        os.utime(folder / "sub", ns=(stamp[1], stamp[1]))

    assert mean() == [0, 0, 0]
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(folder / "sub" / "b.png")     # rewritten in place
    os.utime(folder / "sub" / "b.png", ns=(1, 1))
    keep_folder_times()
    assert mean() == [100, 100, 100]
    Image.fromarray(np.full((8, 8, 3), 250, np.uint8)).save(folder / "sub" / "c.png")     # one more below
    keep_folder_times()
    assert mean() == [150, 150, 150] and len(os.listdir(cache)) == 3


def test_copy_check_of_grey_samples_read_back_as_rgb(tmp_path, capsys):
    """PNG folders come back RGB (load_image_folder); against a grey training set the samples are
    turned grey first, so each sample stays one sample."""
    import types
    faces = np.random.RandomState(1).randint(0, 256, (8, 16, 16, 1), dtype=np.uint8)
    np.savez(tmp_path / "faces64.npz", images=faces, celeba_id=np.arange(8) + 1)     # 4 train, 4 held out
    planted = torch.from_numpy(faces[:2].copy()).permute(0, 3, 1, 2).expand(-1, 3, -1, -1)    # grey as RGB
    fresh = torch.from_numpy(np.random.RandomState(2).randint(0, 256, (6, 1, 16, 16), dtype=np.uint8))
    args = types.SimpleNamespace(data_dir=str(tmp_path), copy_check=str(tmp_path / "pairs.png"))
    result = fid.copies(torch.cat([planted, fresh.expand(-1, 3, -1, -1)]), "faces", args, pairs=2)
    assert result["near_copy_share"] == 2 / 8 and "% of 8 samples are closer" in capsys.readouterr().out


def test_nearest_pixel_distance_is_the_brute_force_rms_and_copies_are_caught():
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (40, 3, 4, 4), generator=g, dtype=torch.uint8)
    held = torch.randint(0, 256, (30, 3, 4, 4), generator=g, dtype=torch.uint8)
    d, idx = metrics.nearest_pixel_distances(held, train, batch_size=7)
    brute = ((held[:, None].double() - train[None].double()) ** 2).flatten(2).mean(2).sqrt()     # (30, 40)
    assert torch.allclose(d, brute.min(1).values) and torch.equal(idx, brute.argmin(1))
    fresh = torch.randint(0, 256, (15, 3, 4, 4), generator=g, dtype=torch.uint8)
    copies = torch.cat([train[:5], fresh])                      # 5 exact copies among 20 samples
    c = metrics.copy_check(copies, train, held)
    assert c["near_copy_share"] == 0.25 and c["threshold"] > 0
    assert metrics.copy_check(held, train, held)["near_copy_share"] <= 0.05    # unseen images are not copies


def test_copy_check_writes_the_closest_pairs_and_finds_a_planted_copy(tmp_path, capsys):
    import types
    faces = np.random.RandomState(1).randint(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "faces64.npz", images=faces, celeba_id=np.arange(8) + 1)     # 4 train, 4 held out
    planted = torch.from_numpy(faces[:2].copy()).permute(0, 3, 1, 2)                  # two training faces
    fresh = torch.from_numpy(np.random.RandomState(2).randint(0, 256, (6, 3, 16, 16), dtype=np.uint8))
    args = types.SimpleNamespace(data_dir=str(tmp_path), copy_check=str(tmp_path / "pairs.png"))
    result = fid.copies(torch.cat([planted, fresh]), "faces", args, pairs=2)
    out = capsys.readouterr().out
    assert result["near_copy_share"] >= 2 / 8 and "% of 8 samples are closer" in out       # both copies caught
    assert result["sample_median"] > 0 and result["threshold"] > 0
    assert Image.open(tmp_path / "pairs.png").size == (2 * 16 + 6, 2 * 16 + 6)         # 2 pairs, side by side
    with pytest.raises(ValueError, match="held-out"):
        fid.copies(planted, str(tiny_npz(tmp_path / "one_split.npz", 4, 0)), args)


def test_floor_scores_real_images_of_the_other_split(stand_in_inception, tmp_path, capsys, monkeypatch):
    """--floor N: N training images (shuffled with --seed) against the test reference, the real-vs-real
    floor at n = N; the same as scoring those images as --samples."""
    monkeypatch.setattr(metrics, "frechet_distance",
                        lambda m1, s1, m2, s2, f=metrics.frechet_distance: f(m1[:32], s1[:32, :32], m2[:32], s2[:32, :32]))
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.RandomState(5)
    train = rng.randint(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    np.savez(data / "cifar10_train.npz", images=train, labels=np.arange(7) % 10)
    np.savez(data / "cifar10_test.npz", images=rng.randint(0, 256, (4, 32, 32, 3), dtype=np.uint8),
             labels=np.arange(4))
    common = ["--dataset", "cifar10", "--split", "test", "--data-dir", str(data), "--inception-weights",
              str(stand_in_inception), "--ckpt-dir", str(tmp_path / "ck"), "--kid-subsets", "2",
              "--kid-subset-size", "3", "--device", "cpu"]
    with pytest.warns(UserWarning, match="NON-standard"):
        floor = fid.main(["--floor", "3", "--seed", "1"] + common)
    assert floor["n"] == 3 and "n=3 vs cifar10 test (4 images), real images (train split, seed 1)" in capsys.readouterr().out
    chosen = train[torch.randperm(7, generator=torch.Generator().manual_seed(1))[:3].numpy()]
    np.savez(tmp_path / "chosen.npz", images=chosen)
    with pytest.warns(UserWarning, match="NON-standard"):
        same = fid.main(["--samples", str(tmp_path / "chosen.npz")] + common)
    assert same["fid"] == pytest.approx(floor["fid"], rel=1e-9) and same["kid"] == pytest.approx(floor["kid"], rel=1e-9)
    with pytest.raises(SystemExit):
        fid.main(["--floor", "8"] + common)
    assert "--floor 8: the train split of cifar10 holds 7 images; give 2 … 7" in capsys.readouterr().err
