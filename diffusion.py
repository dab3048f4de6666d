"""Gaussian diffusion (Ho et al. 2020, "DDPM"), DDIM sampling (Song et al. 2021), classifier-free
guidance (Ho & Salimans 2022), Min-SNR-γ loss weighting (Hang et al. 2023) and EDM's training noise
levels (Karras et al. 2022), around any network net(x_t, t, labels) -> output. EDM's stochastic
sampler and DPM-Solver++(2M) (Lu et al. 2022) live in samplers.py; reverse_steps runs them by name.

Notation. T steps; the tensor index t ∈ {0, …, T−1} stands for the paper's step t + 1, so
t = 0 is the first noising step and t = T − 1 produces (almost) pure noise.

    β_t               betas                   α_t = 1 − β_t
    ᾱ_t = ∏_{s≤t} α_s alphas_cumprod           ᾱ_{t−1} = alphas_cumprod_prev (ᾱ_{−1} = 1)
    β̃_t              posterior_variance      = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t
    σ_t = √((1−ᾱ_t)/ᾱ_t)  sigma_table         EDM's noise level: x_t = √ᾱ_t·(x_0 + σ_t·ε), x_σ = x_t/√ᾱ_t

Schedules are computed in float64 and stored as float32 buffers; `extract` gathers one value
per batch element, shaped (B, 1, 1, 1) so that it broadcasts over images.

docs/whiteboard.md lists every equation with the line that computes it.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from samplers import (CHURN, EDM_MIN_CALLS, S_NOISE, S_TMAX, S_TMIN, as_guidance, dpmpp2m_steps, edm_sigmas,
                      edm_steps, sigma_to_t)
from unet import null_labels


# ----------------------------------------------------------------------------- schedules

def linear_beta_schedule(timesteps, beta_start=1e-4, beta_end=0.02):
    """DDPM §4: β rises linearly from 1e-4 to 0.02 over T = 1000 steps. (T,) float64."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_beta_schedule(timesteps, s=0.008, max_beta=0.999):
    """Nichol & Dhariwal 2021, eq. 17: ᾱ_t = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2).

    β_t = 1 − ᾱ_t/ᾱ_{t−1}, clipped at max_beta: without the clip the last β is 1 and the
    step t = T is singular (Nichol & Dhariwal §3.2). (T,) float64.
    """
    steps = torch.arange(timesteps + 1, dtype=torch.float64)                 # paper's t = 0 … T
    f = torch.cos((steps / timesteps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]                                                     # ᾱ_t = f(t)/f(0)
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]                               # β_t = 1 − ᾱ_t/ᾱ_{t−1}
    return betas.clamp(max=max_beta)


SCHEDULES = {"linear": linear_beta_schedule, "cosine": cosine_beta_schedule}
OBJECTIVES = ("eps", "x0", "v")
VARIANCES = ("beta_tilde", "beta")      # σ_t² = β̃_t ("fixedsmall") or β_t ("fixedlarge"), DDPM §3.2
SAMPLERS = ("ddpm", "ddim", "edm", "dpmpp2m")
# The fast default of every script (generate, fid, the demo, the trainer's grids): ancestral DDPM on
# a 50-step respacing (DDIM eq. 12 with η = 1); docs/samplers.md says why. steps=T is Algorithm 2.
DEFAULT_SAMPLER, DEFAULT_STEPS = "ddpm", 50
LOSS_WEIGHTINGS = ("simple", "min_snr")
T_SAMPLINGS = ("uniform", "lognormal")
# EDM §5 (Karras et al. 2022, Table 1): training noise levels ln σ ~ N(P_mean, P_std²), which puts
# the steps where the loss can still fall (σ ≈ 0.05 … 2 for data of std 0.5), not on the nearly
# clean or nearly pure-noise ends where it cannot.
P_MEAN, P_STD = -1.2, 1.2



def extract(buffer, t):
    """buffer: (T,), t: (B,) ints -> (B, 1, 1, 1)."""
    return buffer.gather(0, t).reshape(-1, 1, 1, 1)


def ddim_timesteps(timesteps, steps):
    """`steps` indices spread evenly over [0, T−1], descending; T−1 always, and 0 whenever steps ≥ 2."""
    return torch.linspace(timesteps - 1, 0, steps).round().long().unique_consecutive()


