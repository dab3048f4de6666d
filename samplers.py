"""The two fast samplers beside DDPM's and DDIM's: EDM's stochastic Heun on noise levels σ (Karras
et al. 2022, Alg. 2) and DPM-Solver++(2M) (Lu et al. 2022); and the guidance rules (Guidance).
Each step function is a generator of (t, x_t, x̂_0), one per network call, that
GaussianDiffusion.reverse_steps runs by name; x_t is always
in DDPM's scaling √ᾱ·x_0 + √(1−ᾱ)·ε.

EDM's view of the discrete model: σ_t = √((1−ᾱ_t)/ᾱ_t) (diffusion.sigma_table), x_σ = x_t/√ᾱ_t =
x_0 + σ·ε, and the denoiser D(x_σ; σ) = x̂_0 at the (fractional) step whose σ_t is σ.
"""

import math
from dataclasses import dataclass

import torch

from unet import null_labels

# EDM Alg. 2's churn. EDM's own defaults are churn 0 (deterministic Heun, Alg. 1), S_tmin = 0,
# S_tmax = ∞, S_noise = 1; its ImageNet-64 settings are S_churn 40–80, S_tmin = 0.05, S_tmax = 50,
# S_noise = 1.003 (EDM Table 5). A young ε-model gains from stochasticity (it corrects the model's
# errors instead of following them), so "edm" defaults to those ImageNet settings with churn 40:
# γ_i = min(churn/N, √2 − 1) is then √2 − 1 (the most EDM allows: each step doubles the noise
# variance before denoising) for any N ≤ 96 steps (≤ 191 network calls).
CHURN, S_TMIN, S_TMAX, S_NOISE = 40.0, 0.05, 50.0, 1.003
RHO = 7.0                                # EDM eq. 5: ρ = 7 spaces the noise levels more finely near σ_min
# EDM's σ_max (Table 1). At σ = 80 the signal is 1/√(1 + 80²) ≈ 1.2% of x_t, and x_T ~ N(0, I) stands in
# for it as EDM's σ_max·n does. A cosine table runs on to σ_{T−1} ≈ 2·10⁴, where eq. 5's ρ = 7 would put
# 8 of 13 steps above 80, steps that change nothing: a 25-call Heun sampler then scored FID-300 116 on the
# faces model instead of 69 (docs/samplers.md, "A bug the faces table found").
SIGMA_MAX = 80.0
# The fewest network calls from which EDM's sampler uses Heun's correction and gives images. With 3 to
# 5 calls the plan holds a Heun step from σ̂ ≈ 3.5–4.9 (σ_i ≈ 3.5, raised by the churn; or 80) straight
# down to σ_min ≈ 0.01: its slope d′ = (x − D(x; σ_min))/σ_min is taken at the Euler guess, a blurred
# mean image, so the model's error at σ_min is divided by σ_min and multiplied by the jump's
# half-length (×100…×4000): salt-and-pepper noise on all three shipped models (tests/test_samplers.py).
# From 6 calls the last Heun step starts at σ ≈ 0.8 and the images are there; EDM's own schedules take
# ≥ 18 steps. 1 or 2 calls are Euler steps only, DDIM-like blurred means: those stand, and 3 to 5 are
# refused.
EDM_MIN_CALLS = 6


def sigma_to_t(sigma_table, sigma):
    """The fractional step t at noise level σ: log σ interpolated linearly between the two table entries
    σ_t ≤ σ ≤ σ_{t+1} (as k-diffusion's DiscreteSchedule does), clamped to [0, T−1]. Exact on the
    table, increasing between. sigma: float or tensor -> float64 tensor of the same shape."""
    log_sigmas = sigma_table.log()                                              # (T,) increasing
    log_sigma = torch.as_tensor(sigma, dtype=torch.float64)
    shape, log_sigma = log_sigma.shape, log_sigma.reshape(-1).log().clamp(log_sigmas[0], log_sigmas[-1])
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    w = (log_sigma - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])      # in [0, 1]
    return (low + w).reshape(shape)


def t_to_sigma(sigma_table, t):
    """σ at a fractional step t ∈ [0, T−1], the inverse of sigma_to_t. -> float64 tensor of t's shape."""
    log_sigmas = sigma_table.log()
    t = torch.as_tensor(t, dtype=torch.float64)
    low = t.floor().long().clamp(0, len(log_sigmas) - 2)
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()


