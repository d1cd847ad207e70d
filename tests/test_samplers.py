"""Each named sampler against the diffusers scheduler it stands for, step by step on the same
stand-in noise predictor and the same per-row generators."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.utils.torch_utils import randn_tensor

from sdbatch.model.samplers import SAMPLERS, eps_denoiser, get_sampler, row_noise_sampler, run_sampler

# scheduler/scheduler_config.json of runwayml/stable-diffusion-v1-5
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

DIFFUSERS_SCHEDULERS = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
}


def diffusers_scheduler(name: str, config=SD15_SCHEDULER_CONFIG):
    cls, kwargs = DIFFUSERS_SCHEDULERS[name]
    return cls.from_config(config, **kwargs)


SHAPE = (4, 8, 8)
SEEDS = [3, 11]


def stand_in_eps():
    """A fixed random channel mix of the input plus a smooth function of the timestep."""
    g = torch.Generator().manual_seed(0)
    mix = 0.5 * torch.eye(4) + 0.2 * torch.randn(4, 4, generator=g)
    phase = torch.randn(4, generator=g)

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32)
        return torch.einsum("ij,bjhw->bihw", mix, x) + 0.1 * torch.sin(t / 150 + phase)[None, :, None, None]

    return eps


def clean_latents() -> torch.Tensor:
    return torch.randn((len(SEEDS), *SHAPE), generator=torch.Generator().manual_seed(5))


def run_diffusers(name: str, steps: int, strength: float | None) -> torch.Tensor:
    sched = diffusers_scheduler(name)
    sched.set_timesteps(steps)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    eps = stand_in_eps()
    timesteps = sched.timesteps
    if strength is None:
        latents = randn_tensor((len(SEEDS), *SHAPE), generator=gens) * sched.init_noise_sigma
    else:  # as StableDiffusionImg2ImgPipeline.get_timesteps / prepare_latents
        start = steps - int(steps * strength)
        timesteps = timesteps[start:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start)
        noise = randn_tensor((len(SEEDS), *SHAPE), generator=gens)
        latents = sched.add_noise(clean_latents(), noise, timesteps[:1].repeat(len(SEEDS)))
    for t in timesteps:
        model_input = sched.scale_model_input(latents, t)
        latents = sched.step(eps(model_input, t), t, latents, generator=gens).prev_sample
    return latents


def run_ours(name: str, steps: int, strength: float | None) -> torch.Tensor:
    sampler = get_sampler(name)
    schedule = sampler.schedule(steps)
    noise = row_noise_sampler([torch.Generator().manual_seed(s) for s in SEEDS], SHAPE)
    if strength is None:
        x = noise() * sampler.initial_noise_scale(schedule.sigmas[0])
    else:
        schedule = schedule[steps - int(steps * strength) :]
        x = clean_latents() + noise() * schedule.sigmas[0]
    return run_sampler(sampler, eps_denoiser(stand_in_eps(), schedule), x, schedule.sigmas, noise, disable=True)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("steps", [4, 7, 25])
def test_schedule_matches_diffusers(name, steps):
    sched = diffusers_scheduler(name)
    sched.set_timesteps(steps)
    ours = get_sampler(name).schedule(steps)
    torch.testing.assert_close(ours.timesteps, sched.timesteps.float(), rtol=0, atol=0)
    if name in ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"):
        torch.testing.assert_close(ours.sigmas, sched.sigmas.float(), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("steps,strength", [(4, None), (25, None), (7, 0.6), (20, 0.75)])
def test_sampler_matches_diffusers(name, steps, strength):
    expected = run_diffusers(name, steps, strength)
    actual = run_ours(name, steps, strength)
    assert expected.abs().max() > 0.1  # the comparison is on something
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_stochastic_samplers_depend_on_step_noise():
    # The ancestral samplers really use the per-step noise: another step-noise stream changes the result.
    sampler = get_sampler("euler_a")
    schedule = sampler.schedule(6)
    start = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(1)) * schedule.sigmas[0]
    denoiser = eps_denoiser(stand_in_eps(), schedule)
    a = run_sampler(sampler, denoiser, start, schedule.sigmas, row_noise_sampler([torch.Generator().manual_seed(1)], SHAPE), True)
    b = run_sampler(sampler, denoiser, start, schedule.sigmas, row_noise_sampler([torch.Generator().manual_seed(2)], SHAPE), True)
    assert (a - b).abs().max() > 1e-2


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_sampler("k_lms")
    for name in SAMPLERS:
        assert name in str(err.value)
