"""EDM's stochastic sampler, DPM-Solver++(2M), the σ ↔ t map they share with the discrete model, and
Min-SNR-γ loss weighting, identity by identity; and for all four samplers (DDPM and DDIM too), the
network calls they make and the settings they refuse.

The network here is exact: for data x_0 ~ N(μ, s²·I), q(x_t) = N(√ᾱ_t·μ, (ᾱ_t·s² + 1 − ᾱ_t)·I) and the
ε that minimises eq. 14 is E[ε | x_t] in closed form. So a sampler's only errors are its own
(discretisation, noise), and for the probability-flow ODE the exact end point is known too:
x_σ − μ ∝ √(s² + σ²) along dx_σ/dσ = (x_σ − D(x_σ; σ))/σ. Index convention as in diffusion.py.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import ROOT, WavyEps, make_diffusion, reference
from samplers import EDM_MIN_CALLS, SIGMA_MAX, edm_sigmas, sigma_to_t, t_to_sigma

T = 1000                                                   # the MNIST runs' linear schedule
MU = torch.tensor([[0.3, -0.2], [0.1, 0.0]], dtype=torch.float64).reshape(1, 1, 2, 2)
S = 0.5                                                    # the data's std, about that of images in [−1, 1]
SAMPLERS = ["ddpm", "ddim", "edm", "dpmpp2m"]


# ----------------------------------------------------------------------------- helpers

class GaussianEps(nn.Module):
    """The true ε*(x_t, t) = E[ε | x_t] for x_0 ~ N(μ, s²·I):
    E[x_0 | x_t] = μ + √ᾱ·s²/(ᾱ·s² + 1 − ᾱ)·(x_t − √ᾱ·μ),  ε* = (x_t − √ᾱ·E[x_0 | x_t])/√(1 − ᾱ).
    At a fractional t, ᾱ = 1/(1 + σ²) with log σ interpolated linearly in t by numpy, not by diffusion.py."""
    num_classes = None

    def __init__(self, alpha_bar):
        super().__init__()
        self.log_sigmas = (0.5 * ((1 - alpha_bar) / alpha_bar).log()).numpy()        # (T,) float64
        self.calls = []                                                              # t of every call

    def forward(self, xt, t, labels=None):
        self.calls.append(t.clone())
        log_sigma = np.interp(t.double().numpy(), np.arange(len(self.log_sigmas)), self.log_sigmas)
        ab = (1 / (1 + (2 * torch.from_numpy(log_sigma)).exp())).reshape(-1, 1, 1, 1)   # ᾱ = 1/(1 + σ²)
        x = xt.double()
        x0 = MU + ab.sqrt() * S ** 2 / (ab * S ** 2 + 1 - ab) * (x - ab.sqrt() * MU)
        return ((x - ab.sqrt() * x0) / (1 - ab).sqrt()).float()


def gaussian_diffusion():
    alpha_bar = make_diffusion(nn.Identity()).alphas_cumprod.double()       # the float32 ᾱ the model would see
    return make_diffusion(GaussianEps(alpha_bar))


def final_x(diffusion, n, **settings):
    """The sample itself (sample() clamps it to [−1, 1], which would cut a Gaussian's tails)."""
    for _, x, _ in diffusion.sample_iter(n, clip_denoised=False, progress=False, **settings):
        pass
    return x.double()


def exact_flow(diffusion, x_T, sigma_max=None):
    """The probability-flow ODE's end point from x_T at σ_max (default: the table's, σ_{T−1}) down to σ_min,
    where x_σ − μ ∝ √(s² + σ²), then the last step x̂_0 = D(x; σ_min) = μ + s²/(s² + σ_min²)·(x − μ) that
    every solver here ends with."""
    sigma_min = diffusion.sigma_table[0].item()
    sigma_max = diffusion.sigma_table[-1].item() if sigma_max is None else sigma_max
    x_max = x_T.double() * math.sqrt(1 + sigma_max ** 2)                                  # x_σ = x_t/√ᾱ
    x_min = MU + (x_max - MU) * math.sqrt((S ** 2 + sigma_min ** 2) / (S ** 2 + sigma_max ** 2))
    return MU + S ** 2 / (S ** 2 + sigma_min ** 2) * (x_min - MU)


# ----------------------------------------------------------------------------- reaching the data

@pytest.mark.parametrize("sampler,steps,settings,var_tol", [
    ("edm", 499, {}, 0.04),                       # default churn; measured bias +1.3% (n = 10⁵)
    ("dpmpp2m", 200, {}, 0.04),                   # +0.8%
    ("ddim", 500, {"eta": 0.0}, 0.04),            # −1.0%
    ("ddpm", 500, {}, 0.06),                      # ancestral on a respaced chain: −2.9%, O(1/steps)
])
def test_each_sampler_with_the_true_eps_reaches_the_data_marginal(sampler, steps, settings, var_tol):
    n = 10_000
    diffusion = gaussian_diffusion()
    x = final_x(diffusion, n, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0), **settings)
    z = (x - MU) / S                                                         # N(0, 1) in every pixel if exact
    assert torch.all(z.mean(0).abs() < 4 / math.sqrt(n)), z.mean(0)          # 4 standard errors per pixel
    assert abs(z.var().item() - 1) < var_tol, z.var().item()                 # pooled over pixels: SE 0.7%