@dataclass(frozen=True)
class Guidance:
    """How a sampling call is guided; GaussianDiffusion.network applies it at every call:
        out = (1 + w)·out(x_t, t, y) − w·out_guide(x_t, t)
    Classifier-free guidance (Ho & Salimans 2022, eq. 6), guide = None: out_guide is the same
        network given the null label ∅ (conditional models only).
    Autoguidance (Karras et al. 2024, eq. 1 with their w = 1 + ours), guide = a GaussianDiffusion:
        out_guide is that weaker model of the same recipe (trained shorter, or smaller), given the
        same labels; it needs no labels, so it guides an unconditional model too.
    Guidance interval (Kynkäänniemi et al. 2024): w where σ_lo < σ_t ≤ σ_hi, 0 elsewhere, and there
        the guide is not run. σ_t = √((1−ᾱ_t)/ᾱ_t), EDM's noise level of step t.
    A plain float w given as `guidance` anywhere means Guidance(w): CFG at every step."""
    w: float = 0.0
    sigma_lo: float = 0.0
    sigma_hi: float = math.inf
    guide: object = None

    def weight(self, sigma):
        """w at the noise level σ (a float): w where σ_lo < σ ≤ σ_hi, 0 elsewhere."""
        return self.w if self.sigma_lo < sigma <= self.sigma_hi else 0.0

    def at(self, sigma):
        """This guidance at one noise level σ (a host float), the interval resolved to its w there.
        The samplers hand it to network, so no step has to be read back from the device."""
        return Guidance(self.weight(sigma), guide=self.guide)

    def weight_at(self, sigma_table, t):
        """w at step t ((B,) tensor of one step, integer or fractional), 0 outside the interval."""
        if self.w == 0.0 or (self.sigma_lo <= 0.0 and self.sigma_hi == math.inf):
            return self.w                                      # no interval (or resolved by at): no lookup
        return self.weight(t_to_sigma(sigma_table, t[0].item()).item())   # σ_t; a host sync if t is on a GPU

    def calls(self, sigma_table, ts, labels=True):
        """Network calls per image over the sampler's steps ts (sampling_timesteps): one per step,
        two where w ≠ 0 (CFG on an unconditional model, labels False, is never applied)."""
        if self.guide is None and not labels:
            return len(ts)
        return sum(1 + (self.weight(t_to_sigma(sigma_table, t).item()) != 0.0) for t in ts)


def as_guidance(guidance):
    """A float w or a Guidance -> Guidance, checked: w a finite number ≥ 0, 0 ≤ σ_lo < σ_hi."""
    g = guidance if isinstance(guidance, Guidance) else Guidance(guidance)
    if isinstance(g.w, bool) or not isinstance(g.w, (int, float)) or not math.isfinite(g.w) or g.w < 0:
        raise ValueError(f"the guidance weight w must be a number ≥ 0 (0 = none), got {g.w!r}")
    if not 0 <= g.sigma_lo < g.sigma_hi:
        raise ValueError(f"the guidance interval needs 0 ≤ σ_lo < σ_hi, got ({g.sigma_lo}, {g.sigma_hi}]")
    return g


def check_guide(diffusion, guide):
    """Autoguidance mixes two networks' raw outputs at the same (x_t, t): that needs the same T,
    schedule, objective, image size and channels. -> None, or ValueError naming the difference."""
    for name in ("num_timesteps", "schedule", "objective", "image_size", "channels"):
        ours, theirs = getattr(diffusion, name), getattr(guide, name)
        if ours != theirs:
            raise ValueError(f"the guide model has {name} = {theirs!r} but the model has {ours!r}; "
                             "autoguidance needs a guide of the same recipe (a shorter run or a smaller network)")


