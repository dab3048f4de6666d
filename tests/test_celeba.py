"""CelebA the standard way, without the network: a miniature of the official layout (178×218 JPEGs
named 000001.jpg …, img_align_celeba/ inside img_align_celeba.zip, list_eval_partition.txt) is
cropped with the DDPM/DDIM box, split by CelebA's own partition, cached once, and trained on; a
damaged archive, an empty folder or no CelebA at all are one line each. Also issue 32's rough edges
outside the demo: Ctrl-C's exit status, the lock of a run refused for data, the guided grid's name,
and the warning that names the shipped model."""

import io
import os
import shutil
import signal
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import generate_cifar
import train_celeba
from conftest import make_checkpoint, run
from plumbing import data
from plumbing.files import load_checkpoint, save_checkpoint

RED, BLUE, GREY = (230, 20, 20), (20, 20, 230), (128, 128, 128)
PARTITION = [0, 0, 1, 2]       # image i's partition is PARTITION[i % 4]: train, valid and test interleaved


def face(i):
    """A 178×218 'aligned CelebA image' whose crop box is visible: black outside the 140×140 box
    (19, 51, 159, 191), grey inside, a red 12-px square in its top-left corner and a blue one in its
    bottom-right corner; a faint number i keeps the files apart."""
    a = np.zeros((218, 178, 3), np.uint8)
    a[51:191, 19:159] = GREY
    a[51:63, 19:31] = RED
    a[179:191, 147:159] = BLUE
    a[120, 80:80 + i % 20] = 140
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def official_celeba(root, ids=range(1, 13), as_zip=True, partition=True):
    """root/celeba/ as torchvision and the official download lay it out -> that folder."""
    folder = root / "celeba"
    folder.mkdir(parents=True, exist_ok=True)
    if as_zip:
        with zipfile.ZipFile(folder / "img_align_celeba.zip", "w", zipfile.ZIP_STORED) as z:
            for i in ids:
                z.writestr(f"img_align_celeba/{i:06d}.jpg", face(i))
    else:
        (folder / "img_align_celeba").mkdir()
        for i in ids:
            (folder / "img_align_celeba" / f"{i:06d}.jpg").write_bytes(face(i))
    if partition:
        (folder / "list_eval_partition.txt").write_text("".join(f"{i:06d}.jpg {PARTITION[i % 4]}\n" for i in ids))
    return folder


def colour(pixel):
    """"red", "blue", "grey" or "other": what a pixel of the crop shows (JPEG and Lanczos blur the edges)."""
    r, g, b = (int(v) for v in pixel)
    if r > g + 80 and r > b + 80:
        return "red"
    if b > r + 80 and b > g + 80:
        return "blue"
    return "grey" if max(abs(v - 128) for v in (r, g, b)) <= 30 else "other"


@pytest.mark.parametrize("as_zip", [True, False], ids=["zip", "folder"])
def test_the_crop_is_the_140px_box_centred_at_89_121_resized_to_64(tmp_path, as_zip):
    official_celeba(tmp_path, as_zip=as_zip)
    images, labels, names = data.load_dataset("celeba", tmp_path, train=True)
    assert images.shape[1:] == (3, 64, 64) and images.dtype == torch.uint8 and labels is None and names is None
    x = images[0].permute(1, 2, 0).numpy()             # the red square is source px 0–12 of 140: 0–5.5 of 64
    assert [colour(x[i, i]) for i in (0, 4, 7, 56, 59, 63)] == ["red", "red", "grey", "grey", "blue", "blue"]
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
    assert border.max(axis=-1).min() > 60                # no black: nothing from outside the box


def test_celeba_s_own_partition_train_is_0_test_is_2_and_valid_is_left_out(tmp_path):
    official_celeba(tmp_path)
    train, _, _ = data.load_dataset("celeba", tmp_path, train=True)
    test, _, _ = data.load_dataset("celeba", tmp_path, train=False)
    ids = {split: np.load(tmp_path / f"celeba64_{split}.npz")["celeba_id"].tolist() for split in ("train", "test")}
    assert ids == {"train": [1, 4, 5, 8, 9, 12], "test": [3, 7, 11]}     # 2, 6, 10: valid, in neither
    assert (len(train), len(test)) == (6, 3)
    assert not torch.equal(train[0], train[1])                            # each file its own image


def test_without_the_partition_file_the_published_ranges_split_it(tmp_path, capsys):
    official_celeba(tmp_path, ids=[162770, 162771, 182637, 182638, 202599], partition=False)
    data.load_dataset("celeba", tmp_path)
    assert np.load(tmp_path / "celeba64_train.npz")["celeba_id"].tolist() == [162770]
    assert np.load(tmp_path / "celeba64_test.npz")["celeba_id"].tolist() == [182638, 202599]
    assert "no list_eval_partition.txt" in capsys.readouterr().err


