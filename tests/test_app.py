"""The Gradio demo, driven through its API with gradio_client: the page serves grids of the right
size and count, streams the reverse chain, and refuses inputs outside its limits; its model menu
opens on the fastest model, with time estimates that the last real run calibrates."""

import math
import re

import gradio as gr
import pytest
import torch
from gradio_client import Client
from PIL import Image

import app
from plumbing import sampling
from conftest import free_port, make_checkpoint

T = 20          # the tiny checkpoints' timesteps
SIZE = 8        # and image size


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The demo with an unconditional and a class-conditional tiny checkpoint, on localhost."""
    folder = tmp_path_factory.mktemp("ckpts")
    make_checkpoint(folder / "uncond_ema.pt", timesteps=T, image_size=SIZE)
    make_checkpoint(folder / "cond_ema.pt", timesteps=T, image_size=SIZE, num_classes=3,
                    class_names=["zero", "one", "two"])
    demo = app.build_demo(app.discover_checkpoints(folder, pretrained_dir=folder / "none"), "cpu")
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    yield demo, Client(url, verbose=False)
    demo.close()


def test_checkpoints_are_discovered_by_name(tmp_path):
    for name in ("mnist_ema.pt", "mnist.pt", "notes.txt"):
        (tmp_path / name).touch()
    assert [p.name for p in app.discover_checkpoints(tmp_path, pretrained_dir=tmp_path / "none")] == ["mnist_ema.pt"]
    assert app.discover_checkpoints(tmp_path, ["a_ema.pt", "b.pt"]) == [app.Path("a_ema.pt"), app.Path("b.pt")]


def grid_shape(n, image_size, padding=2):
    """(height, width) of a grid of n images, ⌈√n⌉ a row, `padding` pixels around each."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols) * (image_size + padding) + padding, cols * (image_size + padding) + padding


@pytest.mark.parametrize("n, rows, cols", [(1, 1, 1), (7, 3, 3), (16, 4, 4), (64, 8, 8)])
def test_grid_is_ceil_sqrt_n_wide_with_padding(n, rows, cols):
    x = torch.zeros(n, 1, 28, 28)
    assert app.to_grid(x).shape == (rows * 30 + 2, cols * 30 + 2, 1) == (*grid_shape(n, 28), 1)


@pytest.mark.parametrize("name, n, extra", [("uncond_ema", 5, ("ignored", 3.0)), ("cond_ema", 10, ("one", 2.0)),
                                             ("cond_ema", 4, (app.ALL_CLASSES, 0.0))])
def test_generate_streams_then_returns_a_grid_of_n_images(server, name, n, extra):
    _, client = server
    job = client.submit(name, "DDIM", 10, 0, n, *extra, api_name="/generate")
    xt, x0, final, png, status = job.result(timeout=60)
    assert len(job.outputs()) > 3                               # "loading", live frames, the result
    height, width = grid_shape(n, SIZE)
    with Image.open(png) as grid:                               # the download: the grid at true size
        assert grid.size == (width, height) and grid.mode == "L"
    s = app.display_scale(height, width)
    for path in (xt, x0, final):                                # shown enlarged, by a whole factor
        with Image.open(path) as shown:
            assert shown.size == (s * width, s * height)
    assert f"{n} images" in status


def test_same_seed_same_images_ddpm_too(server):
    _, client = server
    first = client.predict("uncond_ema", "DDPM", 5, 3, 4, None, 0, api_name="/generate")[3]
    again = client.predict("uncond_ema", "DDPM", 5, 3, 4, None, 0, api_name="/generate")[3]
    with Image.open(first) as a, Image.open(again) as b:
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("steps, n", [(T + 1, 4), (0, 4), (10, 65), (10, 0)])
def test_out_of_range_inputs_are_refused(server, steps, n):
    _, client = server
    with pytest.raises(Exception):
        client.predict("uncond_ema", "DDIM", steps, 0, n, None, 0, api_name="/generate")


