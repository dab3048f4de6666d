"""diffusion.py, identity by identity: schedules, forward process, posterior, samplers, losses.

Index convention as in diffusion.py: the tensor index t ∈ {0, …, T−1} is the paper's step t + 1.
Reference values are computed in float64 from the β's alone (conftest.reference: plain loops, not
the buffers), so a wrong buffer cannot agree with itself. Networks are fake: small modules computing
a fixed function of x_t and t, so every test runs in milliseconds. How many network calls each
sampler makes, and which settings it refuses, is in test_samplers.py, for all four samplers at once.
"""

import math

import pytest
import torch
import torch.nn as nn

from conftest import WavyEps, make_diffusion, reference
from diffusion import cosine_beta_schedule, linear_beta_schedule

SCHEDULE_FNS = {"linear": linear_beta_schedule, "cosine": cosine_beta_schedule}


# ----------------------------------------------------------------------------- helpers

def per_sample(values, t):
    """(T,) values at (B,) steps -> (B, 1, 1, 1)."""
    return values[t].reshape(-1, 1, 1, 1)


class ConsistentEps(nn.Module):
    """ε(x_t, t) = (x_t − √ᾱ_t·x0)/√(1−ᾱ_t) for one fixed x0: the ε that makes eq. 4 hold, so x̂_0 = x0."""
    num_classes = None

    def __init__(self, x0, alpha_bar):
        super().__init__()
        self.x0, self.alpha_bar = x0.double(), alpha_bar

    def forward(self, xt, t, labels=None):
        ab = per_sample(self.alpha_bar, t)
        return ((xt.double() - ab.sqrt() * self.x0) / (1 - ab).sqrt()).float()