def denoise(diffusion, x, sigma, labels=None, guidance=0.0, clip_denoised=None):
    """EDM's denoiser D(x; σ) = x̂_0 for this discrete model. x: (B, C, H, W) in EDM's scaling
    x = x_0 + σ·ε (DDPM eq. 4 divided by √ᾱ), sigma: a float in [σ_0, σ_{T−1}].

    The network saw x_t = √ᾱ·x at the step whose σ_t is σ: it gets x/√(1 + σ²) (ᾱ = 1/(1 + σ²))
    and the fractional t = sigma_to_t(σ), which its sinusoidal embedding takes as it is. With
    clip_denoised, x̂_0 is clamped to [−1, 1] as in model_predictions.
    """
    t = torch.full((x.shape[0],), sigma_to_t(diffusion.sigma_table, sigma).item(), device=x.device)    # (B,) float
    alpha_bar = 1 / (1 + sigma ** 2)                                                    # ᾱ = 1/(1 + σ²)
    guidance = as_guidance(guidance).at(sigma)                                          # w at this σ
    if labels is None and diffusion.num_classes is not None:      # the null label as an integer (t is a float)
        labels = null_labels(diffusion.num_classes, x.shape[0], x.device)
        if guidance.guide is None:
            guidance = 0.0                 # classifier-free guidance of ∅ against ∅ is ∅: one call, not two
    out = diffusion.network(math.sqrt(alpha_bar) * x, t, labels, guidance)                  # at x_t = √ᾱ·x_σ
    if diffusion.objective == "eps":
        x0 = x - sigma * out                                                  # x̂_0 = x_σ − σ·ε_θ
    elif diffusion.objective == "x0":
        x0 = out
    else:
        x0 = alpha_bar * x - sigma * math.sqrt(alpha_bar) * out               # √ᾱ·x_t − √(1−ᾱ)·v
    return x0.clamp(-1, 1) if diffusion.clips(clip_denoised) else x0


