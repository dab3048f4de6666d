"""data.py: the named datasets, any image folder or .npz, and the reproducible batch stream; and the
tests' own data_dir fixture: without the data, one line in the summary says why tests skipped."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from plumbing import data
from conftest import ROOT


def test_mnist_is_uint8_nchw_with_digit_labels(data_dir):
    images, labels, class_names = data.load_dataset("mnist", data_dir)
    assert images.shape == (60000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert class_names == [str(d) for d in range(10)]


def test_cifar10_has_its_class_names(data_dir):
    images, labels, class_names = data.load_dataset("cifar10", data_dir)     # cached for test_train
    assert images.shape == (50000, 3, 32, 32) and images.dtype == torch.uint8
    assert class_names[:3] == ["airplane", "automobile", "bird"] and labels.bincount().tolist() == [5000] * 10


def test_data_dir_falls_back_to_ddpm_data(monkeypatch, tmp_path):
    monkeypatch.setenv("DDPM_DATA", str(tmp_path))
    assert data.data_root() == tmp_path
    assert data.data_root("elsewhere") == Path("elsewhere")          # a given folder wins over $DDPM_DATA
    monkeypatch.delenv("DDPM_DATA")
    assert str(data.data_root()) == "data"


def test_npz_file_is_a_dataset_and_can_be_resized(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 12, 12, 3), dtype=np.uint8)
    np.savez(tmp_path / "tiny.npz", images=x, labels=np.arange(5), class_names=np.array(list("abcde")))
    images, labels, class_names = data.load_dataset(str(tmp_path / "tiny.npz"))
    assert torch.equal(images, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert labels.tolist() == [0, 1, 2, 3, 4] and class_names == list("abcde")
    small, _, _ = data.load_dataset(str(tmp_path / "tiny.npz"), image_size=8)
    assert small.shape == (5, 3, 8, 8) and small.dtype == torch.uint8


def test_image_folder_handles_rgba_grey_odd_sizes_and_corrupt_files(tmp_path, capsys):
    Image.new("RGBA", (50, 30), (255, 0, 0, 0)).save(tmp_path / "transparent.png")   # fully transparent red
    (tmp_path / "sub").mkdir()
    Image.new("L", (17, 90), 100).save(tmp_path / "sub" / "grey_tall.jpg")
    Image.fromarray(np.full((33, 21, 3), (0, 0, 255), np.uint8)).save(tmp_path / "blue_odd.bmp")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "notes.txt").write_text("not an image")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # a plain note, never a Python warning
        images, labels, class_names = data.load_dataset(str(tmp_path), image_size=16)
    err = capsys.readouterr().err
    assert "skipped 2 of 5 files" in err and "data.py" not in err and "Warning" not in err
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8
    assert labels is None and class_names is None
    centre = images[:, :, 8, 8].tolist()                     # sorted order: blue_odd, sub/grey_tall, transparent
    assert centre == [[0, 0, 255], [100, 100, 100], [255, 255, 255]]   # alpha composited onto white


def test_empty_image_folder_says_what_to_do(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="no readable images.*Put .jpg/.png images in it"):
        data.load_dataset(str(tmp_path))


def test_offline_named_dataset_says_where_and_how_in_one_paragraph_and_leaves_no_folder(tmp_path, monkeypatch):
    import torchvision

    def offline(self, *args, **kwargs):                       # what torchvision does without a network
        (tmp_path / "data" / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: <urlopen error [Errno -3]>")
    monkeypatch.setattr(torchvision.datasets.MNIST, "__init__", offline)
    with pytest.raises(FileNotFoundError) as e:
        data.load_dataset("mnist", tmp_path / "data")
    message = str(e.value)
    assert "mnist_train.npz" in message and "DDPM_DATA" in message and "--data-dir" in message
    assert "\n" not in message and "http" not in message and "project machines" not in message
    assert not (tmp_path / "data").exists()                  # no empty MNIST/raw left behind


def test_data_tests_say_in_the_summary_why_they_skipped_and_fail_on_a_wrong_ddpm_data(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "tests" / "test_needs_data.py").write_text("def test_real(data_dir):\n    assert data_dir\n")
    env = {k: v for k, v in os.environ.items() if k != "DDPM_DATA"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120).stdout
    assert "real-data tests skipped: no mnist_train.npz" in out and "DDPM_DATA" in out and "1 skipped" in out
    wrong = subprocess.run(cmd, cwd=tmp_path, env={**env, "DDPM_DATA": str(tmp_path / "nowhere")},
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode != 0 and "holds no mnist_train.npz" in wrong.stdout


def test_unknown_dataset_name_lists_the_choices():
    with pytest.raises(FileNotFoundError, match="mnist, cifar10, faces, celeba, a folder"):
        data.load_dataset("imagenet")


def _images(n=40, size=4):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8), torch.arange(n)


def test_batches_are_in_minus_one_to_one_and_each_epoch_a_permutation():
    images, labels = _images()
    b = data.Batches(images, labels, batch_size=8, seed=3)
    seen = torch.cat([next(b)[1] for _ in range(5)])        # one epoch: 40 / 8 batches
    assert sorted(seen.tolist()) == list(range(40)) and b.state_dict()["epoch"] == 1
    x, y = next(b)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x, images[y].float() / 127.5 - 1)  # no flips unless asked


def test_batches_resume_from_a_stored_position():
    images, labels = _images()
    run = data.Batches(images, labels, batch_size=8, seed=1, flip=True)
    stream = [next(run) for _ in range(9)]                   # crosses an epoch boundary
    resumed = data.Batches(images, labels, batch_size=8, seed=1, flip=True)
    first = [next(resumed) for _ in range(4)]
    state = resumed.state_dict()
    resumed = data.Batches(images, labels, batch_size=8, seed=1, flip=True)
    resumed.load_state_dict(state)
    rest = [next(resumed) for _ in range(5)]
    for (x, y), (x2, y2) in zip(stream, first + rest):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    other_seed = data.Batches(images, labels, batch_size=8, seed=2, flip=True)
    assert not torch.equal(next(other_seed)[1], stream[0][1])


def test_flips_mirror_some_images_reproducibly():
    images, labels = _images(n=64)
    x, y = next(data.Batches(images, labels, batch_size=64, seed=0, flip=True))
    plain = images[y].float() / 127.5 - 1
    flipped = [torch.equal(a, b.flip(-1)) and not torch.equal(a, b) for a, b in zip(x, plain)]
    kept = [torch.equal(a, b) for a, b in zip(x, plain)]
    assert 10 < sum(flipped) < 54 and sum(flipped) + sum(kept) == 64


def test_ddp_ranks_split_each_global_batch():
    images, labels = _images()
    whole = data.Batches(images, labels, batch_size=8, seed=5, flip=True)
    ranks = [data.Batches(images, labels, batch_size=8, seed=5, flip=True, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(7):
        x, y = next(whole)
        parts = [next(r) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)


def test_dataloader_path_gives_the_same_stream():
    images, labels = _images()
    in_place = data.Batches(images, labels, batch_size=8, seed=1, flip=True)
    loader = data.Batches(images, labels, batch_size=8, seed=1, flip=True, use_loader=True, num_workers=0)
    for _ in range(7):
        (x, y), (x2, y2) = next(in_place), next(loader)
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_batches_refuse_a_dataset_smaller_than_a_batch():
    images, labels = _images(n=4)
    with pytest.raises(ValueError, match="fewer than one batch"):
        data.Batches(images, labels, batch_size=8)


# ----------------------------------------------------------------------------- damaged files: one line each

@pytest.fixture
def npz_env(tmp_path, monkeypatch):
    """A data folder and a cache folder of the test's own; decodes bypass the process-wide memo
    (a damaged file must be read again each time, and the real datasets stay memoised)."""
    monkeypatch.setenv("DDPM_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_read_npz", data._read_npz.__wrapped__)
    (tmp_path / "data").mkdir()
    return tmp_path / "data"


def _zip_with(path, members, compression=None):
    """An .npz written member by member: {name: raw bytes}."""
    import zipfile
    with zipfile.ZipFile(path, "w", compression or zipfile.ZIP_STORED) as z:
        for name, raw in members.items():
            z.writestr(name, raw)


def _npy_bytes(a):
    import io
    f = io.BytesIO()
    np.save(f, a)
    return f.getvalue()


def _garbage_zip(path):
    path.write_bytes(b"this is not a zip file at all")


def _truncated_zip(path):
    np.savez(path, images=np.zeros((8, 4, 4), np.uint8))
    path.write_bytes(path.read_bytes()[:200])           # a download cut short: no central directory


def _npy_named_npz(path):
    path.write_bytes(_npy_bytes(np.zeros((8, 4, 4), np.uint8)))


@pytest.mark.parametrize("damage", [_garbage_zip, _truncated_zip, _npy_named_npz])
def test_an_npz_that_is_not_a_zip_is_one_line_naming_the_file_and_what_to_do(npz_env, damage):
    damage(npz_env / "mnist_train.npz")
    with pytest.raises(ValueError) as e:
        data.load_dataset("mnist")
    assert str(e.value) == (f"mnist_train.npz in {npz_env} is not a readable .npz (BadZipFile: File is not a zip "
                            "file); re-download or remove it")


def _garbage_member(path):
    _zip_with(path, {"images.npy": b"\x00garbage" * 20, "labels.npy": _npy_bytes(np.arange(8))})


def _short_member(path):
    raw = _npy_bytes(np.zeros((8, 4, 4), np.uint8))
    _zip_with(path, {"images.npy": raw[:-40], "labels.npy": _npy_bytes(np.arange(8))})   # header fine, data short


def _flipped_deflate_bytes(path):
    import zipfile
    _zip_with(path, {"images.npy": _npy_bytes(np.arange(4096, dtype=np.uint8).reshape(16, 16, 16))},
              zipfile.ZIP_DEFLATED)
    raw = bytearray(path.read_bytes())
    for i in range(120, 160):
        raw[i] ^= 0xFF                                  # inside the compressed member
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, why", [(_garbage_member, "its member images.npy is not a .npy array"),
                                         (_short_member, "ValueError: "),
                                         (_flipped_deflate_bytes, "")])
def test_a_damaged_member_of_a_valid_zip_is_one_line_too(npz_env, damage, why):
    damage(npz_env / "mnist_train.npz")
    with pytest.raises(ValueError) as e:
        data.load_dataset("mnist")
    message = str(e.value)
    assert message.startswith(f"mnist_train.npz in {npz_env} is not a readable .npz (")
    assert why in message and message.endswith("; re-download or remove it") and "\n" not in message


@pytest.mark.parametrize("arrays, found, todo", [
    (dict(images=np.zeros((8, 4, 4), np.float32)), "'images' is float32 (8, 4, 4); expected uint8", "astype(np.uint8)"),
    (dict(images=np.zeros((8, 3, 4, 4), np.uint8)), "'images' has shape (8, 3, 4, 4); expected N×H×W×C with C = 1 or 3",
     "channels first? re-save it with images.transpose(0, 2, 3, 1)"),
    (dict(images=np.zeros((8, 4, 4, 4), np.uint8)), "'images' has shape (8, 4, 4, 4)", "re-save it in that shape"),
    (dict(images=np.zeros((8, 16), np.uint8)), "'images' has shape (8, 16)", "re-save it in that shape"),
    (dict(images=np.zeros((0, 4, 4), np.uint8)), "'images' has shape (0, 4, 4)", "re-save it in that shape"),
    (dict(pixels=np.zeros((8, 4, 4), np.uint8)), "has no 'images' array (it has ['pixels'])", "np.savez(path, images="),
    (dict(images=np.zeros((8, 4, 4), np.uint8), labels=np.arange(7)),
     "'labels' has shape (7,) for 8 images; expected one label per image", "re-save it with matching labels"),
    (dict(images=np.zeros((8, 4, 4), np.uint8), labels=np.zeros((8, 1), np.int64)),
     "'labels' has shape (8, 1) for 8 images", "re-save it with matching labels"),
    (dict(images=np.zeros((8, 4, 4), np.uint8), labels=np.linspace(0, 1, 8)),
     "'labels' is float64; expected integer class indices", "labels.astype(np.int64)"),
    (dict(images=np.zeros((8, 4, 4), np.uint8), labels=np.arange(8) - 1),
     "'labels' has negative values (min -1)", "numbered from 0"),
])
def test_wrong_arrays_say_what_was_found_what_was_expected_and_what_to_do(npz_env, arrays, found, todo):
    np.savez(npz_env / "mnist_train.npz", **arrays)
    with pytest.raises(ValueError) as e:
        data.load_dataset("mnist")
    message = str(e.value)
    assert message.startswith(f"mnist_train.npz in {npz_env}") and found in message and todo in message
    assert "\n" not in message


def test_loaded_images_are_a_copy_of_the_memoised_decode(npz_env, monkeypatch):
    grey = np.arange(8 * 4 * 4, dtype=np.uint8).reshape(8, 4, 4)
    np.savez(npz_env / "grey.npz", images=grey, labels=np.arange(8, dtype=np.int32))
    memo = data._read_npz(str((npz_env / "grey.npz").resolve()), 0, 0)       # what the process keeps
    monkeypatch.setattr(data, "_read_npz", lambda *key: memo)
    images, labels, _ = data.load_dataset(str(npz_env / "grey.npz"))
    assert images.shape == (8, 1, 4, 4) and labels.dtype == torch.int64
    images[0] = 0                                                 # a caller's in-place edit ...
    assert np.array_equal(memo["images"], grey)                  # ... never reaches the next load


def _cached_npy(cache):
    return sorted(cache.glob("mnist_train-*.images.npy"))


@pytest.mark.parametrize("damage", [lambda p: p.write_bytes(p.read_bytes()[:-100]),        # truncated
                                    lambda p: p.write_bytes(b""),                           # empty
                                    lambda p: p.write_bytes(b"\x93NUMPY garbage" * 10),     # a bad header
                                    lambda p: p.unlink()])                                  # gone
def test_a_damaged_cache_is_noted_decoded_afresh_and_rebuilt(npz_env, monkeypatch, capsys, damage):
    x = np.random.default_rng(0).integers(0, 256, (16, 6, 6, 3), dtype=np.uint8)
    np.savez_compressed(npz_env / "mnist_train.npz", images=x, labels=np.arange(16) % 10)
    monkeypatch.setattr(data, "CACHE_AFTER_S", -1.0)           # every decode counts as slow: cache it
    data.load_dataset("mnist")
    cache = npz_env.parent / "cache"
    [npy] = _cached_npy(cache)
    assert np.array_equal(np.load(npy), x)

    damage(npy)
    monkeypatch.setattr(data, "CACHE_AFTER_S", float("inf"))   # a fast decode: rebuilt because it was damaged
    images, labels, _ = data.load_dataset("mnist")
    err = capsys.readouterr().err
    assert f"note: the cached copy of mnist_train.npz in {cache} is damaged" in err and "rebuilding" in err
    assert err.count("\n") == 1
    assert torch.equal(images, torch.from_numpy(x).permute(0, 3, 1, 2)) and labels.tolist() == (np.arange(16) % 10).tolist()
    assert np.array_equal(np.load(npy), x)                      # rewritten, and readable

    import zipfile
    monkeypatch.setattr(zipfile, "is_zipfile", lambda path: False)   # the .npz can no longer be decoded ...
    images, _, _ = data.load_dataset("mnist")                   # ... so this comes from the cache
    assert torch.equal(images, torch.from_numpy(x).permute(0, 3, 1, 2)) and capsys.readouterr().err == ""


def test_training_on_a_corrupt_npz_stops_with_one_line_and_creates_no_folders(npz_env, tmp_path):
    import train_mnist
    from conftest import run
    _truncated_zip(npz_env / "mnist_train.npz")
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit) as e:
        run(train_mnist, tmp_path / "out")                    # --ckpt-dir out/ckpt --log-dir out/runs ...
    assert e.value.code == (f"error: mnist_train.npz in {npz_env} is not a readable .npz (BadZipFile: File is not a "
                            "zip file); re-download or remove it")
    assert list((tmp_path / "out").iterdir()) == []           # no ckpt/, runs/ or samples/, no lock file


def test_faces_hold_out_their_last_faces_by_celeba_id_and_train_on_the_rest(tmp_path, monkeypatch):
    rng = np.random.RandomState(0)
    ids = rng.permutation(1000)[:700] + 1                                  # 700 faces, shuffled ids
    images = np.zeros((700, 4, 4, 3), np.uint8)
    images[:, 0, 0, 0] = np.argsort(np.argsort(ids)) % 256                 # each image knows its id's rank
    images[:, 0, 0, 1] = np.argsort(np.argsort(ids)) // 256
    np.savez(tmp_path / "faces64.npz", images=images, celeba_id=ids)
    train, _, _ = data.load_dataset("faces", tmp_path, train=True)
    held, _, _ = data.load_dataset("faces", tmp_path, train=False)
    rank = lambda x: (x[:, 0, 0, 0].long() + 256 * x[:, 1, 0, 0].long()).tolist()   # noqa: E731
    assert len(held) == data.FACES_HELD_OUT == 300 and len(train) == 400
    assert rank(train) == list(range(400)) and rank(held) == list(range(400, 700))   # the last 300 ids held out
