"""gpu_stage.py rehearsed on the CPU: the packing is lossless where it must be and fits one carry,
and the very command the GPU machine runs goes end to end with --device cpu --tiny, so that a
typo never costs GPU minutes."""

import json

import numpy as np
import pytest

from tools import gpu_stage


def test_mosaic_round_trip_is_exact():
    images = np.random.default_rng(0).integers(0, 256, (1003, 8, 8, 3), dtype=np.uint8)
    mosaic = gpu_stage.to_mosaic(images, columns=250)
    assert mosaic.shape == (5 * 8, 250 * 8, 3)
    assert np.array_equal(gpu_stage.from_mosaic(mosaic, 1003, 8, columns=250), images)


@pytest.mark.slow
def test_rehearsal_runs_every_part_and_returns_what_fits(data_dir, tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    monkeypatch.chdir(tmp_path)
    total = gpu_stage.prepare(data_dir, wheels=False)
    assert total < 45 * 2**20                                # the data leaves room for the wheels in 64 MiB
    decoded = gpu_stage.decode_jpeg(gpu_stage.CIFAR_JPEG, 50000, 32)
    from plumbing import data
    original = data.load_dataset("cifar10", data_dir)[0][:2000].permute(0, 2, 3, 1).numpy().astype(float)
    assert np.sqrt(((decoded[:2000] - original) ** 2).mean()) < 3.0          # q95 4:4:4: RMSE ≈ 1.2 / 255

    summary = gpu_stage.main(["--device", "cpu", "--tiny", "--out", "out", "--work", "work"])
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(files) <= 8 and all((tmp_path / "out" / f).stat().st_size < 16 * 2**20 for f in files)
    assert {"cifar10_grid.png", "faces_grid.png", "logs.txt", "summary.json", "cifar10_samples_part0.npz"} <= set(files)
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    samples = np.load(tmp_path / "out" / "cifar10_samples_part0.npz")["images"]
    assert samples.dtype == np.uint8 and samples.shape[1:] == (32, 32, 3)
    assert isinstance(summary["parts"]["faces"], dict)
    models = {row["model"] for row in summary["speed"]["rows"] if "train_img_s" in row}
    assert models == {"ours (unet.UNet)", "diffusers UNet2DModel"}     # no wall-time bound: speed is benchmark.py's