@pytest.mark.parametrize("sampler,counts,settings,low,high", [
    ("ddim", [50, 100, 200], {"eta": 0.0}, 1.6, 2.5),       # first order: error halves per doubling
    ("dpmpp2m", [80, 160, 320], {}, 3.0, 6.0),              # second order: quarters
    ("edm", [17, 33, 65], {"churn": 0.0}, 3.0, 6.0),        # Heun, 2N − 1 calls: N − 1 = 8, 16, 32 intervals
])
def test_deterministic_solvers_converge_at_their_order(sampler, counts, settings, low, high):
    # Measured ratios: DDIM 1.99, 2.00; DPM-Solver++(2M) 4.01, 4.32; EDM Heun 4.56, 4.29. The uniform
    # t-grid on the linear schedule takes huge λ-steps near t = 0, so 2M leaves the pre-asymptotic
    # regime only past ~40 calls.
    diffusion = gaussian_diffusion()
    x_T = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    exact = exact_flow(diffusion, x_T, min(diffusion.sigma_table[-1].item(), SIGMA_MAX) if sampler == "edm" else None)
    errors = [(final_x(diffusion, 256, sampler=sampler, steps=c, x_T=x_T, **settings) - exact).abs().max().item()
              for c in counts]
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(low < r < high for r in ratios), (errors, ratios)


# ----------------------------------------------------------------------------- network calls

@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("steps", [None, 1, 2, 3, 5, 6, 10, 50])
def test_one_network_call_per_timestep_and_one_yield_per_call(sampler, steps):
    model = WavyEps()
    diffusion = make_diffusion(model, timesteps=50)
    if sampler == "edm" and steps in (3, 5):                        # Heun's jump into σ_min: refused
        with pytest.raises(ValueError, match=f"edm needs at least {EDM_MIN_CALLS} network calls"):
            diffusion.sampling_timesteps(sampler, steps)
        return
    ts = diffusion.sampling_timesteps(sampler, steps)
    yields = list(diffusion.sample_iter(3, sampler=sampler, steps=steps, progress=False))
    calls = steps or 50                              # the default: all T for ddpm, min(50, T) for the others
    assert len(model.calls) == len(ts) == len(yields) == calls
    assert [t for t, _, _ in yields] == ts and yields[-1][1].shape == (3, 1, 2, 2)
    seen = torch.stack([t for _, t, _ in model.calls])                             # (calls, batch)
    assert torch.allclose(seen.double(), torch.tensor(ts, dtype=torch.float64)[:, None].expand_as(seen), atol=1e-4)
    kind = float if sampler == "edm" else int
    assert all(type(t) is kind for t in ts)
    assert ts[0] == 49 and (calls == 1 or ts[-1] == 0)          # from t = T−1 down to t = 0
    if sampler != "edm":                     # (EDM's t rise again where churn lifts σ, and Heun calls twice at one σ)
        assert all(a > b for a, b in zip(ts, ts[1:]))           # distinct, descending: every t for ddpm's default


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_guidance_doubles_the_batch_not_the_calls(sampler):
    model = WavyEps(num_classes=3)
    diffusion = make_diffusion(model, timesteps=50)
    labels = torch.tensor([0, 1, 2, 1])
    diffusion.sample(4, sampler=sampler, steps=7, labels=labels, guidance=2.0, progress=False)
    assert [batch for batch, _, _ in model.calls] == [8] * 7
    doubled = torch.tensor([0, 1, 2, 1, 3, 3, 3, 3])                               # then the null label
    assert all(torch.equal(seen, doubled) for *_, seen in model.calls)
    model.calls.clear()
    diffusion.sample(4, sampler=sampler, steps=7, labels=labels, guidance=0.0, progress=False)
    assert [batch for batch, _, _ in model.calls] == [4] * 7
    assert all(torch.equal(seen, labels) for *_, seen in model.calls)


