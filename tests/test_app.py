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
from samplers import t_to_sigma
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
    statuses = [out[-1] for out in job.outputs()]
    assert statuses[0].startswith("Step 1/") and statuses[-1].startswith("Done")   # live frames, then the result
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


def test_out_of_range_input_is_refused_through_the_api_with_its_reason(server):
    # end to end, what a client of the page's API gets back: Gradio's own check of the slider's range
    # answers first (the handler's checks, below, hold where it does not)
    from gradio_client.exceptions import AppError
    _, client = server
    with pytest.raises(AppError, match="greater than maximum value 64"):
        client.predict("uncond_ema", "DDIM", 10, 0, 65, None, 0, api_name="/generate")


@pytest.mark.parametrize("args, message", [
    (("uncond_ema", "DDIM", T + 1, 0, 4, None, 0), "steps"),
    (("uncond_ema", "DDIM", 0, 0, 4, None, 0), "steps"),
    (("uncond_ema", "DDIM", 2.5, 0, 4, None, 0), "whole number"),
    (("uncond_ema", "DDIM", 10, 0, 65, None, 0), "number of images"),
    (("uncond_ema", "DDIM", 10, 0, 0, None, 0), "number of images"),
    (("uncond_ema", "DDIM", 10, -1, 4, None, 0), "seed"),
    (("uncond_ema", "Euler", 10, 0, 4, None, 0), "sampler"),
    (("../../etc/passwd", "DDIM", 10, 0, 4, None, 0), "unknown model"),
    (("cond_ema", "DDIM", 10, 0, 4, "three", 1.0), "unknown class"),
    (("cond_ema", "DDIM", 10, 0, 4, "one", 21.0), "guidance"),
    (("uncond_ema", "EDM", 3, 0, 4, None, 0), "edm needs at least 6 network calls"),
])
def test_server_side_checks_refuse_what_the_sliders_would(server, args, message):
    demo, _ = server
    generate = next(fn.fn for fn in demo.fns.values() if fn.api_name == "generate")
    with pytest.raises(gr.Error, match=message):
        next(generate(*args))


def test_estimate_and_model_switch(server):
    _, client = server
    assert "Estimated time" in client.predict("cond_ema", "DDIM", 10, 16, "one", 2.0, api_name="/estimate")
    about, sampler, steps, w, interval, classes = client.predict("cond_ema", api_name="/model_info")   # no button
    assert "3 classes" in about and "T = 20" in about
    shown = tuple(update["value"] for update in (sampler, steps, w, interval))            # gr.update()s
    assert shown == (app.SHOWN_DEFAULT, T, app.DEFAULT_GUIDANCE, False)                   # no best: plain


