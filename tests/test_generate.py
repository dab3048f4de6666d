"""generate.py / generate_cifar.py: same seed, same images; every refusal says why; every output lands.

All runs go through main(argv) in-process, on tiny random checkpoints (8×8, T = 20) from conftest.
"""

import os
import pickle
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from plumbing import data
import generate
import generate_cifar
from plumbing import sampling


def run(ckpt, tmp_path, *flags):
    """generate.main, with the grid and an .npz in tmp_path; returns the (N, H, W, C) uint8 images."""
    generate.main(["--ckpt", str(ckpt), "--grid", str(tmp_path / "grid.png"), "--npz", str(tmp_path / "run.npz"),
                   "--device", "cpu", *flags])
    return np.load(tmp_path / "run.npz")["images"]


def run_library(ckpt, tmp_path, *flags):
    """The same flags through sampling.sample_from_args, which fid.py --ckpt and generate_cifar.py use."""
    args = sampling.build_parser().parse_args(
        ["--ckpt", str(ckpt), "--grid", str(tmp_path / "grid.png"), "--device", "cpu", *flags])
    images, labels, resolved, config, trajectory = sampling.sample_from_args(args)
    sampling.write_outputs(args, images, labels, resolved, config, trajectory)
    return images, trajectory


def refusal(argv):
    """main(argv) must exit with a message (SystemExit carrying text), not a traceback."""
    with pytest.raises(SystemExit) as e:
        generate.main(argv)
    return str(e.value)


# ----------------------------------------------------------------------------- reproducibility