@pytest.mark.parametrize("sampler, settings, message", [
    *[(sampler, {"steps": steps}, "T = 50") for sampler in SAMPLERS for steps in (0, 51, -1, 2.5, True)],
    ("heun", {"steps": 10}, "unknown sampler 'heun'"),
    ("edm", {"steps": 7, "eta": 0.5}, "eta"),              # η means something only to DDIM's update
    ("dpmpp2m", {"steps": 5, "eta": 0.5}, "eta"),
])
def test_bad_sampler_settings_are_refused_saying_what_was_wrong(sampler, settings, message):
    diffusion = make_diffusion(WavyEps(), timesteps=50)
    if "eta" not in settings:
        with pytest.raises(ValueError, match=message):
            diffusion.sampling_timesteps(sampler, settings["steps"])
    with pytest.raises(ValueError, match=message):
        diffusion.sample(1, sampler=sampler, progress=False, **settings)


def test_edm_noise_levels_follow_eq5_and_spend_every_call():
    # EDM eq. 5: σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, ρ = 7; N steps make 2N − 1 calls
    # (the last step, to σ_N = 0, is Euler); an even count makes the first step Euler too.
    diffusion = make_diffusion(WavyEps())
    sigma_min, sigma_top = diffusion.sigma_table[0].item(), diffusion.sigma_table[-1].item()
    sigma_max = SIGMA_MAX                        # EDM's σ_max: this linear table runs on to σ_{T−1} ≈ 157
    assert sigma_top > sigma_max
    for calls, N, heun in [(9, 5, [1, 1, 1, 1, 0]), (10, 6, [0, 1, 1, 1, 1, 0]), (1, 1, [0]), (2, 2, [0, 0])]:
        plan = edm_sigmas(diffusion.sigma_table, calls, churn=0.0)
        expected = [sigma_max] if N == 1 else [
            (sigma_max ** (1 / 7) + i / (N - 1) * (sigma_min ** (1 / 7) - sigma_max ** (1 / 7))) ** 7 for i in range(N)]
        assert [s for s, _, _, _ in plan] == pytest.approx(expected, rel=1e-12)
        assert [s_next for _, _, s_next, _ in plan] == pytest.approx(expected[1:] + [0.0], rel=1e-12)
        assert [int(h) for *_, h in plan] == heun and sum(1 + h for h in heun) == calls
    # churn: γ = min(S_churn/N, √2 − 1) inside [S_tmin, S_tmax] only, and never above the table's σ_{T−1}
    for s_tmax in (50.0, 1e6):
        for sigma, sigma_hat, _, _ in edm_sigmas(diffusion.sigma_table, 25, churn=40.0, s_tmin=0.05, s_tmax=s_tmax):
            gamma = math.sqrt(2) - 1 if 0.05 <= sigma <= s_tmax else 0.0
            assert sigma_hat == pytest.approx(min(sigma * (1 + gamma), sigma_top), rel=1e-12)


def test_edm_starts_at_sigma_80_not_at_the_end_of_a_cosine_table():
    # A cosine table runs on to σ_{T−1} ≈ 2·10⁴; eq. 5 from there would spend 8 of 13 steps above σ = 80,
    # where x_t is noise to 1%. From EDM's σ_max = 80 every step is below it, 6 of them in σ ∈ [0.05, 10].
    cosine = make_diffusion(WavyEps(), schedule="cosine")
    assert cosine.sigma_table[-1].item() > 1e4
    sigmas = [s for s, _, _, _ in edm_sigmas(cosine.sigma_table, 25, churn=0.0)]
    assert sigmas[0] == SIGMA_MAX and sum(s > SIGMA_MAX for s in sigmas) == 0 and len(sigmas) == 13
    assert sum(0.05 <= s <= 10 for s in sigmas) == 6              # from σ_{T−1} ≈ 2·10⁴: only 2 of the 13
    ts = cosine.sampling_timesteps("edm", 25, churn=0.0)
    assert ts[0] == pytest.approx(sigma_to_t(cosine.sigma_table, SIGMA_MAX).item()) and ts[0] < 999
    # a short table that never reaches σ = 80 still starts at its own end
    short = make_diffusion(WavyEps(), timesteps=50)
    assert short.sigma_table[-1].item() < SIGMA_MAX
    assert edm_sigmas(short.sigma_table, 9, churn=0.0)[0][0] == short.sigma_table[-1].item()