def test_a_model_s_best_sampling_is_what_the_page_opens_on_and_guides_only_in_its_interval(tmp_path, monkeypatch):
    """A CIFAR-10 model (BEST_SAMPLING) opens on it, as generate.py does with no sampling flag: EDM, its w
    in 0.28 < σ ≤ 5.42, the interval box ticked; after a change its button sets it again; the estimate and
    the run count a guided call (batch 2n) only where σ is in the band. A model without one opens on the
    plain defaults, with no button and no box."""
    make_checkpoint(tmp_path / "c_ema.pt", timesteps=T, image_size=SIZE, channels=3, num_classes=10, dataset="cifar10")
    make_checkpoint(tmp_path / "m_ema.pt", timesteps=T, image_size=SIZE, num_classes=10, dataset="mnist")
    infos, _ = app.describe_checkpoints(app.discover_checkpoints(tmp_path, pretrained_dir=tmp_path / "none"))
    demo_app = app.App(infos, "cpu")
    best = sampling.BEST_SAMPLING["cifar10"]
    plain = (app.SHOWN_DEFAULT, T, app.DEFAULT_GUIDANCE, False)
    assert demo_app.page_defaults(infos["c_ema"]) == ("EDM", min(best["steps"], T), best["guidance"], True)
    assert demo_app.page_defaults(infos["m_ema"]) == plain
    about, sampler, _, w, interval, _, button = demo_app.on_model_change("c_ema")
    assert (sampler["value"], w["value"], interval["value"], interval["visible"], button["visible"]) == \
        ("EDM", best["guidance"], True, True, True)
    assert "0.28 < σ ≤ 5.42" in interval["label"] and sampling.best_sampling_flags(best) in about
    sampler, steps, w, interval = demo_app.on_best("c_ema")
    assert (sampler["value"], steps["value"], w["value"], interval["value"]) == ("EDM", T, best["guidance"], True)
    about, sampler, _, w, interval, _, button = demo_app.on_model_change("m_ema")
    assert (sampler["value"], w["value"], interval["value"]) == (app.SHOWN_DEFAULT, app.DEFAULT_GUIDANCE, False)
    assert not interval["visible"] and not button["visible"]

    diffusion = demo_app.models.get(infos["c_ema"]["path"], demo_app.device)
    ts = diffusion.sampling_timesteps("edm", T, churn=best["churn"])
    sigmas = [float(t_to_sigma(diffusion.sigma_table, t)) for t in ts]
    in_band = sum(0.28 < s <= 5.42 for s in sigmas)
    assert 0 < in_band < len(ts)                                 # the band cuts this chain: the test can tell
    guidance = demo_app.check_inputs("c_ema", "EDM", T, 0, 4, app.ALL_CLASSES, 2.0, True)[-1]
    assert demo_app.guided_calls(infos["c_ema"], "EDM", T, guidance) == in_band
    unbanded = demo_app.check_inputs("c_ema", "EDM", T, 0, 4, app.ALL_CLASSES, 2.0, False)[-1]
    assert demo_app.guided_calls(infos["c_ema"], "EDM", T, unbanded) == T        # w at every call

    monkeypatch.setattr(demo_app, "seconds_per_call", lambda info, batch: 0.01 * batch)
    assert math.isclose(demo_app.estimate_seconds(infos["c_ema"], T, 4, in_band)[0],
                        ((T - in_band) * 0.04 + in_band * 0.08) * app.FIRST_ESTIMATE)
    status = list(demo_app.generate("c_ema", "EDM", T, 0, 4, app.ALL_CLASSES, 2.0, True))[-1][-1]
    assert f"{in_band} of them guided" in status and status.startswith("Done")
    with pytest.raises(gr.Error, match="no measured guidance interval"):
        demo_app.check_inputs("m_ema", "DDPM", 10, 0, 4, app.ALL_CLASSES, 2.0, True)


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
    assert demo_app.estimate_seconds(infos["m_ema"], 10, 4, 10) == (10 * 0.5 * app.FIRST_ESTIMATE, 8)
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


def run_with_a_fake_clock(monkeypatch, frame_seconds, step_seconds=0.5, page_seconds=0.25, steps=20):
    """One demo run of a tiny model on a fake clock: each network step takes step_seconds, drawing a
    live frame frame_seconds, the page's handling of each yield page_seconds. -> (app, statuses)."""
    import tempfile
    folder = app.Path(tempfile.mkdtemp())
    make_checkpoint(folder / "m_ema.pt", timesteps=T, image_size=SIZE)
    infos, _ = app.describe_checkpoints([folder / "m_ema.pt"])
    demo_app = app.App(infos, "cpu")
    clock = {"t": 0.0}
    demo_app.clock = lambda: clock["t"]
    diffusion = demo_app.models.get(infos["m_ema"]["path"], demo_app.device)
    sample_iter = diffusion.sample_iter

    def slow_steps(*args, **kwargs):
        for out in sample_iter(*args, **kwargs):
            clock["t"] += step_seconds
            yield out
    monkeypatch.setattr(diffusion, "sample_iter", slow_steps)
    to_display = app.to_display

    def slow_frame(grid):
        clock["t"] += frame_seconds / 2                     # two images a frame
        return to_display(grid)
    monkeypatch.setattr(app, "to_display", slow_frame)
    demo_app.estimate("m_ema", "DDIM", steps, 4, None, 0.0)        # as the page does before a run
    statuses = []
    for out in demo_app.generate("m_ema", "DDIM", steps, 0, 4, None, 0.0):
        clock["t"] += page_seconds
        statuses.append(out[-1])
    return demo_app, statuses


def test_live_frames_after_the_first_are_held_to_under_a_quarter_of_the_run(monkeypatch):
    demo_app, statuses = run_with_a_fake_clock(monkeypatch, frame_seconds=0.5, page_seconds=0.1)   # 1.2 steps
    run = demo_app.last_run
    assert statuses[0].startswith("Step 1/") and statuses[-1].startswith("Done")  # the chain is still shown live
    assert 1 < len(statuses) - 1 < 19                            # some live frames, not all 19 that are due
    assert run["preview"] / run["seconds"] < 0.25, run           # unthrottled: 19 × 0.6 s of 21.4 s, 53%
    demo_app, statuses = run_with_a_fake_clock(monkeypatch, frame_seconds=20.0)   # a frame = 40 steps: the first
    assert len(statuses) == 2 and demo_app.last_run["preview"] / demo_app.last_run["seconds"] > 0.25   # alone


