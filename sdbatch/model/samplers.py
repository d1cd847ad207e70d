"""Noise schedules and samplers for SD v1.x, in the style of k-diffusion's sampling.py.

Every sampler works on the noise-level ("sigma") parametrisation x = x0 + sigma * eps and
calls `model(x, sigma) -> denoised x0`. The discrete-time samplers are that same family:
DDIM with eta 0 is an Euler step between two training noise levels, and the DDPM posterior
step is exactly an ancestral Euler step (its mean (1 - s'^2/s^2) x0 + (s'^2/s^2) x and its
variance s'^2 (s^2 - s'^2) / s^2 are what `ancestral_step` computes). What tells the named
samplers apart is their schedule, built here the way diffusers 0.42 builds it from SD v1.5's
scheduler config (scaled_linear betas, steps_offset 1, set_alpha_to_one False):

    ddpm             DDPMScheduler               'leading' timesteps, final sigma 0
    ddim             DDIMScheduler (eta 0)       'leading' timesteps, final sigma = sigma(t=0)
    euler            EulerDiscreteScheduler      'linspace' fractional timesteps, final sigma 0
    euler_a          EulerAncestralDiscrete...   as euler
    dpmpp_2m         DPMSolverMultistep...       'linspace' rounded timesteps, first order on the last step
    dpmpp_2m_karras  as dpmpp_2m, use_karras_sigmas, U-Net timesteps rounded from the Karras sigmas

Schedules are computed in numpy/float32 exactly as diffusers computes them, so the U-Net sees
the same timesteps (fractional for Euler) and the same input scaling.
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm.auto import trange

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012
STEPS_OFFSET = 1  # SD v1.x configs; used by the 'leading' spacing

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseSampler = Callable[[], torch.Tensor]


# ----------------------------------------------------------------------------- noise schedules


def scaled_linear_betas(n: int = NUM_TRAIN_TIMESTEPS, start: float = BETA_START, end: float = BETA_END) -> torch.Tensor:
    """SD's training betas: linspace in sqrt(beta), squared (float32, as diffusers builds them)."""
    return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2


def alphas_cumprod(betas: torch.Tensor | None = None) -> torch.Tensor:
    betas = scaled_linear_betas() if betas is None else betas
    return torch.cumprod(1.0 - betas, dim=0)


def training_sigmas(alphas_cumprod_: torch.Tensor | None = None) -> np.ndarray:
    """sigma(t) = sqrt((1 - abar_t) / abar_t) for t = 0..999 (float32, ascending)."""
    a = alphas_cumprod() if alphas_cumprod_ is None else alphas_cumprod_
    return (((1 - a) / a) ** 0.5).numpy()