# ----------------------------------------------------------------------------- the process

class GaussianDiffusion(nn.Module):
    """Forward process, training loss and samplers around an ε-, x_0- or v-predicting network.

    model: net(x_t, t, labels) -> (B, C, H, W); if it has num_classes (not None), label
        num_classes is the null label used for classifier-free guidance.
    objective: what the network predicts: "eps" (DDPM), "x0", or "v" (Salimans & Ho 2022).
    variance: σ_t² of the reverse step: "beta_tilde" (β̃_t) or "beta" (β_t).
    cond_drop_prob: in training, the share of labels replaced by the null label (CFG).
    loss_weighting: "simple" (DDPM eq. 14, every t weighted alike) or "min_snr" (Hang et al. 2023:
        each t weighted by min(SNR_t, γ) relative to its objective, γ = min_snr_gamma).
    t_sampling: how training draws t: "uniform" (DDPM Alg. 1, t ~ U{0, …, T−1}) or "lognormal"
        (EDM's ln σ ~ N(P_mean, P_std²), mapped to the step whose σ_t is nearest above).
    lognormal_mean: P_mean of "lognormal" (EDM: −1.2, for 32 px and 64 px alike). Each doubling
        of the image side keeps more signal at the same σ (neighbouring pixels average the noise
        away), so resolution-shifted schedules (Hoogeboom et al. 2023; Esser et al. 2024) move it up.
    clip_denoised: the samplers' default for clamping each step's x̂_0 to [−1, 1] (DDPM's code,
        not its equations). The clamp cuts only the errors that point out of the range, so where
        the data sit on its edge (MNIST's black background) it pushes x̂_0 inwards, and the chain
        carries that bias into every later step. train_mnist.py turns it off.
    amp (attribute, default False): run the network under bf16 autocast while sampling; the
        sampler's arithmetic stays float32. load_for_sampling turns it on where bf16 is fast.
    """

    def __init__(self, model, image_size, channels, timesteps=1000, schedule="linear",
                 objective="eps", variance="beta_tilde", cond_drop_prob=0.1, loss_weighting="simple",
                 min_snr_gamma=5.0, clip_denoised=True, t_sampling="uniform", lognormal_mean=P_MEAN):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss_weighting {loss_weighting!r}; choose one of {LOSS_WEIGHTINGS}")
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"unknown t_sampling {t_sampling!r}; choose one of {T_SAMPLINGS}")
        if not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0 (Hang et al. use 5), got {min_snr_gamma!r}")
        self.model = model
        self.image_size = image_size
        self.channels = channels
        self.num_timesteps = timesteps
        self.schedule = schedule
        self.objective = objective
        self.variance = variance
        self.cond_drop_prob = cond_drop_prob
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = min_snr_gamma
        self.clip_denoised = bool(clip_denoised)
        self.t_sampling = t_sampling
        self.lognormal_mean = float(lognormal_mean)
        self.num_classes = getattr(model, "num_classes", None)
        self.amp = False

        betas = SCHEDULES[schedule](timesteps)                                       # float64 (T,)
        alphas = 1 - betas                                                           # α_t = 1 − β_t
        alphas_cumprod = torch.cumprod(alphas, dim=0)                                # ᾱ_t = ∏ α_s
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])  # ᾱ_{t−1}
        posterior_variance = (1 - alphas_cumprod_prev) / (1 - alphas_cumprod) * betas   # DDPM eq. 7: β̃_t
        # β̃_0 = 0, so log β̃ is clipped at the first step to log β̃_1, as the DDPM code does; with
        # σ² = β, the first step uses β̃_1 as well (DDPM's "fixedlarge"). Step 0 adds no noise anyway.
        log_var_small = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        log_var_large = torch.log(torch.cat([posterior_variance[1:2], betas[1:]]))

        def register(name, value):
            self.register_buffer(name, value.float(), persistent=False)

        register("betas", betas)
        register("alphas_cumprod", alphas_cumprod)
        register("alphas_cumprod_prev", alphas_cumprod_prev)
        register("sqrt_alphas_cumprod", alphas_cumprod.sqrt())                         # √ᾱ_t
        register("sqrt_one_minus_alphas_cumprod", (1 - alphas_cumprod).sqrt())         # √(1−ᾱ_t)
        register("sqrt_recip_alphas", alphas.rsqrt())                                 # 1/√α_t
        register("eps_coef", betas / (1 - alphas_cumprod).sqrt())                     # β_t/√(1−ᾱ_t)
        register("posterior_variance", posterior_variance)
        register("posterior_mean_coef1", alphas_cumprod_prev.sqrt() * betas / (1 - alphas_cumprod))
        register("posterior_mean_coef2", alphas.sqrt() * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod))
        register("posterior_log_variance", log_var_small if variance == "beta_tilde" else log_var_large)
        # EDM's noise levels σ_t = √((1−ᾱ_t)/ᾱ_t) of the float32 ᾱ_t the network was trained on, kept in
        # float64 on the CPU: the σ ↔ t lookups are scalar arithmetic on the host, once per network call.
        alpha_bar32 = self.alphas_cumprod.double()
        self.sigma_table = ((1 - alpha_bar32) / alpha_bar32).sqrt()                  # (T,) increasing in t
        # The same table cast to a float32 buffer that moves with the model: training's log-normal t draws
        # look it up on the device, with no host-to-device copy per step (MPS has no float64 at all).
        register("sigma_levels", self.sigma_table)

    # ------------------------------------------------------------------ forward process

    def q_sample(self, x0, t, noise=None):
        """DDPM eq. 4: x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, ε ~ N(0, I)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return extract(self.sqrt_alphas_cumprod, t) * x0 + extract(self.sqrt_one_minus_alphas_cumprod, t) * noise

    def q_posterior(self, x0, xt, t):
        """DDPM eqs. 6–7: q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t·I),
        μ̃_t = √ᾱ_{t−1}·β_t/(1−ᾱ_t)·x_0 + √α_t·(1−ᾱ_{t−1})/(1−ᾱ_t)·x_t. Returns (mean, variance)."""
        mean = extract(self.posterior_mean_coef1, t) * x0 + extract(self.posterior_mean_coef2, t) * xt
        return mean, extract(self.posterior_variance, t)

    # ------------------------------------------------------------------ x_0 ↔ ε ↔ v

    def predict_x0_from_eps(self, xt, t, eps):
        """DDPM eq. 4 solved for x_0: x̂_0 = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t."""
        return (xt - extract(self.sqrt_one_minus_alphas_cumprod, t) * eps) / extract(self.sqrt_alphas_cumprod, t)

    def predict_eps_from_x0(self, xt, t, x0):
        """DDPM eq. 4 solved for ε: ε = (x_t − √ᾱ_t·x_0) / √(1−ᾱ_t)."""
        return (xt - extract(self.sqrt_alphas_cumprod, t) * x0) / extract(self.sqrt_one_minus_alphas_cumprod, t)

    def v_target(self, x0, t, eps):
        """Salimans & Ho 2022: v = √ᾱ_t·ε − √(1−ᾱ_t)·x_0."""
        return extract(self.sqrt_alphas_cumprod, t) * eps - extract(self.sqrt_one_minus_alphas_cumprod, t) * x0

    def predict_x0_from_v(self, xt, t, v):
        """x̂_0 = √ᾱ_t·x_t − √(1−ᾱ_t)·v."""
        return extract(self.sqrt_alphas_cumprod, t) * xt - extract(self.sqrt_one_minus_alphas_cumprod, t) * v

    # ------------------------------------------------------------------ the network's view

    def network(self, xt, t, labels=None, guidance=0.0):
        """The network's output at (x_t, t), run once (twice where guided), in float32 (the
        network itself in bf16 if self.amp).

        guidance: a weight w (classifier-free guidance everywhere) or a samplers.Guidance (an
        interval of noise levels, autoguidance). Guided: out = (1 + w)·out(y) − w·out_guide, where
        out_guide is out(∅) (Ho & Salimans 2022, eq. 6) or the guide model's output (Karras et al.
        2024). Every parameterisation is linear in the network's output at fixed x_t, so mixing raw
        outputs equals mixing the implied ε. t: (B,) ints, or floats between steps (EDM).
        """
        g = as_guidance(guidance)
        w = g.weight_at(self.sigma_table, t)
        with torch.autocast(xt.device.type, dtype=torch.bfloat16, enabled=self.amp):
            if w != 0.0 and g.guide is not None:                                        # autoguidance
                out = self.model(xt, t, labels).float()
                out_guide = g.guide.model(xt, t, labels if g.guide.num_classes else None).float()
                return (1 + w) * out - w * out_guide
            if w != 0.0 and labels is not None:                                         # classifier-free
                null = null_labels(self.num_classes, labels.shape[0], labels.device)
                out = self.model(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([labels, null]))
                out_cond, out_uncond = out.float().chunk(2)
                return (1 + w) * out_cond - w * out_uncond
            return self.model(xt, t, labels).float()

    def model_predictions(self, xt, t, labels=None, guidance=0.0, clip_denoised=None):
        """Run the network once (twice with guidance) at integer steps t and return (ε_θ, x̂_0).

        With clip_denoised (None: self.clip_denoised), x̂_0 is clamped to [−1, 1] (the data range;
        not in the equations, but in the DDPM code) and ε is recomputed from it, so the pair stays
        consistent.
        """
        out = self.network(xt, t, labels, guidance)
        if self.objective == "eps":
            eps, x0 = out, self.predict_x0_from_eps(xt, t, out)
        elif self.objective == "x0":
            x0 = out
            eps = self.predict_eps_from_x0(xt, t, x0)
        else:
            x0 = self.predict_x0_from_v(xt, t, out)
            eps = self.predict_eps_from_x0(xt, t, x0)
        if self.clips(clip_denoised):
            x0 = x0.clamp(-1, 1)
            eps = self.predict_eps_from_x0(xt, t, x0)
        return eps, x0

    def p_mean(self, xt, t, eps):
        """DDPM eq. 11: μ_θ(x_t, t) = (x_t − β_t/√(1−ᾱ_t)·ε_θ) / √α_t."""
        return extract(self.sqrt_recip_alphas, t) * (xt - extract(self.eps_coef, t) * eps)

    # ------------------------------------------------------------------ training

    def loss(self, x0, labels=None, model=None):
        """DDPM eq. 14: L_simple = E_{t, x_0, ε} ‖ε − ε_θ(√ᾱ_t·x_0 + √(1−ᾱ_t)·ε, t)‖², t ~ U{0, …, T−1}.

        For objective "x0" or "v" the target is x_0 or v instead of ε. With labels and
        cond_drop_prob > 0, that share of labels becomes the null label (CFG training). With
        loss_weighting "min_snr", each image's squared error is weighted by min_snr_weight(t).
        model: the network to train through, when it is wrapped (torch.compile, DDP); default self.model.
        """
        model = self.model if model is None else model
        B = x0.shape[0]
        t = self.sample_t(B, x0.device)                                                 # (B,)
        eps = torch.randn_like(x0)                                                      # (B, C, H, W)
        xt = self.q_sample(x0, t, eps)
        if labels is not None and self.cond_drop_prob > 0:
            drop = torch.rand(B, device=x0.device) < self.cond_drop_prob
            labels = torch.where(drop, null_labels(self.num_classes, B, labels.device), labels)
        target = {"eps": eps, "x0": x0, "v": self.v_target(x0, t, eps)}[self.objective]
        if self.loss_weighting == "simple":
            return F.mse_loss(model(xt, t, labels).float(), target)
        squared_error = (model(xt, t, labels).float() - target).pow(2).flatten(1).mean(1)   # (B,) ‖·‖²/(C·H·W)
        return (self.min_snr_weight(t) * squared_error).mean()

    def sample_t(self, n, device):
        """Training steps t: (n,) ints in [0, T). "uniform": DDPM Alg. 1. "lognormal": EDM's
        ln σ ~ N(P_mean, P_std²), P_mean = lognormal_mean, then the first step whose
        σ_t = √((1−ᾱ_t)/ᾱ_t) reaches σ. float32 on the device: next to float64 the step moves by at
        most one, and only where σ lies within float32's rounding of a table entry."""
        if self.t_sampling == "uniform":
            return torch.randint(0, self.num_timesteps, (n,), device=device)
        sigma = (self.lognormal_mean + P_STD * torch.randn(n, device=device)).exp()          # (n,) float32
        t = torch.searchsorted(self.sigma_levels, sigma)
        return t.clamp(max=self.num_timesteps - 1)

    def min_snr_weight(self, t):
        """Min-SNR-γ (Hang et al. 2023): weight x_0's error by min(SNR_t, γ), SNR_t = ᾱ_t/(1−ᾱ_t), and
        the same in the objective's own units: ‖ε − ε_θ‖² = SNR_t·‖x_0 − x̂_0‖² and
        ‖v − v_θ‖² = (SNR_t + 1)·‖x_0 − x̂_0‖², so ε gets min(SNR_t, γ)/SNR_t and v min(SNR_t, γ)/(SNR_t + 1).
        It stops the nearly clean steps (huge SNR) from dominating training. (B,) -> (B,)."""
        snr = self.alphas_cumprod[t] / (1 - self.alphas_cumprod[t])                    # SNR_t = ᾱ_t/(1−ᾱ_t)
        clipped = snr.clamp(max=self.min_snr_gamma)                                     # min(SNR_t, γ)
        return {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[self.objective]

    def eq12_weight(self, t):
        """DDPM eq. 12, the weight that DDPM eq. 14 sets to 1: L_t = β_t²/(2σ_t²·α_t·(1−ᾱ_t))·‖ε − ε_θ‖²,
        with σ_t² the reverse-step variance. (B,) -> (B,). Not used in training; kept to show
        what L_simple drops: next to this weighting, L_simple down-weights the small t (Ho et al. §3.4)."""
        sigma2 = extract(self.posterior_log_variance, t).exp().flatten()
        beta, alpha_bar = self.betas[t], self.alphas_cumprod[t]
        return beta ** 2 / (2 * sigma2 * (1 - beta) * (1 - alpha_bar))

    def clips(self, clip_denoised=None):
        """Whether x̂_0 is clamped: the caller's choice, else (None) this model's clip_denoised."""
        return self.clip_denoised if clip_denoised is None else bool(clip_denoised)

    # ------------------------------------------------------------------ sampling

    def sampling_timesteps(self, sampler="ddpm", steps=None, *, cap_steps=False, churn=CHURN, s_tmin=S_TMIN,
                           s_tmax=S_TMAX):
        """The step t of every network call that `sampler` makes with `steps` calls per image, in order,
        or ValueError saying why not. The one place that decides "which steps" for every caller.

        ddpm, steps None or T: DDPM Algorithm 2, every t = T−1 … 0.
        ddpm, steps < T: ancestral sampling on an evenly respaced chain (Nichol & Dhariwal §4).
        ddim, dpmpp2m: `steps` evenly spaced steps (default DEFAULT_STEPS), Song et al. §4.2.
        edm: fractional t (floats) of the noise levels EDM Alg. 2 evaluates (edm_sigmas; default
            DEFAULT_STEPS calls); churn, s_tmin, s_tmax as given to reverse_steps.
        cap_steps: steps above T are taken as T, for a default that a model with a short chain cannot
            take (every default is capped); without it they are refused.
        Guidance doubles the batch of a step where w ≠ 0: two network calls per image there, as
        samplers.Guidance.calls counts them.
        """
        T = self.num_timesteps
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if steps is None:
            steps, cap_steps = (T if sampler == "ddpm" else DEFAULT_STEPS), True
        if cap_steps and isinstance(steps, int) and not isinstance(steps, bool) and steps > T:
            steps = T
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
            raise ValueError(f"{steps!r} sampling steps is out of range: this model has T = {T} diffusion "
                             f"steps, so use a whole number from 1 to {T}")
        if sampler == "edm" and 3 <= steps < EDM_MIN_CALLS:           # Heun's jump into σ_min: noise
            raise ValueError(f"edm needs at least {EDM_MIN_CALLS} network calls, got {steps}: from 3 to "
                             f"{EDM_MIN_CALLS - 1} its Heun step into σ_min returns noise (samplers.EDM_MIN_CALLS); "
                             f"use {EDM_MIN_CALLS} or more, or ddim / dpmpp2m for fewer calls")
        if sampler == "edm":
            sigmas = []
            for _, sigma_hat, sigma_next, heun in edm_sigmas(self.sigma_table, steps, churn, s_tmin, s_tmax):
                sigmas += [sigma_hat, sigma_next] if heun else [sigma_hat]
            return sigma_to_t(self.sigma_table, torch.tensor(sigmas, dtype=torch.float64)).tolist()
        if sampler == "ddpm" and steps == T:
            return list(range(T - 1, -1, -1))
        return ddim_timesteps(T, steps).tolist()

    def _check_labels(self, labels, n):
        if labels is None:
            return
        if self.num_classes is None:
            raise ValueError("labels were given but the model is unconditional")
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")

    @torch.no_grad()
    def sample_iter(self, n, *, progress=True, **settings):
        """Yield (t, x_t, x̂_0) after every network call, with a progress bar; the last x_t is the
        sample (sample() clamps it to [−1, 1]). `settings` are reverse_steps' keywords."""
        ts, steps = self.reverse_steps(n, **settings)
        with tqdm(total=len(ts), desc=f"{settings.get('sampler', 'ddpm')} sampling", disable=not progress,
                  leave=False) as bar:
            for out in steps:
                bar.update()
                yield out

    def reverse_steps(self, n, *, sampler="ddpm", steps=None, eta=0.0, labels=None, guidance=0.0,
                      clip_denoised=None, x_T=None, generator=None,
                      churn=CHURN, s_tmin=S_TMIN, s_tmax=S_TMAX, s_noise=S_NOISE):
        """-> (ts, the sampler's step generator), which yields (t, x_t, x̂_0) after every network call
        at the steps ts; the last x_t is the sample.

        sampler "ddpm": DDPM Algorithm 2, one model call per step t = T−1 … 0. With steps < T it is
            ancestral sampling on the respaced chain (Nichol & Dhariwal §4): DDIM with η = 1, and with
            variance "beta" the noise of the respaced β instead (_ddim_steps' large).
        sampler "ddim": DDIM eq. 12 over `steps` evenly spaced steps; η = 0 is deterministic given x_T.
        sampler "edm": EDM Algorithm 2, stochastic Heun with churn; t is fractional. churn (S_churn),
            s_tmin, s_tmax, s_noise are its settings (see CHURN); churn = 0 is EDM's deterministic Alg. 1.
        sampler "dpmpp2m": DPM-Solver++(2M), deterministic, on the same steps as DDIM.
        steps: network calls per image (sampling_timesteps). x_t is always in DDPM's scaling
            √ᾱ·x_0 + √(1−ᾱ)·ε, also for "edm", whose x_σ = x_t/√ᾱ stays inside.
        generator: a torch.Generator for the noise, for reproducible samples; its device is where
            the noise is drawn (use a CPU generator for the same images on every device).
        clip_denoised: clamp x̂_0 to [−1, 1] at every step; None: this model's clip_denoised.
        """
        clip_denoised = self.clips(clip_denoised)
        ts = self.sampling_timesteps(sampler, steps, churn=churn, s_tmin=s_tmin, s_tmax=s_tmax)
        self._check_labels(labels, n)
        if sampler in ("edm", "dpmpp2m") and eta != 0.0:
            raise ValueError(f"eta is DDIM's η; {sampler} does not take it (edm's noise is set by churn)")
        if not 0 <= eta <= 1:
            raise ValueError(f"eta is DDIM's η in [0, 1], got {eta!r}: above 1, eq. 12's √(1 − ᾱ_t' − σ²) has no root")
        if churn < 0 or s_noise < 0:
            raise ValueError(f"churn and s_noise must be ≥ 0, got churn={churn!r}, s_noise={s_noise!r}")
        device = self.betas.device
        shape = (n, self.channels, self.image_size, self.image_size)

        def randn():
            gen_device = generator.device if generator is not None else device
            return torch.randn(shape, generator=generator, device=gen_device).to(device)

        x = randn() if x_T is None else x_T.to(device)                                  # Alg. 2: x_T ~ N(0, I)
        if sampler == "ddpm" and len(ts) == self.num_timesteps:
            step_iter = self._ddpm_steps(x, labels, guidance, clip_denoised, randn)
        elif sampler in ("ddpm", "ddim"):
            eta = 1.0 if sampler == "ddpm" else eta
            large = sampler == "ddpm" and self.variance == "beta"
            step_iter = self._ddim_steps(x, ts, eta, labels, guidance, clip_denoised, randn, large)
        elif sampler == "dpmpp2m":
            step_iter = dpmpp2m_steps(self, x, ts, labels, guidance, clip_denoised)
        else:
            plan = edm_sigmas(self.sigma_table, len(ts), churn, s_tmin, s_tmax)
            step_iter = edm_steps(self, x, plan, s_noise, labels, guidance, clip_denoised, randn)
        return ts, step_iter

    def _ddpm_steps(self, x, labels, guidance, clip_denoised, randn):
        """DDPM Algorithm 2: x_{t−1} = μ_θ(x_t, t) + σ_t·z, z ~ N(0, I), and z = 0 at the last step."""
        for i in reversed(range(self.num_timesteps)):                                 # Alg. 2: for t = T, …, 1
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            g = as_guidance(guidance).at(self.sigma_table[i].item())                      # w at σ_t, on the host
            eps, x0 = self.model_predictions(x, t, labels, g, clip_denoised)
            mean = self.p_mean(x, t, eps)                                             # DDPM eq. 11
            if i > 0:
                x = mean + (0.5 * extract(self.posterior_log_variance, t)).exp() * randn()  # σ_t·z
            else:
                x = mean                                                              # no noise at t = 1
            yield i, x, x0

    def _ddim_steps(self, x, ts, eta, labels, guidance, clip_denoised, randn, large=False):
        """DDIM eq. 12, from step t to the next chosen step t' < t (ᾱ_{t'} = 1 after the last):
        x_{t'} = √ᾱ_{t'}·x̂_0 + √(1 − ᾱ_{t'} − σ²)·ε_θ + σ·z,
        σ = η·√((1 − ᾱ_{t'})/(1 − ᾱ_t))·√(1 − ᾱ_t/ᾱ_{t'})   (DDIM eq. 16).
        At η = 1, σ² is the respaced chain's β̃ and the step is its posterior mean plus noise. large
        (ancestral DDPM with variance "beta"): the same mean, the noise of the respaced β_t
        = 1 − ᾱ_t/ᾱ_{t'} instead (DDPM's σ_t² = β_t on the respaced chain)."""
        for i, t_now in enumerate(ts):
            t = torch.full((x.shape[0],), t_now, device=x.device, dtype=torch.long)
            g = as_guidance(guidance).at(self.sigma_table[t_now].item())                  # w at σ_t, on the host
            eps, x0 = self.model_predictions(x, t, labels, g, clip_denoised)
            alpha_bar = self.alphas_cumprod[t_now]
            alpha_bar_prev = self.alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else torch.ones_like(alpha_bar)
            sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
            x = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
            if eta > 0 and i + 1 < len(ts):
                x = x + ((1 - alpha_bar / alpha_bar_prev).sqrt() if large else sigma) * randn()
            yield t_now, x, x0

    @torch.no_grad()
    def sample(self, n, *, trajectory_every=None, progress=True, **settings):
        """Draw n images, (n, C, H, W) in [−1, 1]. `settings` are reverse_steps' keywords.

        With trajectory_every = k, also return the trajectory: a list of (t, x_t, x̂_0) for every
        k-th step and the last one, on the CPU, for animations.
        """
        ts, steps = self.reverse_steps(n, **settings)                # the sampler: one network call a step
        bar = tqdm(total=len(ts), desc=f"{settings.get('sampler', 'ddpm')} sampling", disable=not progress, leave=False)
        trajectory = []
        k = x = x0 = None
        for k, (t, x, x0) in enumerate(steps):
            bar.update()
            if trajectory_every and k % trajectory_every == 0:
                trajectory.append((t, x.cpu(), x0.cpu()))
        if trajectory_every and k % trajectory_every != 0:                               # and the last step
            trajectory.append((t, x.cpu(), x0.cpu()))
        bar.close()
        x = x.clamp(-1, 1)
        return (x, trajectory) if trajectory_every else x