def test_edm_without_churn_is_deterministic_and_with_churn_draws_noise():
    diffusion = make_diffusion(WavyEps(), timesteps=50)
    x_T = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0))

    def run(churn, seed):
        return final_x(diffusion, 4, sampler="edm", steps=9, churn=churn, s_tmin=0.0, x_T=x_T,
                       generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0.0, 1), run(0.0, 2))
    assert not torch.allclose(run(40.0, 1), run(40.0, 2))


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("clip_denoised", [False, True])
def test_first_order_steps_are_ddim_steps_in_every_parameterisation(objective, clip_denoised):
    # EDM with one call: x_0 = D(x_T/√ᾱ_{T−1}; σ_max), the x̂_0 of DDIM's one step from t = T−1, so EDM's
    # scaling, its σ ↔ t at the table's end and D's x_0/ε/v conversions agree with model_predictions.
    # DPM-Solver++(2M) with two calls makes two first-order steps, which are DDIM's η = 0 steps.
    diffusion = make_diffusion(WavyEps(), timesteps=50, objective=objective)
    x_T = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for sampler, steps in [("edm", 1), ("dpmpp2m", 2)]:
        x = final_x(diffusion, 8, sampler=sampler, steps=steps, x_T=x_T)
        ddim = [x for _, x, _ in diffusion.sample_iter(8, sampler="ddim", steps=steps, x_T=x_T,
                                                        clip_denoised=clip_denoised, progress=False)][-1]
        if clip_denoised:
            x = [x for _, x, _ in diffusion.sample_iter(8, sampler=sampler, steps=steps, x_T=x_T, progress=False)][-1]
        assert torch.allclose(x.float(), ddim, atol=1e-5), (sampler, (x.float() - ddim).abs().max())


def test_each_dpm_solver_step_is_the_2m_update_of_the_yielded_x0_hats():
    # DPM-Solver++ Alg. 2 with λ = ½·log(ᾱ/(1 − ᾱ)), h_i = λ_{t_i} − λ_{t_{i−1}}, r_i = h_{i−1}/h_i:
    # x_{t_i} = √((1 − ᾱ_{t_i})/(1 − ᾱ_{t_{i−1}}))·x_{t_{i−1}} − √ᾱ_{t_i}·(e^{−h_i} − 1)·D_i,
    # D_i = x̂_0 + (h_i/(2h_{i−1}))·(x̂_0 − x̂_0,prev) = (1 + 1/(2r_i))·x̂_0 − 1/(2r_i)·x̂_0,prev (D_1 = x̂_0).
    # On 4 steps of T = 1000 the λ-steps differ a lot (r far from 1), unlike on the fine grids above.
    diffusion = make_diffusion(WavyEps())
    alpha_bar = diffusion.alphas_cumprod.double()
    ts = diffusion.sampling_timesteps("dpmpp2m", 4)
    x = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    yields = list(diffusion.sample_iter(8, sampler="dpmpp2m", steps=4, x_T=x, clip_denoised=False, progress=False))
    lam = [0.5 * math.log(alpha_bar[t] / (1 - alpha_bar[t])) for t in ts]
    x, x0_prev, h_prev = x.double(), None, None
    for i, (t, x_next, x0) in enumerate(yields[:-1]):
        h = lam[i + 1] - lam[i]
        D = x0.double() if i == 0 else x0.double() + h / (2 * h_prev) * (x0.double() - x0_prev)
        ab, ab_next = alpha_bar[t], alpha_bar[ts[i + 1]]
        expected = ((1 - ab_next) / (1 - ab)).sqrt() * x - ab_next.sqrt() * math.expm1(-h) * D
        assert torch.allclose(x_next.double(), expected, rtol=1e-5, atol=1e-5), i
        if i > 0:
            assert not 0.8 < h_prev / h < 1.25                       # r_i far from 1: the test can tell r from 1/r
        x, x0_prev, h_prev = x_next.double(), x0.double(), h
    assert torch.equal(yields[-1][1], yields[-1][2])                 # the last step: x_0 = x̂_0


