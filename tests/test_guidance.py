"""The guidance rules (samplers.Guidance, applied in GaussianDiffusion.network), rule by rule:
classifier-free guidance mixes (1 + w)·out(y) − w·out(∅); the guidance interval (Kynkäänniemi et al.
2024) applies w only where σ_lo < σ_t ≤ σ_hi and skips the second call elsewhere; autoguidance
(Karras et al. 2024) mixes in a guide model's output, so a guide equal to the model is plain sampling.
"""

import math

import numpy as np
import pytest
import torch

from conftest import WavyEps, make_diffusion
from samplers import Guidance, as_guidance, check_guide, t_to_sigma

SAMPLERS = ["ddpm", "ddim", "edm", "dpmpp2m"]


def sigma(diffusion, t):
    return t_to_sigma(diffusion.sigma_table, t).item()


def test_interval_bounds_are_open_below_and_closed_above():
    diffusion = make_diffusion(timesteps=50)
    lo, hi = sigma(diffusion, 10), sigma(diffusion, 30)
    g = Guidance(2.0, sigma_lo=lo, sigma_hi=hi)
    weight = {t: g.weight_at(diffusion.sigma_table, torch.tensor([t])) for t in range(50)}
    assert [t for t, w in weight.items() if w == 2.0] == list(range(11, 31))        # σ_10 < σ_t ≤ σ_30
    assert all(w == 0.0 for t, w in weight.items() if not 11 <= t <= 30)
    between = g.weight_at(diffusion.sigma_table, torch.tensor([30.5]))                # fractional t (EDM)
    assert between == 0.0 and g.weight_at(diffusion.sigma_table, torch.tensor([10.5])) == 2.0


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_interval_guidance_runs_the_unconditional_call_only_inside_the_band(sampler):
    model = WavyEps(num_classes=3)
    diffusion = make_diffusion(model, timesteps=50)
    labels = torch.tensor([0, 1, 2, 1])
    lo, hi = sigma(diffusion, 15), sigma(diffusion, 35)
    g = Guidance(2.0, sigma_lo=lo, sigma_hi=hi)
    diffusion.sample(4, sampler=sampler, steps=9, labels=labels, guidance=g, progress=False)
    for batch, t, _ in model.calls:
        inside = lo < sigma(diffusion, t[0].item()) <= hi
        assert batch == (8 if inside else 4), f"t = {t[0].item()}: batch {batch}"
    assert {batch for batch, _, _ in model.calls} == {4, 8}                 # the band cut the chain
    ts = diffusion.sampling_timesteps(sampler, 9)
    assert g.calls(diffusion.sigma_table, ts) == sum(1 if batch == 4 else 2 for batch, _, _ in model.calls)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_the_samplers_resolve_the_interval_on_the_host(sampler):
    """network would read t back from the device to place it in the band (a sync per call on a GPU);
    the samplers hand it Guidance.at(σ_t) instead: no interval left, w already what the band says."""
    diffusion = make_diffusion(WavyEps(num_classes=3), timesteps=50)
    lo, hi = sigma(diffusion, 15), sigma(diffusion, 35)
    g = Guidance(2.0, sigma_lo=lo, sigma_hi=hi)
    seen, network = [], diffusion.network

    def spy(xt, t, labels=None, guidance=0.0):
        seen.append((t[0].item(), as_guidance(guidance)))
        return network(xt, t, labels, guidance)

    diffusion.network = spy
    diffusion.sample(4, sampler=sampler, steps=9, labels=torch.tensor([0, 1, 2, 1]), guidance=g, progress=False)
    assert len(seen) == len(diffusion.sampling_timesteps(sampler, 9))
    for t, resolved in seen:
        assert (resolved.sigma_lo, resolved.sigma_hi) == (0.0, math.inf), f"t = {t}: the interval reached network"
        assert resolved.w == g.weight_at(diffusion.sigma_table, torch.tensor([t])), f"t = {t}"
    assert {resolved.w for _, resolved in seen} == {0.0, 2.0}


def test_an_unbounded_interval_is_plain_classifier_free_guidance():
    model = WavyEps(num_classes=3)
    diffusion = make_diffusion(model, timesteps=50)
    labels = torch.tensor([0, 1, 2, 1])
    plain = diffusion.sample(4, steps=7, labels=labels, guidance=1.5, progress=False,
                             generator=torch.Generator().manual_seed(0))
    interval = diffusion.sample(4, steps=7, labels=labels, guidance=Guidance(1.5, 0.0, math.inf), progress=False,
                                generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain, interval)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("num_classes", [None, 3])
def test_autoguidance_with_the_model_as_its_own_guide_is_plain_sampling(sampler, num_classes):
    diffusion = make_diffusion(WavyEps(num_classes=num_classes), timesteps=50)
    labels = None if num_classes is None else torch.tensor([0, 1, 2, 1])
    kwargs = dict(sampler=sampler, steps=7, labels=labels, clip_denoised=False, progress=False)
    plain = diffusion.sample(4, guidance=0.0, generator=torch.Generator().manual_seed(1), **kwargs)
    guided = diffusion.sample(4, guidance=Guidance(3.0, guide=diffusion), generator=torch.Generator().manual_seed(1),
                              **kwargs)
    assert torch.allclose(plain, guided, atol=1e-5)        # (1 + w)·D − w·D = D, up to float rounding
    other = make_diffusion(WavyEps(num_classes=num_classes), timesteps=50)
    other.model.forward = lambda xt, t, labels=None: torch.zeros_like(xt)   # a guide that says "no noise"
    pushed = diffusion.sample(4, guidance=Guidance(3.0, guide=other), generator=torch.Generator().manual_seed(1),
                              **kwargs)
    assert not torch.allclose(plain, pushed, atol=1e-3)    # a different guide does change the samples


