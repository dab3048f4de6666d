"""data.py: the named datasets, any image folder or .npz, and the reproducible batch stream."""

import numpy as np
import pytest
import torch
from PIL import Image

import data


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
    assert data.data_root("elsewhere") == data.data_root("elsewhere")
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


def test_unknown_dataset_name_lists_the_choices():
    with pytest.raises(FileNotFoundError, match="mnist, cifar10, faces, a folder"):
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