def edm_sigmas(sigma_table, calls, churn=CHURN, s_tmin=S_TMIN, s_tmax=S_TMAX):
    """EDM Alg. 2's noise levels for `calls` network calls: [(σ_i, σ̂_i, σ_{i+1}, heun)] for i = 0 … N−1.

    σ_i runs on EDM eq. 5's schedule from σ_max = min(σ_{T−1}, SIGMA_MAX) to σ_min = σ_0 of the table,
    then σ_N = 0.
    A Heun step calls the network twice, but the last one (to σ_N = 0, where D is not defined) is
    Euler, so N steps make 2N − 1 calls. An even number of calls takes N = calls/2 + 1 steps and
    makes the first one (from σ_max, where D barely changes and the path is nearly straight) Euler
    too: one first-order step keeps the global second order.
    """
    N = calls // 2 + 1                                            # 2N − 1 = calls, or 2N − 2 = calls if even
    sigma_min, sigma_top = sigma_table[0].item(), sigma_table[-1].item()
    sigma_max = min(sigma_top, SIGMA_MAX)
    ramp = torch.linspace(0, 1, N, dtype=torch.float64)                                       # i/(N−1)
    sigmas = (sigma_max ** (1 / RHO) + ramp * (sigma_min ** (1 / RHO) - sigma_max ** (1 / RHO))) ** RHO  # EDM eq. 5
    sigmas[-1], sigmas[0] = sigma_min, sigma_max                             # the ends exactly, not rounded
    sigmas = sigmas.tolist() + [0.0]                                                          # σ_N = 0
    plan = []
    for i in range(N):
        gamma = min(churn / N, math.sqrt(2) - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0   # churn γ_i
        # σ̂_i = σ_i·(1 + γ_i), but no higher than σ_{T−1}: the network never saw more noise than at T.
        sigma_hat = min(sigmas[i] * (1 + gamma), sigma_top)
        heun = sigmas[i + 1] > 0 and not (calls % 2 == 0 and i == 0)
        plan.append((sigmas[i], sigma_hat, sigmas[i + 1], heun))
    return plan


def edm_steps(diffusion, x, plan, s_noise, labels, guidance, clip_denoised, randn):
    """EDM Algorithm 2 (Karras et al. 2022), stochastic Heun, on x_σ = x_0 + σ·ε = x_t/√ᾱ_t, step i:
    γ_i = min(S_churn/N, √2 − 1) where S_tmin ≤ σ_i ≤ S_tmax, else 0          (in edm_sigmas)
    σ̂_i = σ_i·(1 + γ_i),  x̂_i = x_i + √(σ̂_i² − σ_i²)·S_noise·z               (churn: noise up to σ̂_i)
    d_i = (x̂_i − D(x̂_i; σ̂_i))/σ̂_i,  x_{i+1} = x̂_i + (σ_{i+1} − σ̂_i)·d_i     (Euler step)
    d′_i = (x_{i+1} − D(x_{i+1}; σ_{i+1}))/σ_{i+1}
    x_{i+1} = x̂_i + (σ_{i+1} − σ̂_i)·(d_i + d′_i)/2   unless σ_{i+1} = 0     (Heun's correction)
    Each call yields x_{i+1} in DDPM's scaling x_{i+1}/√(1 + σ_{i+1}²): the Euler guess, then Heun's."""
    sigma_max = plan[0][0]
    x = x * math.sqrt(1 + sigma_max ** 2)                                     # x_σ = x_T/√ᾱ at σ_max
    for sigma, sigma_hat, sigma_next, heun in plan:
        x_hat = x
        if sigma_hat > sigma:
            x_hat = x + math.sqrt(sigma_hat ** 2 - sigma ** 2) * s_noise * randn()    # √(σ̂² − σ²)·S_noise·z
        denoised = denoise(diffusion, x_hat, sigma_hat, labels, guidance, clip_denoised)  # D(x̂_i; σ̂_i)
        d = (x_hat - denoised) / sigma_hat                                            # d_i = (x̂_i − D)/σ̂_i
        x = x_hat + (sigma_next - sigma_hat) * d                                      # Euler step
        yield sigma_to_t(diffusion.sigma_table, sigma_hat).item(), x / math.sqrt(1 + sigma_next ** 2), denoised
        if heun:
            denoised_next = denoise(diffusion, x, sigma_next, labels, guidance, clip_denoised)    # D(x_{i+1}; σ_{i+1})
            d_next = (x - denoised_next) / sigma_next                                        # d′_i
            x = x_hat + (sigma_next - sigma_hat) * (0.5 * d + 0.5 * d_next)                  # Heun: mean slope
            yield sigma_to_t(diffusion.sigma_table, sigma_next).item(), x / math.sqrt(1 + sigma_next ** 2), denoised_next


def dpmpp2m_steps(diffusion, x, ts, labels, guidance, clip_denoised):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): the probability-flow ODE solved in the data
    prediction x̂_0, second-order multistep, in λ_t = log(α_t/σ_t) with α_t = √ᾱ_t and σ_t = √(1−ᾱ_t)
    (DPM-Solver's σ_t, not EDM's). From step t = ts[i−1] to t′ = ts[i]:
    h_i = λ_{t′} − λ_t,  r_i = h_{i−1}/h_i,  D_i = (1 + 1/(2r_i))·x̂_0(t) − 1/(2r_i)·x̂_0(previous t)
    x_{t′} = (σ_{t′}/σ_t)·x_t − α_{t′}·(e^{−h_i} − 1)·D_i
    The first step has no previous x̂_0 and takes D_1 = x̂_0 (first order, which is DDIM's η = 0 step);
    so does the last, to ᾱ = 1 (λ = ∞, h = ∞): x_0 = x̂_0, like DDIM's last step."""
    alpha_bar = diffusion.alphas_cumprod.cpu().double()                       # host float64 (MPS has none)
    x0_prev = h_prev = None
    for i, t_now in enumerate(ts):
        t = torch.full((x.shape[0],), t_now, device=x.device, dtype=torch.long)
        g = as_guidance(guidance).at(diffusion.sigma_table[t_now].item())                 # w at σ_t, on the host
        _, x0 = diffusion.model_predictions(x, t, labels, g, clip_denoised)               # x̂_0 = x_θ(x_t, t)
        if i + 1 == len(ts):
            x = x0                                                                  # λ = ∞: x_0 = x̂_0
        else:
            alpha_t, sigma_t = alpha_bar[t_now].sqrt().item(), (1 - alpha_bar[t_now]).sqrt().item()
            alpha_next, sigma_next = alpha_bar[ts[i + 1]].sqrt().item(), (1 - alpha_bar[ts[i + 1]]).sqrt().item()
            h = math.log(alpha_next / sigma_next) - math.log(alpha_t / sigma_t)        # h_i = λ_{t′} − λ_t
            if x0_prev is None:
                D = x0                                                              # first order: D_1 = x̂_0
            else:
                r = h_prev / h                                                      # r_i = h_{i−1}/h_i
                D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev                  # D_i
            x = sigma_next / sigma_t * x - alpha_next * math.expm1(-h) * D          # (σ_{t′}/σ_t)·x_t − α_{t′}(e^{−h}−1)·D_i
            x0_prev, h_prev = x0, h
        yield t_now, x, x0