def test_autoguidance_mixes_one_plus_w_model_minus_w_guide():
    model, guide_model = WavyEps(num_classes=3), WavyEps(num_classes=3)
    diffusion, guide = make_diffusion(model, timesteps=50), make_diffusion(guide_model, timesteps=50)
    guide_model.forward = lambda xt, t, labels=None: 0.25 * xt + 0.01 * labels.float().reshape(-1, 1, 1, 1)
    xt, t, labels = torch.randn(3, 1, 2, 2), torch.full((3,), 20), torch.tensor([0, 2, 1])
    out = diffusion.network(xt, t, labels, Guidance(2.0, guide=guide))
    expected = 3.0 * model(xt, t, labels) - 2.0 * (0.25 * xt + 0.01 * labels.float().reshape(-1, 1, 1, 1))
    assert torch.allclose(out, expected, atol=1e-6)


def test_a_guide_of_another_recipe_and_bad_weights_are_refused():
    diffusion = make_diffusion(timesteps=50)
    with pytest.raises(ValueError, match="num_timesteps = 40"):
        check_guide(diffusion, make_diffusion(timesteps=40))
    with pytest.raises(ValueError, match="schedule = 'cosine'"):
        check_guide(diffusion, make_diffusion(timesteps=50, schedule="cosine"))
    check_guide(diffusion, make_diffusion(timesteps=50))
    for bad in (-1.0, math.nan, math.inf, True):
        with pytest.raises(ValueError, match="guidance weight"):
            as_guidance(bad)
    with pytest.raises(ValueError, match="interval"):
        as_guidance(Guidance(1.0, sigma_lo=5.0, sigma_hi=1.0))


# ----------------------------------------------------------------------------- from the command line

def test_guidance_flags_from_the_command_line_and_their_file_names(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import generate
    conditional = tiny_checkpoint("cond.pt", num_classes=3)
    monkeypatch.chdir(tmp_path)
    base = ["--ckpt", str(conditional), "--n", "3", "--steps", "6", "--device", "cpu"]
    generate.main(base)
    generate.main(base + ["--guidance", "1"])
    generate.main(base + ["--guidance", "2", "--guidance-interval", "0.3", "5"])
    generate.main(base + ["--guidance", "1", "--guide", str(conditional)])
    names = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert names == ["mnist_ddpm6.png", "mnist_ddpm6_w1.png", "mnist_ddpm6_w1_guide.png", "mnist_ddpm6_w2_s0.3-5.png"]
    out = capsys.readouterr().out
    assert "12 network calls each with guidance" in out                             # w = 1 everywhere: 2 × 6
    # an unconditional model takes autoguidance, but not classifier-free guidance
    unconditional = tiny_checkpoint("uncond.pt")
    generate.main(["--ckpt", str(unconditional), "--n", "2", "--steps", "6", "--guidance", "1",
                   "--guide", str(unconditional), "--npz", str(tmp_path / "auto.npz"), "--no-grid"])
    generate.main(["--ckpt", str(unconditional), "--n", "2", "--steps", "6", "--npz", str(tmp_path / "plain.npz"),
                   "--no-grid"])
    with np.load(tmp_path / "auto.npz") as auto, np.load(tmp_path / "plain.npz") as plain:
        assert (float(auto["guidance"]), int(auto["calls"]), str(auto["guidance_tag"])) == (1.0, 12, "_w1_guide")
        assert np.array_equal(auto["images"], plain["images"])     # its own guide: D + w·(D − D) = D
    with pytest.raises(SystemExit, match="only for class-conditional models"):
        generate.main(["--ckpt", str(unconditional), "--n", "2", "--steps", "6", "--guidance", "1"])


@pytest.mark.parametrize("flags, message", [
    (["--guidance", "1", "--guidance-interval", "5", "1"], "--guidance-interval: the guidance interval needs"),
    (["--guide", "GUIDE"], "--guide: autoguidance needs a weight"),
    (["--guidance", "1", "--guide", "OTHER"], "the guide model has num_timesteps = 30"),
    (["--guidance", "1", "--guide", "MISSING"], "does not exist"),
])
def test_bad_guidance_flags_are_refused_in_one_line(tiny_checkpoint, tmp_path, flags, message):
    import generate
    ckpt = tiny_checkpoint("cond.pt", num_classes=3)
    other = tiny_checkpoint("other.pt", num_classes=3, timesteps=30)
    swap = {"GUIDE": str(ckpt), "OTHER": str(other), "MISSING": str(tmp_path / "missing.pt")}
    with pytest.raises(SystemExit) as e:
        generate.main(["--ckpt", str(ckpt), "--n", "2", "--steps", "6", "--no-grid", "--device", "cpu",
                       *[swap.get(f, f) for f in flags]])
    assert message in str(e.value) and "\n" not in str(e.value)