def leading_timesteps(steps: int, offset: int = STEPS_OFFSET, n_train: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """'leading' spacing: k * (n_train // steps) + offset, descending (50 steps -> 981, 961, ..., 1)."""
    return (np.arange(steps) * (n_train // steps))[::-1].astype(np.int64) + offset


def linspace_timesteps(steps: int, n_train: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """'linspace' spacing as EulerDiscreteScheduler uses it: fractional float32 from 999 down to 0."""
    return np.linspace(0, n_train - 1, steps, dtype=np.float32)[::-1].copy()


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels, evenly spaced in sigma^(1/rho), descending."""
    ramp = np.linspace(0, 1, steps)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: linear interpolation in log-sigma (as diffusers)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))


@dataclass(frozen=True)
class Schedule:
    """Noise levels for one run: `sigmas` (steps + 1,) descending, ending at the final level, and the
    U-Net timestep that goes with each of the first `steps` of them."""

    sigmas: torch.Tensor  # float32
    timesteps: torch.Tensor  # float32 (integer-valued except for Euler's 'linspace' spacing)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The U-Net timestep of one of this schedule's sigmas."""
        return self.timesteps[int(torch.argmin((self.sigmas[:-1] - sigma).abs()))]

    def __getitem__(self, index: slice) -> "Schedule":
        """A later part of the schedule (image-to-image skips the first steps)."""
        return Schedule(self.sigmas[index], self.timesteps[index])


def _schedule(sigmas: np.ndarray, final_sigma: float, timesteps: np.ndarray) -> Schedule:
    return Schedule(
        torch.from_numpy(np.append(sigmas, final_sigma).astype(np.float32)),
        torch.from_numpy(np.asarray(timesteps).astype(np.float32)),
    )


def ddpm_schedule(steps: int) -> Schedule:
    t = leading_timesteps(steps)
    return _schedule(training_sigmas()[t], 0.0, t)


def ddim_schedule(steps: int) -> Schedule:
    # set_alpha_to_one=False: the last step lands on abar_0, not on a clean sample.
    sigmas = training_sigmas()
    t = leading_timesteps(steps)
    return _schedule(sigmas[t], sigmas[0], t)


def euler_schedule(steps: int) -> Schedule:
    sigmas = training_sigmas()
    t = linspace_timesteps(steps)
    return _schedule(np.interp(t, np.arange(len(sigmas)), sigmas), 0.0, t)


def dpm_schedule(steps: int) -> Schedule:
    sigmas = training_sigmas()
    t = np.linspace(0, NUM_TRAIN_TIMESTEPS - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    return _schedule(np.interp(t, np.arange(len(sigmas)), sigmas), 0.0, t)


def karras_schedule(steps: int) -> Schedule:
    sigmas = training_sigmas()
    k = karras_sigmas(float(sigmas[0]), float(sigmas[-1]), steps)
    return _schedule(k, 0.0, sigma_to_t(k, np.log(sigmas)).round())


# ----------------------------------------------------------------------------- samplers


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a step to sigma_next into a deterministic step to sigma_down plus fresh noise of sigma_up."""
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


@torch.no_grad()
def sample_euler(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, disable: bool = False) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (DDIM with eta 0 on a discrete schedule)."""
    for i in trange(len(sigmas) - 1, disable=disable):
        d = (x - model(x, sigmas[i])) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise_sampler: NoiseSampler, disable: bool = False
) -> torch.Tensor:
    """Ancestral sampling with Euler steps (the DDPM posterior sampler on a discrete schedule).
    Noise is drawn on every step, the last one included, as diffusers draws it."""
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1])
        x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
        x = x + noise_sampler() * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, disable: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M): second-order multistep in log-sigma; first order on the first step and
    on the step to sigma 0 (diffusers' lower_order_final with final_sigmas_type 'zero')."""
    old_denoised = None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            d = denoised
            if old_denoised is not None:
                r = (sigmas[i - 1].log() - sigmas[i].log()) / h
                d = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * old_denoised
            x = sigmas[i + 1] / sigmas[i] * x - torch.expm1(-h) * d
        old_denoised = denoised
    return x


# ----------------------------------------------------------------------------- named samplers


@dataclass(frozen=True)
class Sampler:
    name: str
    sample: Callable[..., torch.Tensor]
    schedule: Callable[[int], Schedule]
    stochastic: bool
    # diffusers starts text-to-image from N(0, 1) in the variance-preserving variable x / sqrt(1 + sigma^2)
    # (DDPM, DDIM, DPM-Solver: init_noise_sigma 1) or from N(0, sigma_max^2) (Euler: init_noise_sigma sigma_max).
    unit_variance_start: bool

    def initial_noise_scale(self, sigma_max: torch.Tensor) -> torch.Tensor:
        return (sigma_max**2 + 1) ** 0.5 if self.unit_variance_start else sigma_max


SAMPLERS = {
    s.name: s
    for s in (
        Sampler("ddpm", sample_euler_ancestral, ddpm_schedule, stochastic=True, unit_variance_start=True),
        Sampler("ddim", sample_euler, ddim_schedule, stochastic=False, unit_variance_start=True),
        Sampler("euler", sample_euler, euler_schedule, stochastic=False, unit_variance_start=False),
        Sampler("euler_a", sample_euler_ancestral, euler_schedule, stochastic=True, unit_variance_start=False),
        Sampler("dpmpp_2m", sample_dpmpp_2m, dpm_schedule, stochastic=False, unit_variance_start=True),
        Sampler("dpmpp_2m_karras", sample_dpmpp_2m, karras_schedule, stochastic=False, unit_variance_start=True),
    )
}


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def eps_denoiser(eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: Schedule) -> Denoiser:
    """Wrap an epsilon-predicting network `eps_fn(x_in, t)` as a denoiser in sigma space: its input is
    scaled to unit variance and it is called with the schedule's timestep for that sigma."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        eps = eps_fn(x / (sigma**2 + 1) ** 0.5, schedule.timestep(sigma))
        return x - sigma * eps.float()

    return denoise


def row_noise_sampler(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device | str = "cpu") -> NoiseSampler:
    """Standard normal noise for a batch, each row (1, *shape) drawn in float32 from its own CPU generator,
    so a row's noise depends only on its seed, never on the device or the rest of the batch."""

    def noise() -> torch.Tensor:
        rows = [torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators]
        return torch.cat(rows).to(device)

    return noise


def to_unit_variance(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 + sigma * eps -> the variance-preserving latent sqrt(abar) x0 + sqrt(1 - abar) eps."""
    return x / (sigma**2 + 1) ** 0.5


def run_sampler(
    sampler: Sampler, model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
    noise_sampler: NoiseSampler, disable: bool = False,
) -> torch.Tensor:
    """Run a named sampler from x at sigmas[0]; returns the variance-preserving latent at sigmas[-1]."""
    if sampler.stochastic:
        x = sampler.sample(model, x, sigmas, noise_sampler, disable=disable)
    else:
        x = sampler.sample(model, x, sigmas, disable=disable)
    return to_unit_variance(x, sigmas[-1])