class LabelledEps(nn.Module):
    """A class-conditional fake: out = 0.1·x_t + y (the null label is num_classes); records every call."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.num_classes = num_classes
        self.calls = []                                       # (batch size, t, labels) per call

    def forward(self, xt, t, labels=None):
        if labels is None:
            labels = torch.full_like(t, self.num_classes)
        self.calls.append((xt.shape[0], t.clone(), labels.clone()))
        return 0.1 * xt + labels.float().reshape(-1, 1, 1, 1)


# ----------------------------------------------------------------------------- schedules

def test_linear_schedule_runs_from_1e4_to_0_02_in_float64():
    betas = linear_beta_schedule(1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == 1e-4 and betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    steps = betas.diff()                                             # evenly spaced: (0.02 − 1e-4)/999
    assert torch.allclose(steps, torch.full_like(steps, (0.02 - 1e-4) / 999), rtol=0, atol=1e-15)


@pytest.mark.parametrize("timesteps", [10, 1000])
def test_cosine_alpha_bar_equals_f_t_over_f_0_where_beta_unclipped(timesteps):
    # Nichol & Dhariwal eq. 17: ᾱ_t = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s)·π/2), s = 0.008.
    s = 0.008
    f = [math.cos((k / timesteps + s) / (1 + s) * math.pi / 2) ** 2 for k in range(timesteps + 1)]
    betas, _, alpha_bar, _ = reference("cosine", timesteps)
    unclipped = betas < 0.999
    first_clipped = int((~unclipped).nonzero()[0]) if (~unclipped).any() else timesteps
    assert first_clipped == timesteps - 1, "only the singular last step should need the clip"
    assert betas[-1].item() == 0.999

    # index i is the paper's step i + 1; after a clip ᾱ departs from f, so compare up to the first one
    expected = torch.tensor([f[i + 1] / f[0] for i in range(first_clipped)], dtype=torch.float64)
    assert torch.allclose(alpha_bar[:first_clipped], expected, rtol=1e-10, atol=0)
    buffer = make_diffusion(timesteps=timesteps, schedule="cosine").alphas_cumprod
    assert torch.allclose(buffer[:first_clipped].double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("timesteps", [10, 1000, 4000])
def test_every_beta_in_0_0999_and_alpha_bar_strictly_decreasing(schedule, timesteps):
    betas = SCHEDULE_FNS[schedule](timesteps)
    assert ((betas > 0) & (betas <= 0.999)).all()
    assert (torch.cumprod(1 - betas, 0).diff() < 0).all()
    diffusion = make_diffusion(timesteps=timesteps, schedule=schedule)
    assert ((diffusion.betas > 0) & (diffusion.betas <= 0.999)).all()
    assert (diffusion.alphas_cumprod.diff() < 0).all()                  # still strict after float32
    assert (diffusion.alphas_cumprod > 0).all() and (diffusion.alphas_cumprod < 1).all()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_buffers_are_float32_of_shape_T(schedule):
    diffusion = make_diffusion(timesteps=50, schedule=schedule)
    for name in ["betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance",
                 "posterior_mean_coef1", "posterior_mean_coef2"]:
        buffer = getattr(diffusion, name)
        assert buffer.dtype == torch.float32 and buffer.shape == (50,), name
    assert torch.allclose(diffusion.betas.double(), SCHEDULE_FNS[schedule](50), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- forward process

def test_q_sample_moments_match_sqrt_alpha_bar_x0_and_one_minus_alpha_bar():
    # eq. 4: q(x_t | x_0) = N(√ᾱ_t·x_0, (1 − ᾱ_t)·I), checked on N = 20,000 draws per t.
    torch.manual_seed(0)
    n = 20_000
    diffusion = make_diffusion()
    _, _, alpha_bar, _ = reference("linear", 1000)
    x0 = torch.tensor([[-1.0, -0.3], [0.5, 1.0]]).reshape(1, 1, 2, 2).expand(n, 1, 2, 2)
    for step in [0, 100, 300, 600, 999]:
        t = torch.full((n,), step, dtype=torch.long)
        xt = diffusion.q_sample(x0, t).double()
        mean, var = alpha_bar[step].sqrt() * x0[0].double(), 1 - alpha_bar[step]
        std_err = (var / n).sqrt()
        assert torch.allclose(xt.mean(0), mean, rtol=0, atol=5 * std_err.item()), step
        assert torch.allclose(xt.var(0), var.expand(1, 2, 2), rtol=0.05, atol=0), step


def test_q_sample_with_given_noise_is_sqrt_alpha_bar_x0_plus_sqrt_one_minus_alpha_bar_eps():
    diffusion = make_diffusion()
    _, _, alpha_bar, _ = reference("linear", 1000)
    t = torch.arange(1000)
    x0, eps = torch.rand(1000, 1, 2, 2) * 2 - 1, torch.randn(1000, 1, 2, 2)
    ab = per_sample(alpha_bar, t)
    expected = ab.sqrt() * x0.double() + (1 - ab).sqrt() * eps.double()
    assert torch.allclose(diffusion.q_sample(x0, t, eps).double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("step", [0, 50, 500])
def test_jumping_to_xt_agrees_with_t_one_step_kernels(step):
    # Applying q(x_s | x_{s−1}) = N(√α_s·x_{s−1}, β_s·I) for s = 0 … t gives the same Gaussian as eq. 4.
    torch.manual_seed(1)
    n = 20_000
    diffusion = make_diffusion()
    betas = diffusion.betas
    x0 = torch.tensor([[-1.0, -0.3], [0.5, 1.0]]).reshape(1, 1, 2, 2).expand(n, 1, 2, 2)
    x = x0.clone()
    for s in range(step + 1):
        x = (1 - betas[s]).sqrt() * x + betas[s].sqrt() * torch.randn_like(x)
    jumped = diffusion.q_sample(x0, torch.full((n,), step, dtype=torch.long))
    var = 1 - diffusion.alphas_cumprod[step]
    std_err = (2 * var / n).sqrt()                                   # of a difference of two means
    assert torch.allclose(x.mean(0), jumped.mean(0), rtol=0, atol=5 * std_err.item())
    assert torch.allclose(x.var(0), jumped.var(0), rtol=0.06, atol=0)
    assert torch.allclose(x.var(0), var.expand(1, 2, 2), rtol=0.05, atol=0)


# ----------------------------------------------------------------------------- model mean and posterior

@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_p_mean_with_true_eps_equals_q_posterior_mean_at_every_t(schedule):
    # eq. 11 with ε_θ = the ε that made x_t equals eq. 7's μ̃_t(x_t, x_0), for every t at once.
    torch.manual_seed(2)
    diffusion = make_diffusion(schedule=schedule)
    t = torch.arange(1000)
    x0, eps = torch.rand(1000, 1, 4, 4) * 2 - 1, torch.randn(1000, 1, 4, 4)
    xt = diffusion.q_sample(x0, t, eps)
    posterior_mean, _ = diffusion.q_posterior(x0, xt, t)
    assert torch.allclose(diffusion.p_mean(xt, t, eps), posterior_mean, rtol=1e-4, atol=1e-4)
    # and it is not trivially true: a wrong ε gives a different mean
    assert not torch.allclose(diffusion.p_mean(xt, t, eps + 0.1), posterior_mean, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_coefficients_and_variance_equal_closed_forms_eq7(schedule):
    # μ̃_t = √ᾱ_{t−1}·β_t/(1−ᾱ_t)·x_0 + √α_t·(1−ᾱ_{t−1})/(1−ᾱ_t)·x_t,  β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t
    diffusion = make_diffusion(schedule=schedule)
    betas, alphas, alpha_bar, alpha_bar_prev = reference(schedule, 1000)
    coef1 = alpha_bar_prev.sqrt() * betas / (1 - alpha_bar)
    coef2 = alphas.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar)
    beta_tilde = (1 - alpha_bar_prev) / (1 - alpha_bar) * betas
    assert torch.allclose(diffusion.posterior_mean_coef1.double(), coef1, rtol=1e-5, atol=1e-7)
    assert torch.allclose(diffusion.posterior_mean_coef2.double(), coef2, rtol=1e-5, atol=1e-7)
    assert torch.allclose(diffusion.posterior_variance.double(), beta_tilde, rtol=1e-5, atol=1e-9)
    assert diffusion.posterior_variance[0] == 0                      # x_0 is known exactly at step 1


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_equals_bayes_product_of_forward_kernels(schedule):
    # q(x_{t−1}|x_t, x_0) ∝ N(x_t; √α_t·x_{t−1}, β_t) · N(x_{t−1}; √ᾱ_{t−1}·x_0, 1−ᾱ_{t−1}), t ≥ 1:
    # precision 1/β̃ = α_t/β_t + 1/(1−ᾱ_{t−1}), mean β̃·(√α_t/β_t·x_t + √ᾱ_{t−1}/(1−ᾱ_{t−1})·x_0).
    diffusion = make_diffusion(schedule=schedule)
    betas, alphas, _, alpha_bar_prev = reference(schedule, 1000)
    betas, alphas, alpha_bar_prev = betas[1:], alphas[1:], alpha_bar_prev[1:]
    var = 1 / (alphas / betas + 1 / (1 - alpha_bar_prev))
    assert torch.allclose(diffusion.posterior_variance[1:].double(), var, rtol=1e-5, atol=0)
    assert torch.allclose(diffusion.posterior_mean_coef1[1:].double(), var * alpha_bar_prev.sqrt() / (1 - alpha_bar_prev),
                          rtol=1e-5, atol=1e-7)
    assert torch.allclose(diffusion.posterior_mean_coef2[1:].double(), var * alphas.sqrt() / betas, rtol=1e-5, atol=1e-7)
    # t = 0: ᾱ_{−1} = 1, the posterior is the point mass at x_0
    assert diffusion.posterior_mean_coef1[0] == pytest.approx(1.0, abs=1e-6)
    assert diffusion.posterior_mean_coef2[0] == 0


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_x0_eps_v_conversions_round_trip(schedule):
    torch.manual_seed(3)
    diffusion = make_diffusion(schedule=schedule)
    t = torch.arange(0, 999)                     # the clipped last cosine step has √ᾱ ≈ 0: x̂_0 ill-posed
    x0, eps = torch.rand(999, 1, 2, 2) * 2 - 1, torch.randn(999, 1, 2, 2)
    xt = diffusion.q_sample(x0, t, eps)
    assert torch.allclose(diffusion.predict_x0_from_eps(xt, t, eps), x0, atol=1e-3)
    assert torch.allclose(diffusion.predict_eps_from_x0(xt, t, x0), eps, atol=1e-3)
    # v = √ᾱ_t·ε − √(1−ᾱ_t)·x_0 (Salimans & Ho), computed here in float64
    _, _, alpha_bar, _ = reference(schedule, 1000)
    ab = per_sample(alpha_bar, t)
    v = diffusion.v_target(x0, t, eps)
    assert torch.allclose(v.double(), ab.sqrt() * eps.double() - (1 - ab).sqrt() * x0.double(), atol=1e-5)
    x0_from_v = diffusion.predict_x0_from_v(xt, t, v)
    assert torch.allclose(x0_from_v, x0, atol=1e-4)
    assert torch.allclose(diffusion.predict_eps_from_x0(xt, t, x0_from_v), eps, atol=1e-2)
    # and the conversions are not the identity
    assert not torch.allclose(diffusion.predict_x0_from_eps(xt, t, eps + 0.1), x0, atol=1e-3)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_an_error_in_eps_reaches_x0_times_sqrt_one_minus_over_alpha_bar_and_in_v_at_most_once(schedule):
    """Why class-conditional ε-models drew grey blobs (docs/mnist.md, "Class-conditional MNIST"): an error
    δ in ε̂ moves x̂_0 by −δ·√(1−ᾱ_t)/√ᾱ_t, which grows without bound at high noise (over 100× at
    the last step of either schedule), while an error δ in v̂ moves it by −δ·√(1−ᾱ_t), at most δ."""
    diffusion = make_diffusion(schedule=schedule)
    _, _, alpha_bar, _ = reference(schedule, 1000)
    t = torch.tensor([10, 500, 900, 998])
    ab = per_sample(alpha_bar, t).float()
    xt, delta = torch.randn(4, 1, 2, 2), 0.01
    zero = torch.zeros_like(xt)
    eps_shift = diffusion.predict_x0_from_eps(xt, t, zero + delta) - diffusion.predict_x0_from_eps(xt, t, zero)
    v_shift = diffusion.predict_x0_from_v(xt, t, zero + delta) - diffusion.predict_x0_from_v(xt, t, zero)
    assert torch.allclose(eps_shift, -delta * ((1 - ab) / ab).sqrt(), rtol=1e-3, atol=1e-6)
    assert torch.allclose(v_shift, -delta * (1 - ab).sqrt(), rtol=1e-3, atol=1e-6)
    assert v_shift.abs().max() <= delta and eps_shift[3].abs().min() > 100 * delta


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_posterior_log_variance_clipped_at_first_step_as_ddpm_code(variance):
    # β̃_0 = 0, so log σ² at t = 0 is log β̃_1 (DDPM's posterior_log_variance_clipped / "fixedlarge").
    diffusion = make_diffusion(variance=variance)
    betas, _, alpha_bar, alpha_bar_prev = reference("linear", 1000)
    beta_tilde = (1 - alpha_bar_prev) / (1 - alpha_bar) * betas
    sigma2 = beta_tilde if variance == "beta_tilde" else betas
    expected = torch.log(torch.cat([beta_tilde[1:2], sigma2[1:]]))
    assert torch.isfinite(diffusion.posterior_log_variance).all()
    assert torch.allclose(diffusion.posterior_log_variance.double(), expected, rtol=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------- DDIM

def test_ddim_eta_1_step_has_ddpm_posterior_mean_and_variance():
    # Song et al. eq. 16: with η = 1 between consecutive steps, σ² = β̃_t and the update is
    # q(x_{t−1} | x_t, x̂_0). Driving one step with noise z = 0 gives the mean, z = 1 gives mean + σ.
    torch.manual_seed(4)
    _, _, alpha_bar, _ = reference("linear", 1000)
    x0 = torch.rand(1, 1, 2, 2) * 1.8 - 0.9
    diffusion = make_diffusion(ConsistentEps(x0, alpha_bar))
    for step in list(range(1, 1000, 37)) + [1, 999]:
        t = torch.full((1,), step, dtype=torch.long)
        xt = diffusion.q_sample(x0, t, torch.randn_like(x0))

        def one_step(z):
            updates = diffusion._ddim_steps(xt, [step, step - 1], 1.0, None, 0.0, True, lambda: z)
            return next(updates)[1]

        mean = one_step(torch.zeros_like(x0))
        sigma = one_step(torch.ones_like(x0)) - mean
        posterior_mean, posterior_var = diffusion.q_posterior(x0, xt, t)
        assert torch.allclose(mean, posterior_mean, rtol=1e-4, atol=1e-4), step
        assert torch.allclose(sigma ** 2, posterior_var.expand_as(sigma), rtol=1e-3, atol=1e-9), step


def test_ddim_eta_1_first_sample_step_matches_posterior_empirically():
    # The same identity through the public sampler: N copies of one x_T, one step, moments of x_{T−2}.
    torch.manual_seed(5)
    n, T = 20_000, 10
    _, _, alpha_bar, _ = reference("linear", T)
    x0 = torch.tensor([[-0.8, -0.2], [0.3, 0.9]]).reshape(1, 1, 2, 2)
    diffusion = make_diffusion(ConsistentEps(x0, alpha_bar), timesteps=T)
    x_T = torch.randn(1, 1, 2, 2).expand(n, 1, 2, 2)
    for sampler, eta in [("ddim", 1.0), ("ddpm", 0.0)]:          # "ddpm" with steps < T is DDIM with η = 1
        steps = T if sampler == "ddim" else T // 2
        generator = torch.Generator().manual_seed(6)
        t_now, x, _ = next(diffusion.sample_iter(n, sampler=sampler, steps=steps, eta=eta, x_T=x_T, generator=generator,
                                                 progress=False))
        assert t_now == T - 1
        t_next = T - 2 if sampler == "ddim" else 7                     # ddim_timesteps(10, 5) = 9, 7, 4, 2, 0
        ab, ab_next = alpha_bar[T - 1], alpha_bar[t_next]
        mean = (ab_next.sqrt() * (1 - ab / ab_next) / (1 - ab) * x0.double()
                + (ab / ab_next).sqrt() * (1 - ab_next) / (1 - ab) * x_T[:1].double())
        var = (1 - ab_next) / (1 - ab) * (1 - ab / ab_next)
        std_err = (var / n).sqrt().item()
        assert torch.allclose(x.double().mean(0), mean[0], rtol=0, atol=5 * std_err), sampler
        assert torch.allclose(x.double().var(0), var.expand(1, 2, 2), rtol=0.05, atol=0), sampler


def test_ddim_eta_0_is_deterministic_given_x_T():
    diffusion = make_diffusion(WavyEps(), timesteps=50)
    x_T = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0))

    def run(eta, seed):
        return diffusion.sample(4, sampler="ddim", steps=10, eta=eta, x_T=x_T, generator=torch.Generator().manual_seed(seed),
                                progress=False)

    assert torch.equal(run(0.0, 1), run(0.0, 2))
    assert not torch.allclose(run(1.0, 1), run(1.0, 2))              # the generator does matter when η > 0


# ----------------------------------------------------------------------------- the reverse loop

def test_ddpm_last_step_adds_no_noise():
    # Algorithm 2: x_0 = μ_θ(x_1, 1) exactly, while every earlier step adds σ_t·z.
    diffusion = make_diffusion(WavyEps(), timesteps=20)
    x_T = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    finals = []
    for seed in [1, 2]:
        states = [(None, x_T)] + [(t, x) for t, x, _ in diffusion.sample_iter(
            4, sampler="ddpm", x_T=x_T, generator=torch.Generator().manual_seed(seed), progress=False)]
        for (_, x_prev), (t_now, x) in zip(states[:-1], states[1:]):
            t = torch.full((4,), t_now, dtype=torch.long)
            eps, _ = diffusion.model_predictions(x_prev, t)
            mean = diffusion.p_mean(x_prev, t, eps)                                 # eq. 11
            if t_now == 0:
                assert torch.equal(x, mean)
            else:
                assert not torch.allclose(x, mean, rtol=0, atol=1e-6), t_now
        finals.append(states[-1][1])
    assert not torch.allclose(finals[0], finals[1])                 # the two runs did draw different noise


class LeakyDenoiser(nn.Module):
    """An x_0-predicting model for data that are −1 everywhere (MNIST's background) that denoises only
    partly: x̂_0 = −1 + λ·(x_t + √ᾱ_t). Its error λ·√(1−ᾱ_t)·ε has mean 0 on q(x_t | x_0 = −1)."""
    num_classes = None

    def __init__(self, lam=0.3):
        super().__init__()
        self.lam, self.alpha_bar = lam, None

    def forward(self, xt, t, labels=None):
        return -1 + self.lam * (xt + self.alpha_bar[t].sqrt().view(-1, 1, 1, 1))


def test_clipping_x0_lifts_data_on_the_range_edge_and_the_unclipped_chain_keeps_their_mean():
    # Without the clamp every step is linear in x_t and x̂_0 is unbiased, so E[x_{t−1}] = √ᾱ_{t−1}·(−1) at
    # every step and the chain ends at mean −1. The clamp cuts only the errors below −1, so each step's
    # x̂_0 is too high, and the chain carries the bias on: the samples end above −1, and greyer once
    # clamped for display.
    model = LeakyDenoiser()
    diffusion = make_diffusion(model, timesteps=100, schedule="cosine", image_size=16, objective="x0")
    model.alpha_bar = diffusion.alphas_cumprod
    assert diffusion.clip_denoised and diffusion.clips() and not diffusion.clips(False)
    finals = {}
    for clip in (True, False):
        *_, (_, x, _) = diffusion.sample_iter(256, sampler="ddpm", clip_denoised=clip, progress=False,
                                              generator=torch.Generator().manual_seed(1))
        finals[clip] = x
    se = {clip: x.std().item() / math.sqrt(x.numel()) for clip, x in finals.items()}
    assert abs(finals[False].mean().item() + 1) < 4 * se[False]
    assert finals[True].mean().item() + 1 > 50 * se[True]
    assert finals[True].clamp(-1, 1).mean() > finals[False].clamp(-1, 1).mean() + 20 * se[True]
    # The model's own default: clip_denoised=False in the constructor is what sample_iter uses unasked.
    unclipped = make_diffusion(model, timesteps=100, schedule="cosine", image_size=16, objective="x0",
                               clip_denoised=False)
    *_, (_, x, _) = unclipped.sample_iter(256, sampler="ddpm", progress=False,
                                          generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, finals[False])


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_ddpm_step_noise_has_variance_sigma_squared(variance):
    # x_{t−1} − μ_θ(x_t, t) = σ_t·z with σ_t² = β̃_t or β_t, on N copies of one x_t.
    n, T = 20_000, 10
    diffusion = make_diffusion(WavyEps(), timesteps=T, variance=variance)
    betas, _, alpha_bar, alpha_bar_prev = reference("linear", T)
    sigma2 = ((1 - alpha_bar_prev) / (1 - alpha_bar) * betas if variance == "beta_tilde" else betas)[T - 1]
    x_T = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0)).expand(n, 1, 2, 2)
    _, x, _ = next(diffusion.sample_iter(n, sampler="ddpm", x_T=x_T, generator=torch.Generator().manual_seed(7),
                                         progress=False))
    t = torch.full((n,), T - 1, dtype=torch.long)
    noise = x - diffusion.p_mean(x_T, t, diffusion.model_predictions(x_T, t)[0])
    assert noise.mean().abs() < 5 * math.sqrt(sigma2 / (4 * n))
    assert noise.var().item() == pytest.approx(sigma2.item(), rel=0.03)


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_respaced_ddpm_step_noise_has_the_respaced_chains_variance(variance):
    # Ancestral DDPM on 5 of T = 10 steps (Nichol & Dhariwal §4): the first step goes from t = 9 to
    # t' = 7 (evenly spaced, T−1 … 0) with the respaced β' = 1 − ᾱ_t/ᾱ_t', so σ² = β̃' = (1 − ᾱ_t')/(1 − ᾱ_t)·β'
    # or β' itself with variance "beta" (it was β̃' for both: the choice was ignored below T steps).
    n, T = 20_000, 10
    diffusion = make_diffusion(WavyEps(), timesteps=T, variance=variance)
    ts = diffusion.sampling_timesteps("ddpm", 5)
    _, _, alpha_bar, _ = reference("linear", T)
    t_now, t_next = ts[0], ts[1]
    beta_r = 1 - alpha_bar[t_now] / alpha_bar[t_next]
    sigma2 = (1 - alpha_bar[t_next]) / (1 - alpha_bar[t_now]) * beta_r if variance == "beta_tilde" else beta_r
    x_T = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0)).expand(n, 1, 2, 2)
    _, x, _ = next(diffusion.sample_iter(n, sampler="ddpm", steps=5, x_T=x_T,
                                         generator=torch.Generator().manual_seed(7), progress=False))
    t = torch.full((n,), t_now, dtype=torch.long)
    _, x0 = diffusion.model_predictions(x_T, t)
    mean = (alpha_bar[t_next].sqrt() * beta_r / (1 - alpha_bar[t_now]) * x0
            + (alpha_bar[t_now] / alpha_bar[t_next]).sqrt() * (1 - alpha_bar[t_next]) / (1 - alpha_bar[t_now]) * x_T)
    noise = x - mean.float()                                    # the respaced posterior mean (DDPM eq. 7)
    assert noise.mean().abs() < 5 * math.sqrt(sigma2 / (4 * n))
    assert noise.var().item() == pytest.approx(sigma2.item(), rel=0.03)


def test_classifier_free_guidance_doubles_batch_and_mixes_1_plus_w_cond_minus_w_uncond():
    model = LabelledEps(num_classes=3)
    diffusion = make_diffusion(model, timesteps=10)
    xt, t, labels, w = torch.randn(4, 1, 2, 2), torch.full((4,), 5), torch.tensor([0, 1, 2, 1]), 2.5
    eps, _ = diffusion.model_predictions(xt, t, labels, guidance=w, clip_denoised=False)
    batch, t_seen, labels_seen = model.calls[-1]
    assert batch == 8 and torch.equal(t_seen, torch.cat([t, t]))
    assert torch.equal(labels_seen, torch.tensor([0, 1, 2, 1, 3, 3, 3, 3]))        # then the null label
    cond, uncond = 0.1 * xt + labels.float().reshape(-1, 1, 1, 1), 0.1 * xt + 3.0
    assert torch.allclose(eps, (1 + w) * cond - w * uncond, atol=1e-6)
    # in sampling, every call is doubled with guidance: test_samplers.py, for every sampler


# ----------------------------------------------------------------------------- objectives

class Oracle(nn.Module):
    """Knows the clean batch x0, so it recovers ε from x_t (eq. 4) and can return any target exactly."""
    num_classes = None

    def __init__(self, x0, alpha_bar, returns):
        super().__init__()
        self.x0, self.alpha_bar, self.returns = x0.double(), alpha_bar, returns

    def forward(self, xt, t, labels=None):
        ab = per_sample(self.alpha_bar, t)
        eps = (xt.double() - ab.sqrt() * self.x0) / (1 - ab).sqrt()
        target = {"eps": eps, "x0": self.x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * self.x0}[self.returns]
        return target.float()


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_loss_is_zero_when_model_returns_the_objectives_target(objective):
    torch.manual_seed(8)
    x0 = torch.rand(64, 1, 4, 4) * 2 - 1
    _, _, alpha_bar, _ = reference("linear", 1000)
    for returns in ["eps", "x0", "v"]:
        diffusion = make_diffusion(Oracle(x0, alpha_bar, returns), image_size=4, objective=objective)
        loss = diffusion.loss(x0)
        assert loss.shape == () and torch.isfinite(loss)
        if returns == objective:
            assert loss < 1e-6, (objective, returns, loss)
        else:
            assert loss > 0.05, (objective, returns, loss)


def test_label_dropout_replaces_that_share_with_the_null_label():
    n, num_classes, p = 20_000, 10, 0.25
    model = LabelledEps(num_classes)
    labels = torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(9)
    make_diffusion(model, cond_drop_prob=p).loss(torch.zeros(n, 1, 2, 2), labels)
    seen = model.calls[-1][2]
    dropped = seen == num_classes
    assert abs(dropped.float().mean().item() - p) < 0.015               # 5 standard errors at n = 20,000
    assert torch.equal(seen[~dropped], labels[~dropped])                   # the rest are untouched

    make_diffusion(model, cond_drop_prob=0.0).loss(torch.zeros(n, 1, 2, 2), labels)
    assert torch.equal(model.calls[-1][2], labels)


@pytest.mark.parametrize("mean", [-1.2, -0.5])
def test_lognormal_t_sampling_draws_steps_whose_sigma_is_lognormal_around_the_mean(mean):
    """ln σ ~ N(mean, 1.2²), mapped to the first step with σ_t ≥ σ: the drawn steps' ln σ_t has that
    median and spread (σ_t lies just above σ: the cosine grid is fine there), and no step falls outside [0, T)."""
    n = 20_000
    process = make_diffusion(schedule="cosine", t_sampling="lognormal", lognormal_mean=mean)
    torch.manual_seed(0)
    t = process.sample_t(n, "cpu")
    assert t.dtype == torch.long and t.min() >= 0 and t.max() < 1000
    ab = reference("cosine", 1000)[2]
    log_sigma = (0.5 * ((1 - ab) / ab).log())[t]                         # ln σ_t = ½ ln((1−ᾱ_t)/ᾱ_t)
    assert abs(log_sigma.median().item() - mean) < 0.05                # ± 2.5 standard errors of a median
    q16, q84 = log_sigma.quantile(torch.tensor([0.1587, 0.8413], dtype=log_sigma.dtype)).tolist()
    assert abs((q84 - q16) / 2 - 1.2) < 0.05                            # P_std = 1.2
    uniform = make_diffusion(schedule="cosine").sample_t(n, "cpu")
    assert abs(uniform.float().mean().item() - 499.5) < 10              # DDPM Alg. 1: t ~ U{0, …, T−1}


# ----------------------------------------------------------------------------- which steps a sampler visits

def test_sampling_timesteps_is_all_T_steps_for_ddpm_and_evenly_respaced_otherwise():
    diffusion = make_diffusion(WavyEps(), timesteps=10)
    assert diffusion.sampling_timesteps("ddpm") == list(range(9, -1, -1))          # Algorithm 2: t = T … 1
    assert diffusion.sampling_timesteps("ddpm", 10) == list(range(9, -1, -1))
    assert diffusion.sampling_timesteps("ddpm", 5) == [9, 7, 4, 2, 0]               # respaced chain
    assert diffusion.sampling_timesteps("ddim") == list(range(9, -1, -1))          # default min(50, T)
    assert diffusion.sampling_timesteps("ddim", 1) == [9]
    for steps in range(1, 11):
        ts = diffusion.sampling_timesteps("ddim", steps)
        assert len(ts) == steps and ts[0] == 9 and (steps == 1 or ts[-1] == 0)
        assert all(a > b for a, b in zip(ts, ts[1:]))


def test_sample_settings_are_keyword_only():
    diffusion = make_diffusion(WavyEps(), timesteps=10)
    with pytest.raises(TypeError):
        diffusion.sample(1, "ddim", 5)
    with pytest.raises(TypeError):
        next(diffusion.sample_iter(1, "ddim", 5))


def test_eq12_weight_is_beta_squared_over_two_sigma_squared_alpha_one_minus_alpha_bar():
    # DDPM eq. 12 with σ_t² = β_t (variance "beta"): λ_t = β_t / (2·α_t·(1 − ᾱ_t)), for t ≥ 1 (0-based).
    betas = linear_beta_schedule(1000)
    alpha_bar = torch.cumprod(1 - betas, 0)
    diffusion = make_diffusion(WavyEps(), timesteps=1000, variance="beta")
    t = torch.arange(1, 1000)
    expected = betas[t] / (2 * (1 - betas[t]) * (1 - alpha_bar[t]))
    assert torch.allclose(diffusion.eq12_weight(t).double(), expected, rtol=2e-3, atol=0)   # float32 buffers: 1 − ᾱ_t near t = 1
    # L_simple drops a weight that is largest at small t: eq. 12 weights t = 1 more than t = T.
    w = diffusion.eq12_weight(torch.tensor([1, 999]))
    assert w[0] > 10 * w[1]


@pytest.mark.parametrize("eta", [1.5, -0.1])
def test_the_library_refuses_eta_outside_0_to_1(eta):
    # generate.py refuses it before loading a model; a caller of sample() gets the same rule
    diffusion = make_diffusion(WavyEps(), timesteps=10)
    with pytest.raises(ValueError, match=r"eta is DDIM's η in \[0, 1\]"):
        diffusion.sample(2, sampler="ddim", steps=3, eta=eta, progress=False)