def test_yielded_x_t_is_in_ddpm_scaling_for_edm():
    # Each call yields the x reached so far at σ_{i+1}, in DDPM's scaling x_σ/√(1 + σ²): with the true ε its
    # spread is q(x_t)'s, var = ᾱ·s² + 1 − ᾱ with ᾱ = 1/(1 + σ²), near 1 until the end, while EDM's own
    # x_σ = x_t/√ᾱ has var s² + σ², up to σ_max² ≈ 157². Measured ratios 0.91 … 1.21 at 49 calls (the end
    # over-disperses by ~18%: EDM's churned Heun steps are coarse there), hence the loose band.
    diffusion = gaussian_diffusion()
    levels = []
    for _, _, sigma_next, heun in edm_sigmas(diffusion.sigma_table, 49):
        levels += [sigma_next, sigma_next] if heun else [sigma_next]
    yields = list(diffusion.sample_iter(4000, sampler="edm", steps=49, clip_denoised=False, progress=False,
                                        generator=torch.Generator().manual_seed(3)))
    assert len(yields) == len(levels) == 49
    for (_, x, _), sigma in zip(yields, levels):
        alpha_bar = 1 / (1 + sigma ** 2)
        assert 0.8 < x.var(0).mean().item() / (alpha_bar * S ** 2 + 1 - alpha_bar) < 1.3, sigma


# ----------------------------------------------------------------------------- σ ↔ t

def test_sigma_is_the_ddpm_noise_to_signal_ratio_and_t_of_sigma_is_exact_on_the_table():
    diffusion = make_diffusion(WavyEps())
    alpha_bar = diffusion.alphas_cumprod.double()
    assert torch.allclose(diffusion.sigma_table, ((1 - alpha_bar) / alpha_bar).sqrt(), rtol=1e-12, atol=0)
    t = torch.arange(T, dtype=torch.float64)
    assert torch.allclose(sigma_to_t(diffusion.sigma_table, diffusion.sigma_table), t, rtol=0, atol=1e-9)
    assert torch.allclose(t_to_sigma(diffusion.sigma_table, t), diffusion.sigma_table, rtol=1e-12, atol=0)


def test_t_of_sigma_is_monotone_between_table_entries_and_log_linear():
    diffusion = make_diffusion(WavyEps())
    table = diffusion.sigma_table
    sigmas = torch.logspace(math.log10(table[0]), math.log10(table[-1]), 20_000, dtype=torch.float64)[1:-1]
    t = sigma_to_t(diffusion.sigma_table, sigmas)
    assert (t.diff() > 0).all() and t[0] > 0 and t[-1] < T - 1
    assert torch.allclose(t_to_sigma(diffusion.sigma_table, t), sigmas, rtol=1e-10, atol=0)           # each the other's inverse
    midpoints = (table[:-1] * table[1:]).sqrt()                                          # log-midpoints
    halves = torch.arange(T - 1, dtype=torch.float64) + 0.5
    assert torch.allclose(sigma_to_t(diffusion.sigma_table, midpoints), halves, rtol=0, atol=1e-9)
    # outside the table the step is clamped to its ends
    assert sigma_to_t(diffusion.sigma_table, table[0].item() / 2).item() == 0 and sigma_to_t(diffusion.sigma_table, 1e9).item() == T - 1


# ----------------------------------------------------------------------------- Min-SNR-γ