def test_the_64px_set_is_built_once_and_loaded_after(tmp_path, monkeypatch, capsys):
    official_celeba(tmp_path)
    first, _, _ = data.load_dataset("celeba", tmp_path)
    assert "celeba: cropping" in capsys.readouterr().err                  # progress while it builds
    cache = tmp_path / "celeba64_train.npz"
    stamp = cache.stat().st_mtime_ns
    monkeypatch.setattr(data, "build_celeba", lambda *a: pytest.fail("the cache was rebuilt"))
    (tmp_path / "celeba" / "img_align_celeba.zip").unlink()                  # the cache alone is enough
    again, _, _ = data.load_dataset("celeba", tmp_path, image_size=32)
    assert cache.stat().st_mtime_ns == stamp and again.shape[1:] == (3, 32, 32) and len(again) == len(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["celeba", "celeba64_test.npz", "celeba64_train.npz"]


def left_behind(root):
    """Every file under root: a refusal must add none (no half-written cache, no temporary file)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_truncated_zip_is_one_line_and_nothing_is_lost(tmp_path):
    folder = official_celeba(tmp_path)
    archive = folder / "img_align_celeba.zip"
    archive.write_bytes(archive.read_bytes()[:archive.stat().st_size // 2])      # a download cut short
    before, content = left_behind(tmp_path), archive.read_bytes()
    with pytest.raises(ValueError) as e:
        data.load_dataset("celeba", tmp_path)
    assert "\n" not in str(e.value) and "img_align_celeba.zip" in str(e.value)
    assert "is not a readable zip" in str(e.value) and "re-download it" in str(e.value)
    assert left_behind(tmp_path) == before and archive.read_bytes() == content


def test_a_damaged_image_in_the_zip_is_one_line_and_nothing_is_lost(tmp_path):
    folder = official_celeba(tmp_path)
    archive = folder / "img_align_celeba.zip"
    raw = bytearray(archive.read_bytes())
    member = raw.find(b"img_align_celeba/000005.jpg") + 200          # inside the stored bytes of 000005.jpg
    raw[member:member + 64] = bytes(64)
    archive.write_bytes(bytes(raw))
    before = left_behind(tmp_path)
    with pytest.raises(ValueError, match=r"^celeba: img_align_celeba.zip in .* is damaged \(BadZipFile: Bad CRC"):
        data.load_dataset("celeba", tmp_path)
    assert left_behind(tmp_path) == before


def test_an_empty_img_align_celeba_folder_is_one_line(tmp_path):
    (tmp_path / "celeba" / "img_align_celeba").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as e:
        data.load_dataset("celeba", tmp_path)
    assert str(e.value).startswith("celeba: no CelebA images (000001.jpg, …) in ") and "\n" not in str(e.value)
    assert left_behind(tmp_path) == ["celeba", "celeba/img_align_celeba"]


def test_images_that_are_not_celeba_s_aligned_178x218_are_refused(tmp_path):
    folder = tmp_path / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    for i in (1, 3):
        Image.new("RGB", (250, 250)).save(folder / f"{i:06d}.jpg")
    (folder.parent / "list_eval_partition.txt").write_text("000001.jpg 0\n000003.jpg 2\n")
    with pytest.raises(ValueError, match="250×250 px, not CelebA's aligned 178×218"):
        data.load_dataset("celeba", tmp_path)


def refuse_download(monkeypatch):
    import torchvision

    def offline(root, **kwargs):
        os.makedirs(os.path.join(root, "celeba"), exist_ok=True)       # as torchvision does before it fails
        raise RuntimeError("Failed to download from Google Drive (network unreachable)")
    monkeypatch.setattr(torchvision.datasets, "CelebA", offline)


def test_offline_with_no_celeba_one_line_names_the_three_ways(tmp_path, monkeypatch):
    refuse_download(monkeypatch)
    with pytest.raises(FileNotFoundError) as e:
        data.load_dataset("celeba", tmp_path)
    message = str(e.value)
    assert "\n" not in message and "torchvision could not download it (RuntimeError" in message
    assert "torchvision downloads CelebA" in message                                      # 1. online
    assert f"img_align_celeba.zip (or its extracted img_align_celeba/ folder) in {tmp_path}/celeba/" in message  # 2.
    assert "--dataset PATH to a folder of CelebA-HQ or any face images" in message        # 3.
    assert "faces64.npz" in message
    assert left_behind(tmp_path) == []                                   # the failed download left no folder


def test_train_celeba_picks_celeba_where_it_is_and_faces64_on_the_build_machines(tmp_path):
    assert data.celeba_default(tmp_path) == "celeba"                      # nothing: torchvision will try
    np.savez(tmp_path / "faces64.npz", images=np.zeros((4, 64, 64, 3), np.uint8))
    assert data.celeba_default(tmp_path) == "faces"                       # the build machines' copy
    official_celeba(tmp_path)
    assert data.celeba_default(tmp_path) == "celeba"                      # the real thing wins


def test_train_celeba_trains_on_the_official_archive_with_no_other_step(tmp_path):
    official_celeba(tmp_path / "data")
    ckpt = run(train_celeba, tmp_path, "--data-dir", str(tmp_path / "data"), "--image-size", "16",
               "--batch-size", "4", "--steps", "2", "--max-minutes", "1")
    saved = torch.load(ckpt / "celeba_ema.pt", weights_only=True)
    assert saved["step"] == 2 and saved["config"]["dataset"] == "celeba"
    assert saved["config"]["data"]["num_images"] == 6 and saved["config"]["data"]["image_size"] == 16


def test_a_run_refused_for_missing_data_leaves_no_lock(tmp_path, monkeypatch, capsys):
    refuse_download(monkeypatch)
    (tmp_path / "ckpt").mkdir()                                   # checkpoints/ exists, as after any run
    with pytest.raises(SystemExit) as e:
        run(train_celeba, tmp_path, "--data-dir", str(tmp_path / "empty"))
    assert str(e.value).startswith("error: celeba: no CelebA in ") and "\n" not in str(e.value)
    assert list((tmp_path / "ckpt").iterdir()) == [] and not (tmp_path / "empty").exists()


def test_ctrl_c_saves_then_exits_130(tmp_path, monkeypatch):
    from diffusion import GaussianDiffusion
    official_celeba(tmp_path / "data")
    calls, loss = [], GaussianDiffusion.loss

    def loss_then_ctrl_c(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)               # Ctrl-C in the middle of step 2
        return loss(self, *args, **kwargs)

    monkeypatch.setattr(GaussianDiffusion, "loss", loss_then_ctrl_c)
    with pytest.raises(SystemExit) as e:
        run(train_celeba, tmp_path, "--data-dir", str(tmp_path / "data"), "--image-size", "16",
            "--batch-size", "4", "--steps", "10")
    assert e.value.code == 130                                # the shell's convention: 128 + SIGINT
    assert torch.load(tmp_path / "ckpt" / "celeba.pt", weights_only=True)["step"] == 2     # saved first


# ----------------------------------------------------------------------------- generate_cifar.py

@pytest.fixture
def cifar_clone(tmp_path, monkeypatch):
    """A checkout with a tiny conditional 'shipped' pretrained/cifar10.pt, as the working folder."""
    (tmp_path / "pretrained").mkdir()
    make_checkpoint(tmp_path / "pretrained" / "cifar10.pt", num_classes=10, channels=3, timesteps=10, dataset="cifar10")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_guided_and_unguided_grids_get_distinct_names(cifar_clone, capsys):
    generate_cifar.main(["--steps", "2", "--n", "10", "--per-class", "1"])
    generate_cifar.main(["--steps", "2", "--n", "10", "--per-class", "1", "--guidance", "1"])
    generate_cifar.main(["--steps", "2", "--n", "10", "--per-class", "1", "--guidance", "0.5"])
    assert sorted(p.name for p in (cifar_clone / "samples").iterdir()) == [
        "cifar10_grid_ddpm2.png", "cifar10_grid_ddpm2_w0.5.png", "cifar10_grid_ddpm2_w1.png"]


def test_a_model_stopped_early_is_sampled_with_a_warning_that_names_the_shipped_one(cifar_clone, capsys):
    (cifar_clone / "checkpoints").mkdir()
    shutil.copy(cifar_clone / "pretrained" / "cifar10.pt", cifar_clone / "checkpoints" / "cifar10_ema.pt")
    ckpt = load_checkpoint(cifar_clone / "checkpoints" / "cifar10_ema.pt")          # a one-minute run's
    ckpt["config"]["data"]["num_images"], ckpt["images_seen"], ckpt["step"] = 50_000, 640, 5
    save_checkpoint(ckpt, cifar_clone / "checkpoints" / "cifar10_ema.pt")
    generate_cifar.main(["--steps", "2", "--n", "10", "--no-grid"])
    out = capsys.readouterr().out
    assert "ckpt=checkpoints/cifar10_ema.pt" in out
    assert ("warning: this model has seen 640 images, less than one pass over its 50,000 training images: expect "
            "its samples to be mostly noise; for the shipped model, pass --ckpt pretrained/cifar10.pt") in out
    generate_cifar.main(["--steps", "2", "--n", "10", "--no-grid", "--ckpt", "pretrained/cifar10.pt"])
    assert "warning" not in capsys.readouterr().out


def test_one_process_per_core_builds_the_same_set(tmp_path, monkeypatch):
    official_celeba(tmp_path / "serial")
    official_celeba(tmp_path / "pool")
    serial, _, _ = data.load_dataset("celeba", tmp_path / "serial")
    monkeypatch.setattr(data, "CELEBA_POOL_AFTER", 4)
    monkeypatch.setattr(data.os, "cpu_count", lambda: 2)
    import multiprocessing
    used, get_context = [], multiprocessing.get_context
    monkeypatch.setattr(multiprocessing, "get_context", lambda method: used.append(method) or get_context(method))
    pooled, _, _ = data.load_dataset("celeba", tmp_path / "pool")
    assert used == ["spawn"] and torch.equal(serial, pooled)