@pytest.mark.parametrize("args, message", [
    (("uncond_ema", "DDIM", T + 1, 0, 4, None, 0), "steps"),
    (("uncond_ema", "DDIM", 2.5, 0, 4, None, 0), "whole number"),
    (("uncond_ema", "DDIM", 10, 0, 65, None, 0), "number of images"),
    (("uncond_ema", "DDIM", 10, 0, 0, None, 0), "number of images"),
    (("uncond_ema", "DDIM", 10, -1, 4, None, 0), "seed"),
    (("uncond_ema", "Euler", 10, 0, 4, None, 0), "sampler"),
    (("../../etc/passwd", "DDIM", 10, 0, 4, None, 0), "unknown model"),
    (("cond_ema", "DDIM", 10, 0, 4, "three", 1.0), "unknown class"),
    (("cond_ema", "DDIM", 10, 0, 4, "one", 21.0), "guidance"),
])
def test_server_side_checks_refuse_what_the_sliders_would(server, args, message):
    demo, _ = server
    generate = next(fn.fn for fn in demo.fns.values() if fn.api_name == "generate")
    with pytest.raises(gr.Error, match=message):
        next(generate(*args))


def test_estimate_and_model_switch(server):
    _, client = server
    assert "Estimated time" in client.predict("cond_ema", "DDIM", 10, 16, "one", 2.0, api_name="/estimate")
    about, steps, classes, _ = client.predict("cond_ema", 15, api_name="/model_info")
    assert "3 classes" in about and "T = 20" in about


def test_demo_opens_on_the_fastest_model_and_shows_each_estimate(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "a_big_ema.pt", timesteps=20, image_size=32, channels=3)
    make_checkpoint(tmp_path / "z_small_ema.pt", timesteps=20, image_size=8)
    infos, _ = app.describe_checkpoints(app.discover_checkpoints(tmp_path, pretrained_dir=tmp_path / "none"))
    demo_app = app.App(infos, "cpu")
    # A call's time in proportion to its pixels, not a wall clock: on a busy CPU two tiny models'
    # timings can come out in either order, and the ordering is what this test is about.
    monkeypatch.setattr(demo_app, "seconds_per_call",
                        lambda info, batch: 1e-6 * batch * info["channels"] * info["image_size"] ** 2)
    choices = demo_app.model_choices()
    assert [name for _, name in choices] == ["z_small_ema", "a_big_ema"]
    assert all(re.search(r"≈ [0-9.]+ s", label) for label, _ in choices)


def test_demo_estimate_is_calibrated_by_the_last_real_run(tmp_path):
    make_checkpoint(tmp_path / "m_ema.pt", timesteps=20, image_size=8)
    infos, _ = app.describe_checkpoints(app.discover_checkpoints(tmp_path, pretrained_dir=tmp_path / "none"))
    demo_app = app.App(infos, "cpu")
    before = demo_app.estimate("m_ema", "DDIM", 10, 4, None, 0)
    assert "calibrated after the first run" in before
    seconds_before = demo_app.estimate_seconds(infos["m_ema"], 10, 4, 0)[0]
    demo_app.calibrate(infos["m_ema"], 10, 4, 0, seconds=3 * seconds_before)        # the run took 3× longer
    assert math.isclose(demo_app.estimate_seconds(infos["m_ema"], 10, 4, 0)[0], 3 * seconds_before, rel_tol=1e-6)
    assert "calibrated on the last run" in demo_app.estimate("m_ema", "DDIM", 10, 4, None, 0)