def test_same_seed_same_images_other_seed_other_images(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint()
    a = run(ckpt, tmp_path, "--n", "3", "--seed", "7", "--sampler", "ddpm")       # all T = 20 steps, noise at each
    b = run(ckpt, tmp_path, "--n", "3", "--seed", "7", "--sampler", "ddpm")
    c = run(ckpt, tmp_path, "--n", "3", "--seed", "8", "--sampler", "ddpm")
    assert a.shape == (3, 8, 8, 1) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_generate_py_and_the_library_give_the_same_images_and_gif_batch_by_batch(tiny_checkpoint, tmp_path):
    """generate.py's own loop over batches and sample_images (fid.py, generate_cifar.py, the trainer's
    grids) draw the noise alike: the same seed gives the same images, over several batches."""
    ckpt = tiny_checkpoint(num_classes=3, class_names=["cat", "dog", "owl"])
    flags = ("--n", "5", "--batch-size", "2", "--seed", "3", "--steps", "6", "--gif-frames", "3")    # GIF: every 2nd of 6 steps and the last
    shown = run(ckpt, tmp_path, *flags, "--gif", str(tmp_path / "a.gif"))
    library, trajectory = run_library(ckpt, tmp_path, *flags, "--gif", str(tmp_path / "b.gif"))
    assert shown.shape == (5, 8, 8, 1) and np.array_equal(shown, library)
    assert len(trajectory) == 4 and (tmp_path / "a.gif").read_bytes() == (tmp_path / "b.gif").read_bytes()
    one_batch = run(ckpt, tmp_path, "--n", "5", "--seed", "3", "--steps", "6")
    assert not np.array_equal(shown, one_batch)        # the noise is drawn batch by batch: --batch-size matters


def test_ddim_takes_the_requested_steps_and_eta(tiny_checkpoint, tmp_path, capsys):
    # η = 0 is deterministic given x_T (test_diffusion); here: the flags reach the sampler and its record
    ckpt = tiny_checkpoint()
    a = run(ckpt, tmp_path, "--n", "2", "--sampler", "ddim", "--steps", "5")
    with np.load(tmp_path / "run.npz") as d:
        assert (str(d["sampler"]), int(d["steps"]), int(d["calls"]), float(d["eta"])) == ("ddim", 5, 5, 0.0)
    assert "steps=5" in capsys.readouterr().out
    noisy = run(ckpt, tmp_path, "--n", "2", "--sampler", "ddim", "--steps", "5", "--eta", "1")   # same x_T, fresh noise
    assert not np.array_equal(a, noisy)
    with np.load(tmp_path / "run.npz") as d:
        assert float(d["eta"]) == 1.0


@pytest.mark.parametrize("image_size, batch", [(8, 256), (32, 256), (64, 64)])
def test_the_default_batch_holds_at_most_256_images_of_32x32_worth_of_pixels(tiny_checkpoint, tmp_path, capsys,
                                                                             image_size, batch):
    ckpt = tiny_checkpoint(image_size=image_size)
    images = run(ckpt, tmp_path, "--n", "2", "--sampler", "ddim", "--steps", "1")
    assert images.shape == (2, image_size, image_size, 1)
    assert f"batch_size={batch}," in capsys.readouterr().out


def test_conditional_class_by_name_or_index_and_guidance(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint(num_classes=3, class_names=["cat", "dog", "owl"], channels=3)
    by_name = run(ckpt, tmp_path, "--n", "2", "--steps", "4", "--sampler", "ddim", "--class", "dog", "--guidance", "2")
    by_index = run(ckpt, tmp_path, "--n", "2", "--steps", "4", "--sampler", "ddim", "--class", "1", "--guidance", "2")
    other = run(ckpt, tmp_path, "--n", "2", "--steps", "4", "--sampler", "ddim", "--class", "owl", "--guidance", "2")
    assert by_name.shape == (2, 8, 8, 3)
    assert np.array_equal(by_name, by_index)
    assert not np.array_equal(by_name, other)


# ----------------------------------------------------------------------------- refusals

def test_refuses_a_missing_file(tmp_path):
    msg = refusal(["--ckpt", str(tmp_path / "nope.pt")])
    assert "does not exist" in msg


@pytest.mark.parametrize("script, flags, message", [
    (generate, ["--ncol", "-1"], "--ncol -1: must be at least 1"),
    (generate, ["--gif", "{tmp}/t.gif", "--gif-frames", "0"], "--gif-frames 0: must be at least 1"),
    (generate, ["--npz", "{tmp}/a_file/run.npz"], "--npz {tmp}/a_file: cannot write there"),
    (generate, ["--out", "{tmp}/a_file"], "--out {tmp}/a_file is a file; give a folder"),
    (generate, ["--grid", "{tmp}"], "--grid {tmp} is a folder; give a file name"),
    (generate_cifar, ["--per-class", "0"], "--per-class 0: must be at least 1"),
])
def test_a_bad_output_flag_is_refused_before_any_sampling(tiny_checkpoint, tmp_path, monkeypatch, script, flags,
                                                          message):
    (tmp_path / "a_file").write_text("a file, not a folder")
    from diffusion import GaussianDiffusion
    monkeypatch.setattr(GaussianDiffusion, "reverse_steps", lambda *a, **k: pytest.fail("sampled before refusing"))
    argv = ["--ckpt", str(tiny_checkpoint(num_classes=10)), "--n", "2", "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        script.main(argv + [f.format(tmp=tmp_path) for f in flags])
    assert str(e.value).startswith(f"error: {message.format(tmp=tmp_path)}"), str(e.value)


@pytest.mark.parametrize("kind", ["text", "list"])
def test_refuses_a_file_that_is_not_a_checkpoint(tmp_path, kind):
    path = tmp_path / "bad.pt"
    if kind == "text":
        path.write_text("not a checkpoint\n")
    else:
        torch.save([1, 2, 3], path)
    msg = refusal(["--ckpt", str(path)])
    assert "not a" in msg and "checkpoint" in msg


class Hostile:
    """Unpickling this object creates `marker` (a stand-in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_refuses_a_checkpoint_with_pickled_code_without_running_it(tiny_checkpoint, tmp_path):
    # the payload is live: a plain (unsafe) load does create its marker
    probe = tmp_path / "probe.pt"
    torch.save({"x": Hostile(tmp_path / "probe_marker")}, probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "probe_marker").exists()

    ckpt = torch.load(tiny_checkpoint(), weights_only=True)
    marker = tmp_path / "pwned"
    ckpt["extra"] = Hostile(marker)
    path = tmp_path / "hostile.pt"
    torch.save(ckpt, path)
    msg = refusal(["--ckpt", str(path)])
    assert "refusing" in msg and "pickled" in msg
    assert not marker.exists()


def test_refuses_an_unknown_class(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint(num_classes=3, class_names=["cat", "dog", "owl"])
    msg = refusal(["--ckpt", str(ckpt), "--class", "zebra", "--grid", str(tmp_path / "g.png")])
    assert "unknown class 'zebra'" in msg and "dog" in msg
    assert "unknown class" in refusal(["--ckpt", str(ckpt), "--class", "3"])


@pytest.mark.parametrize("steps", ["0", "21"])
def test_refuses_steps_out_of_range(tiny_checkpoint, steps):
    msg = refusal(["--ckpt", str(tiny_checkpoint()), "--steps", steps])
    assert "--steps" in msg and "out of range" in msg and "1 to 20" in msg


@pytest.mark.parametrize("flag", [["--class", "1"], ["--guidance", "2"]])
def test_refuses_conditional_flags_on_an_unconditional_model(tiny_checkpoint, flag):
    msg = refusal(["--ckpt", str(tiny_checkpoint()), *flag])
    assert "unconditional" in msg and flag[0] in msg


# ----------------------------------------------------------------------------- outputs

def test_writes_grid_pngs_npz_and_gif(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint()
    out, npz, gif, grid = tmp_path / "pngs", tmp_path / "s.npz", tmp_path / "traj.gif", tmp_path / "grid.png"
    generate.main(["--ckpt", str(ckpt), "--n", "5", "--batch-size", "3", "--sampler", "ddim", "--steps", "6",
                   "--grid", str(grid), "--out", str(out), "--npz", str(npz), "--gif", str(gif), "--device", "cpu"])
    assert Image.open(grid).size == (3 * 10 + 2, 2 * 10 + 2)          # ⌈√5⌉ = 3 columns, 8 px + 2 px padding
    assert sorted(os.listdir(out)) == [f"{i:05d}.png" for i in range(5)]
    with np.load(npz, allow_pickle=False) as d:
        images = d["images"]
        assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8
        assert d["sampler"] == "ddim" and int(d["steps"]) == 6 and int(d["calls"]) == 6
        assert d["churn"] == ""                                         # churn is EDM's only
        assert "labels" not in d.files                                  # unconditional: no labels key
    loaded, labels, _ = data.load_npz(npz)                              # what fid.py --samples reads
    assert labels is None and torch.equal(loaded, torch.from_numpy(images).permute(0, 3, 1, 2))
    np.savez(tmp_path / "old.npz", images=images, labels=np.zeros(0, np.int64))   # as generate.py wrote it before
    assert data.load_npz(tmp_path / "old.npz")[1] is None
    assert np.array_equal(np.asarray(Image.open(out / "00003.png")), images[3, ..., 0])
    with Image.open(gif) as g:
        assert g.n_frames == 6                                          # one frame per DDIM step here


def test_npz_records_edm_churn_and_calls_for_fid(tiny_checkpoint, tmp_path):
    # two EDM runs that differ only in churn must be told apart by what fid.py reads from their .npz
    import fid
    ckpt = tiny_checkpoint()
    for churn in ("0", "7"):
        generate.main(["--ckpt", str(ckpt), "--n", "2", "--sampler", "edm", "--steps", "6", "--churn", churn,
                       "--npz", str(tmp_path / f"c{churn}.npz"), "--no-grid", "--device", "cpu"])
    meta = {churn: fid.load_samples(tmp_path / f"c{churn}.npz")[1] for churn in ("0", "7")}
    assert meta["0"]["churn"] == 0.0 and meta["7"]["churn"] == 7.0
    assert meta["0"]["calls"] == meta["7"]["calls"] == 6                 # --steps counts calls for edm
    assert fid.load_sample_sets([tmp_path / "c0.npz", tmp_path / "c7.npz"])[1].get("churn") is None


def test_default_grid_path_is_under_samples(tiny_checkpoint, tmp_path, monkeypatch):
    ckpt = tiny_checkpoint()
    monkeypatch.chdir(tmp_path)
    generate.main(["--ckpt", str(ckpt), "--n", "2", "--sampler", "ddim", "--steps", "3"])
    assert (tmp_path / "samples" / "mnist_ddim3.png").exists()


def test_cifar_labelled_grid_has_one_row_per_class(tiny_checkpoint, tmp_path):
    names = ["airplane", "automobile", "bird"]
    ckpt = tiny_checkpoint(num_classes=3, class_names=names, channels=3, dataset="cifar10")
    grid, npz = tmp_path / "grid.png", tmp_path / "c.npz"
    generate_cifar.main(["--ckpt", str(ckpt), "--n", "7", "--per-class", "2", "--sampler", "ddim", "--steps", "3",
                         "--grid", str(grid), "--npz", str(npz), "--device", "cpu"])
    with np.load(npz) as d:
        assert d["images"].shape == (7, 8, 8, 3)
        assert list(d["labels"]) == [0, 1, 2, 0, 1, 2, 0]               # classes in turn: balanced
    img = Image.open(grid)
    assert img.height > 3 * 8 and img.width > 2 * 8                     # 3 rows, 2 columns, plus the labels


def test_pickle_payload_helper_is_not_importable_by_weights_only_load(tmp_path):
    # what the refusal rests on: weights_only=True rejects any global it does not know
    path = tmp_path / "p.pt"
    torch.save({"x": Hostile(tmp_path / "m")}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert not (tmp_path / "m").exists()


def test_cifar_unconditional_grid_is_ten_per_row(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint(channels=3, dataset="cifar10")
    grid = tmp_path / "grid.png"
    generate_cifar.main(["--ckpt", str(ckpt), "--n", "20", "--sampler", "ddim", "--steps", "2", "--grid", str(grid),
                         "--device", "cpu"])
    assert Image.open(grid).size == (10 * 10 + 2, 2 * 10 + 2)


def test_generate_cifar_help_names_the_grid_it_writes(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        generate_cifar.main(["--help"])
    assert generate_cifar.GRID in re.sub(r"\s+", "", capsys.readouterr().out)
    ckpt = tiny_checkpoint(num_classes=3, class_names=["a", "b", "c"], channels=3, dataset="cifar10")
    monkeypatch.chdir(tmp_path)
    generate_cifar.main(["--ckpt", str(ckpt), "--n", "6", "--sampler", "ddim", "--steps", "2", "--device", "cpu"])
    assert (tmp_path / "samples" / "cifar10_grid_ddim2.png").exists()


@pytest.mark.parametrize("sampler, steps, extra", [("edm", "7", ["--churn", "0"]), ("edm", "8", []),
                                                   ("dpmpp2m", "6", [])])
def test_new_samplers_run_from_the_command_line_with_their_call_count(tiny_checkpoint, tmp_path, sampler, steps,
                                                                      extra, capsys):
    a = run(tiny_checkpoint(), tmp_path, "--n", "2", "--sampler", sampler, "--steps", steps, *extra)
    b = run(tiny_checkpoint(), tmp_path, "--n", "2", "--sampler", sampler, "--steps", steps, *extra)
    assert a.shape == (2, 8, 8, 1) and np.array_equal(a, b)             # seeded: the same images
    assert f"sampler={sampler}, steps={steps}" in capsys.readouterr().out


def test_no_sampling_flag_takes_the_model_s_best_sampling_any_flag_the_plain_defaults(tiny_checkpoint, tmp_path,
                                                                                       monkeypatch, capsys):
    """A CIFAR-10 model trained with label dropout (BEST_SAMPLING) samples EDM + interval guidance when no
    sampling flag is given, in generate.py and generate_cifar.py; one flag gives the plain defaults for
    the rest; fid.py keeps the plain defaults; a model without an entry samples as ever."""
    cifar = tiny_checkpoint("c_ema.pt", num_classes=10, channels=3, dataset="cifar10")
    best = sampling.BEST_SAMPLING["cifar10"]
    run(cifar, tmp_path, "--n", "2", "--batch-size", "2")
    out = capsys.readouterr().out
    assert "best measured sampling" in out and sampling.best_sampling_flags(best) in out
    tag = "_w{:g}_s{:g}-{:g}".format(best["guidance"], *best["guidance_interval"])   # e.g. _w3_s0.28-5.42
    with np.load(tmp_path / "run.npz") as d:
        assert (str(d["sampler"]), int(d["steps"]), float(d["guidance"])) == ("edm", 20, best["guidance"])  # 50 capped at T
        assert str(d["guidance_tag"]) == tag
    assert f"churn={best['churn']}" in out
    run(cifar, tmp_path, "--n", "2", "--guidance", "1")          # a flag: the plain defaults for the others
    with np.load(tmp_path / "run.npz") as d:
        assert (str(d["sampler"]), str(d["guidance_tag"])) == ("ddpm", "_w1")
    assert "best measured sampling" not in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    generate_cifar.main(["--ckpt", str(cifar), "--n", "10", "--device", "cpu"])
    assert (tmp_path / "samples" / f"cifar10_grid_edm20{tag}.png").exists()
    import fid
    monkeypatch.setattr(fid, "_main", lambda args, parser: args)
    args = fid.main(["--ckpt", str(cifar)])
    assert args.best_sampling is False and args.sampler is None        # fill_sampling: the plain defaults
    sampling.fill_sampling(args, torch.load(cifar, weights_only=True)["config"])
    assert (args.sampler, args.guidance, args.guidance_interval) == ("ddpm", 0.0, None)
    for config in ({"dataset": "mnist", "model": {"num_classes": 10}, "diffusion": {"cond_drop_prob": 0.1}},
                   {"dataset": "cifar10", "model": {"num_classes": None}, "diffusion": {}},     # nothing to guide
                   {"dataset": "cifar10", "model": {"num_classes": 10}, "diffusion": {"cond_drop_prob": 0.0}}):
        assert sampling.best_sampling(config) is None


def test_churn_is_only_for_edm(tiny_checkpoint):
    msg = refusal(["--ckpt", str(tiny_checkpoint()), "--sampler", "ddim", "--churn", "10"])
    assert "--churn" in msg and "edm" in msg


@pytest.mark.parametrize("eta", ["1.5", "-0.1"])
def test_eta_outside_0_to_1_is_refused(tiny_checkpoint, eta):
    """Above 1, 1 − ᾱ_{t'} − σ² in DDIM eq. 12 turns negative, and was clamped to 0 without a word."""
    msg = refusal(["--ckpt", str(tiny_checkpoint()), "--sampler", "ddim", "--eta", eta])
    assert msg.startswith(f"error: --eta {float(eta)}: DDIM's η is in [0, 1]"), msg


# ----------------------------------------------------------------------------- precision

def test_amp_runs_the_network_in_bf16_and_the_sampler_in_float32(tiny_checkpoint, monkeypatch):
    """With diffusion.amp the network's matmuls run in bf16 and its output comes back float32, close
    to the float32 network's; load_for_sampling(amp=False) and --no-amp keep float32 everywhere."""
    from plumbing.checkpoint import load_for_sampling
    ckpt = tiny_checkpoint()
    diffusion, _ = load_for_sampling(ckpt, "cpu", amp=False)
    assert diffusion.amp is False
    x, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 5, 10, 19])
    with torch.no_grad():
        exact = diffusion.network(x, t)
        diffusion.amp = True
        seen = []
        hook = diffusion.model.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        half = diffusion.network(x, t)
        hook.remove()
    assert seen == [torch.bfloat16] and half.dtype == torch.float32
    assert (half - exact).abs().max() < 0.05 * exact.abs().max() and not torch.equal(half, exact)
    parsed = sampling.build_parser().parse_args(["--ckpt", str(ckpt), "--no-amp"])
    assert parsed.amp is False and sampling.build_parser().parse_args([]).amp is True
    opened = []
    monkeypatch.setattr(sampling, "load_for_sampling", lambda path, device, amp: opened.append(amp) or
                        load_for_sampling(path, device, amp))
    sampling.sample_from_args(sampling.build_parser().parse_args(
        ["--ckpt", str(ckpt), "--n", "1", "--steps", "2", "--no-amp", "--device", "cpu"]))
    assert opened == [False]


# ----------------------------------------------------------------------------- x̂_0 clamp

def test_clip_denoised_follows_the_checkpoint_unless_a_flag_says_otherwise(tiny_checkpoint, tmp_path, capsys):
    """A checkpoint without the key (from before the option) clamps, as DDPM's code does; one trained with
    --no-clip-denoised does not; --clip-denoised / --no-clip-denoised override either, and the resolved
    settings line says which ran."""
    import train_mnist
    from plumbing.checkpoint import load_for_sampling
    assert train_mnist.DEFAULTS["clip_denoised"] is False
    old, new = tiny_checkpoint("old.pt"), tiny_checkpoint("new.pt", clip_denoised=False)
    assert load_for_sampling(old)[0].clip_denoised is True and load_for_sampling(new)[0].clip_denoised is False
    images = {}
    for ckpt, flags in [(old, []), (old, ["--no-clip-denoised"]), (new, []), (new, ["--clip-denoised"])]:
        images[ckpt.name, *flags] = run(ckpt, tmp_path, "--n", "4", "--sampler", "ddpm", "--steps", "20", *flags)
        clipped = (ckpt == old) != bool(flags)
        assert f"clip_denoised={clipped}" in capsys.readouterr().out, (ckpt.name, flags)
    # Same weights and seed: the clamp alone changes the images, and the flag gives what the default gives.
    assert np.array_equal(images["old.pt",], images["new.pt", "--clip-denoised"])
    assert np.array_equal(images["old.pt", "--no-clip-denoised"], images["new.pt",])
    assert not np.array_equal(images["old.pt",], images["new.pt",])


def test_without_ckpt_the_trained_model_else_the_shipped_one(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from tools import ship
    ckpt = tiny_checkpoint(num_classes=3, class_names=["a", "b", "c"], channels=3, dataset="cifar10")
    monkeypatch.chdir(tmp_path)
    flags = ["--n", "3", "--sampler", "ddim", "--steps", "2", "--device", "cpu", "--no-grid", "--npz", "s.npz"]
    with pytest.raises(SystemExit, match="cifar10_ema.pt"):       # neither: the trained one is what is missing
        generate_cifar.main(flags)
    ship.main([str(ckpt), "pretrained/cifar10.pt"])
    generate_cifar.main(flags)                                     # a fresh clone: the shipped model
    assert "sampling the shipped model pretrained/cifar10.pt" in capsys.readouterr().out
    with np.load(tmp_path / "s.npz") as d:
        assert str(d["ckpt"]) == "cifar10.pt"
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(ckpt, tmp_path / "checkpoints" / "cifar10_ema.pt")
    generate_cifar.main(flags)                                     # once trained: your own model
    assert "shipped" not in capsys.readouterr().out
    with np.load(tmp_path / "s.npz") as d:
        assert str(d["ckpt"]) == "cifar10_ema.pt"


def poison(ckpt):
    """Make the checkpoint's network answer NaN: one NaN in the bias of its output layer."""
    state = torch.load(ckpt, weights_only=True)
    name = [k for k in state["ema_model"] if k.endswith("bias")][-1]
    state["ema_model"][name][0] = float("nan")
    torch.save(state, ckpt)


def test_samples_that_are_not_finite_are_refused_and_nothing_is_written(tiny_checkpoint, tmp_path):
    """A network that answers NaN (a damaged checkpoint, an overflow) used to give black images without a
    word (NaN cast to uint8); now one line, and no grid, PNG or .npz."""
    ckpt = tiny_checkpoint()
    poison(ckpt)
    msg = refusal(["--ckpt", str(ckpt), "--n", "3", "--sampler", "ddim", "--steps", "3", "--device", "cpu",
                   "--grid", str(tmp_path / "grid.png"), "--npz", str(tmp_path / "run.npz"), "--out", str(tmp_path / "pngs")])
    assert msg.startswith("error: 3 of 3 images have NaN or infinite pixels"), msg
    assert not any((tmp_path / name).exists() for name in ("grid.png", "run.npz", "pngs"))


def test_a_training_grid_of_samples_that_are_not_finite_is_skipped_with_a_line(tiny_checkpoint, tmp_path, capsys):
    """The trainer's grid never ends a run: samples that are not finite give a line and no file."""
    from types import SimpleNamespace
    from plumbing.checkpoint import load_for_sampling
    from plumbing.runlog import draw_grid
    ckpt = tiny_checkpoint()
    poison(ckpt)
    diffusion = load_for_sampling(ckpt, "cpu")[0]
    args = SimpleNamespace(sample_count=4, sample_sampler="ddim", sample_steps=3, sample_dir=str(tmp_path),
                           run_name="tiny")
    assert draw_grid(diffusion, args, 7, runlog=None) is None
    assert "step 7: no grid: 4 of 4 images have NaN" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.png"))