@pytest.mark.parametrize("objective", ["eps", "v", "x0"])
def test_min_snr_weight_is_min_snr_gamma_relative_to_the_objective(objective):
    # Hang et al. 2023: min(SNR_t, γ)/SNR_t for ε, min(SNR_t, γ)/(SNR_t + 1) for v, min(SNR_t, γ) for x_0.
    _, _, alpha_bar, _ = reference("linear", T)
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=5.0)
    expected = {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[objective]
    diffusion = make_diffusion(WavyEps(), objective=objective, loss_weighting="min_snr")
    assert torch.allclose(diffusion.min_snr_weight(torch.arange(T)).double(), expected, rtol=2e-4, atol=0)
    assert (snr > 5).any() and (snr < 5).any()                                  # both branches of the min


def test_min_snr_loss_weights_each_images_squared_error_and_simple_is_unchanged():
    x0 = torch.rand(64, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    simple = make_diffusion(WavyEps())
    min_snr = make_diffusion(WavyEps(), loss_weighting="min_snr", min_snr_gamma=5.0)

    def draws(seed):                                   # the loss's own draws: t, then ε
        torch.manual_seed(seed)
        t = torch.randint(0, T, (64,))
        eps = torch.randn_like(x0)
        return t, eps, simple.q_sample(x0, t, eps)

    t, eps, xt = draws(1)
    squared_error = (simple.model(xt, t) - eps).pow(2)                                  # (B, C, H, W)
    torch.manual_seed(1)
    assert torch.equal(simple.loss(x0), F.mse_loss(simple.model(xt, t), eps))          # DDPM eq. 14, as before
    torch.manual_seed(1)
    weighted = (min_snr.min_snr_weight(t) * squared_error.flatten(1).mean(1)).mean()
    assert torch.allclose(min_snr.loss(x0), weighted, rtol=1e-6, atol=0)
    assert not torch.allclose(weighted, squared_error.mean(), rtol=1e-2)                # the weights do matter
    # with γ above every SNR_t, ε's weight min(SNR, γ)/SNR is 1 and Min-SNR is L_simple again
    torch.manual_seed(1)
    assert torch.allclose(make_diffusion(WavyEps(), loss_weighting="min_snr", min_snr_gamma=1e9).loss(x0),
                          squared_error.mean(), rtol=1e-5, atol=0)


def test_unknown_loss_weighting_or_nonpositive_gamma_is_refused():
    with pytest.raises(ValueError, match="loss_weighting"):
        make_diffusion(WavyEps(), loss_weighting="p2")
    with pytest.raises(ValueError, match="min_snr_gamma"):
        make_diffusion(WavyEps(), loss_weighting="min_snr", min_snr_gamma=0)


@pytest.mark.parametrize("calls", [3, 4, 5])
def test_edm_below_its_minimum_gives_noise_on_the_shipped_digits_model_and_is_refused(calls):
    # Why EDM_MIN_CALLS: run EDM's plan for 3–5 calls by hand on pretrained/mnist.pt: salt and pepper
    # (about half the pixels black, half white), where its 6-call samples are digits (mostly black
    # background, like MNIST's ≈ 80%). sampling_timesteps refuses 3–5 in one line.
    from plumbing.checkpoint import load_for_sampling
    from samplers import edm_steps
    diffusion, _ = load_for_sampling(ROOT / "pretrained" / "mnist.pt", torch.device("cpu"), amp=False)
    labels = torch.arange(16) % 10
    gen = torch.Generator().manual_seed(0)

    def run(n_calls):
        x = torch.randn(16, 1, 28, 28, generator=gen)
        plan = edm_sigmas(diffusion.sigma_table, n_calls)
        randn = lambda: torch.randn(16, 1, 28, 28, generator=gen)              # noqa: E731
        *_, (_, x, _) = edm_steps(diffusion, x, plan, 1.0, labels, 0.0, None, randn)
        return x.clamp(-1, 1)

    def dark(x):
        return (x < -0.75).float().mean().item()                               # pixels below 32/255

    assert dark(run(calls)) < 0.6 and dark(run(EDM_MIN_CALLS)) > 0.7
    with pytest.raises(ValueError, match=f"use {EDM_MIN_CALLS} or more"):
        diffusion.sample(4, sampler="edm", steps=calls, labels=labels[:4], progress=False)


def test_edm_without_labels_on_a_conditional_model_makes_one_call_a_step_whatever_w():
    """No labels: the model's unconditional output; classifier-free guidance would set ∅ against ∅
    (the same output) at twice the calls. As DDPM and DDIM do, w has nothing to act on."""
    from conftest import WavyEps, make_diffusion
    outs, calls = [], []
    for w in (0.0, 2.0):
        model = WavyEps(num_classes=3)
        diffusion = make_diffusion(model, timesteps=20, image_size=4)
        outs.append(diffusion.sample(2, sampler="edm", steps=7, guidance=w, progress=False,
                                     generator=torch.Generator().manual_seed(0)))
        calls.append(sum(batch for batch, _, _ in model.calls))
    assert torch.equal(outs[0], outs[1]) and calls[0] == calls[1] == 2 * 7