def test_the_estimate_times_the_network_as_sampling_runs_it(tmp_path, monkeypatch):
    """Sampling runs the net through diffusion.network, under bf16 autocast where that is fast; the
    estimate must time that same call, not a float32 one (which made it err long on CPUs with bf16)."""
    make_checkpoint(tmp_path / "m_ema.pt", timesteps=20, image_size=8, num_classes=3)
    infos, _ = app.describe_checkpoints(app.discover_checkpoints(tmp_path, pretrained_dir=tmp_path / "none"))
    demo_app = app.App(infos, "cpu")
    diffusion = demo_app.models.get(infos["m_ema"]["path"], demo_app.device)
    diffusion.amp = True                    # as on a CPU with fast bf16, whatever this one has
    seen = []
    diffusion.model.register_forward_pre_hook(lambda module, inputs: seen.append(
        (torch.is_autocast_enabled("cpu"), inputs[0].shape[0])))

    def time_call(call, device):            # one call, a fixed time
        call()
        return 0.5
    monkeypatch.setattr(sampling, "time_call", time_call)
    assert demo_app.estimate_seconds(infos["m_ema"], 10, 4, 2.0) == (10 * 0.5, 8)
    assert seen == [(True, 8)]              # one call, in bf16, at batch 2n for guidance


def test_without_checkpoints_the_page_says_how_to_train_one(tmp_path):
    demo = app.build_demo(app.discover_checkpoints(tmp_path, pretrained_dir=tmp_path / "none"), "cpu")
    text = " ".join(str(block.value) for block in demo.blocks.values() if isinstance(block, gr.Markdown))
    assert "python train_mnist.py" in text and "checkpoints/mnist_ema.pt" in text
    assert "--max-minutes 15" in text and "DDPM_DATA=" in text                   # the README's command, offline too
    broken = tmp_path / "broken_ema.pt"
    broken.write_text("not a checkpoint")
    demo = app.build_demo([broken], "cpu")
    text = " ".join(str(block.value) for block in demo.blocks.values() if isinstance(block, gr.Markdown))
    assert "python train_mnist.py" in text and "broken_ema.pt" in text


def test_page_without_checkpoints_is_served(tmp_path):
    import urllib.request

    demo = app.build_demo([], "cpu")
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    try:
        with urllib.request.urlopen(url + "config", timeout=10) as r:
            assert b"python train_mnist.py" in r.read()
    finally:
        demo.close()


def test_a_shipped_model_is_half_precision_opens_without_training_and_names_its_quality(tmp_path, capsys):
    from tools import ship
    from plumbing.checkpoint import load_for_sampling
    make_checkpoint(tmp_path / "run" / "cifar10_ema.pt", timesteps=T, image_size=SIZE, channels=3, num_classes=3)
    trained = torch.load(tmp_path / "run" / "cifar10_ema.pt", weights_only=True)
    trained["config"].setdefault("train", {}).update(ckpt_dir="/home/me/runs", sample_dir="/home/me/s", log_dir="/x",
                                                     run_name="cifar10")
    torch.save(trained, tmp_path / "run" / "cifar10_ema.pt")
    shipped = tmp_path / "pretrained" / "cifar10.pt"
    ship.main([str(tmp_path / "run" / "cifar10_ema.pt"), str(shipped), "--quality", "FID-10k 30.1"])
    saved = torch.load(shipped, weights_only=True)
    assert all(saved["config"]["train"][k] is None for k in ("ckpt_dir", "sample_dir", "log_dir"))   # no local paths
    assert saved["config"]["train"]["run_name"] == "cifar10"
    assert {v.dtype for v in saved["ema_model"].values() if v.is_floating_point()} == {torch.float16}
    assert saved["quality"] == "FID-10k 30.1" and saved["config"]["model"]["num_classes"] == 3
    diffusion, _ = load_for_sampling(shipped)                                  # computes in float32
    assert next(diffusion.model.parameters()).dtype == torch.float32
    paths = app.discover_checkpoints(tmp_path / "ckpts", pretrained_dir=tmp_path / "pretrained")
    infos, problems = app.describe_checkpoints(paths)
    assert not problems and list(infos) == ["cifar10 (shipped)"]
    label = app.App(infos, "cpu").model_choices()[0][0]
    assert label.startswith("cifar10 (shipped) · FID-10k 30.1 · ≈ ")