def test_cheap_live_frames_are_all_shown(monkeypatch):
    demo_app, statuses = run_with_a_fake_clock(monkeypatch, frame_seconds=0.0, page_seconds=0.01)
    assert len(statuses) == 20 and demo_app.last_run["preview"] / demo_app.last_run["seconds"] < 0.25


def test_live_frames_come_at_most_four_a_second(monkeypatch):
    assert app.FRAME_GAP == 0.25
    _, statuses = run_with_a_fake_clock(monkeypatch, frame_seconds=0.0, step_seconds=0.0625, page_seconds=0.0)
    shown = [int(s.split("/")[0].removeprefix("Step ")) for s in statuses[:-1]]      # "Step k/20 (t = …) · …"
    assert shown == [1, 5, 9, 13, 17]                         # every 4th step of 1/16 s: 19 were due


def test_the_estimate_after_a_run_is_that_run_s_time(monkeypatch):
    demo_app, _ = run_with_a_fake_clock(monkeypatch, frame_seconds=2.0)
    info = demo_app.infos["m_ema"]
    assert math.isclose(demo_app.estimate_seconds(info, 20, 4, 0.0)[0], demo_app.last_run["seconds"], rel_tol=1e-6)
    assert "calibrated on the last run" in demo_app.estimate("m_ema", "DDIM", 20, 4, None, 0.0)
    demo_app.call_seconds = {key: 10.0 for key in demo_app.call_seconds}      # a run faster than its calls' timing
    demo_app.calibrate(info, 20, 4, 0.0, seconds=12.0)
    assert math.isclose(demo_app.estimate_seconds(info, 20, 4, 0.0)[0], 12.0, rel_tol=1e-9)


@pytest.mark.parametrize("port, message", [("99999", "99999 is out of range: use a port 1 … 65535"),
                                           ("0", "0 is out of range"), ("http", "'http' is not a port number")])
def test_a_bad_port_is_refused_in_one_line(port, message, capsys, monkeypatch):
    monkeypatch.setattr(app, "build_demo", lambda *a, **k: pytest.fail("a bad port must be refused first"))
    with pytest.raises(SystemExit) as e:
        app.main(["--port", port])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument --port: {message}" in err.splitlines()[-1]


def test_a_busy_port_is_refused_in_one_line_before_any_model_loads(monkeypatch):
    import socket
    monkeypatch.setattr(app, "build_demo", lambda *a, **k: pytest.fail("a busy port must be refused first"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as e:
            app.main(["--port", str(port)])
    assert str(e.value) == (f"error: --port {port} on 127.0.0.1: already in use (another app.py?); stop it or pass "
                            f"another --port, e.g. --port {port + 1}")


def test_a_model_trained_under_one_epoch_is_listed_last_and_marked_as_noise(tmp_path):
    from plumbing.files import load_checkpoint, save_checkpoint
    make_checkpoint(tmp_path / "shipped.pt", timesteps=T, image_size=SIZE)
    make_checkpoint(tmp_path / "a_stopped_ema.pt", timesteps=T, image_size=SIZE)
    ckpt = load_checkpoint(tmp_path / "a_stopped_ema.pt")           # a run stopped after 16 of 64 images
    ckpt["config"]["data"]["num_images"], ckpt["images_seen"] = 64, 16
    save_checkpoint(ckpt, tmp_path / "a_stopped_ema.pt")
    infos, _ = app.describe_checkpoints([tmp_path / "a_stopped_ema.pt", tmp_path / "shipped.pt"])
    demo_app = app.App(infos, "cpu")
    demo_app.seconds_per_call = lambda info, batch: 0.001        # the same model: the order is not the timing's
    (first, first_name), (last, last_name) = demo_app.model_choices()
    assert (first_name, last_name) == ("shipped", "a_stopped_ema")
    assert "expect noise" in last and "expect noise" not in first
    assert "expect noise" in demo_app.model_markdown(infos["a_stopped_ema"])


def test_samples_that_are_not_finite_end_the_run_with_their_message(tmp_path):
    """A network that answers NaN: the page says so (gr.Error) instead of showing black images."""
    from test_generate import poison
    make_checkpoint(tmp_path / "n_ema.pt", timesteps=T, image_size=SIZE)
    poison(tmp_path / "n_ema.pt")
    infos, _ = app.describe_checkpoints(app.discover_checkpoints(tmp_path, pretrained_dir=tmp_path / "none"))
    demo_app = app.App(infos, "cpu")
    with pytest.raises(gr.Error, match="4 of 4 images have NaN or infinite pixels"):
        list(demo_app.generate("n_ema", "DDIM", 3, 0, 4, app.ALL_CLASSES, 0.0))
