"""Text-to-image and image-to-image generation with classifier-free guidance and per-row seeds.

Randomness follows diffusers' StableDiffusion(Img2Img)Pipeline given one CPU generator per
image: each row draws, from its own `torch.Generator("cpu")` seeded with its seed, first the
image-to-image encoder noise, then its initial latent noise (1, 4, h, w), then the noise of every
stochastic sampler step. So a seed gives the same image on any device and in any batch.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

from .samplers import eps_denoiser, get_sampler, row_noise_sampler, run_sampler

InitImage = Image.Image | np.ndarray


def _check_strings(name: str, values: Sequence[str], n: int) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list of strings, got {type(values).__name__}")
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but there are {n} prompts")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(v).__name__}")
    return list(values)


def _check_seeds(seeds: Sequence[int], n: int) -> list[int]:
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence | np.ndarray):
        raise TypeError(f"seeds must be a list of integers, one per prompt, got {type(seeds).__name__}")
    if len(seeds) != n:
        raise ValueError(f"seeds has {len(seeds)} entries but there are {n} prompts")
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, int | np.integer):
            raise TypeError(f"seeds[{i}] must be an integer, got {s!r}")
        if not 0 <= s < 2**64:
            raise ValueError(f"seeds[{i}] = {s} is outside [0, 2**64)")
    return [int(s) for s in seeds]


def load_init_image(image: InitImage, width: int, height: int, row: int = 0) -> torch.Tensor:
    """A PIL image (any mode, any size) or a uint8 array (H, W), (H, W, 1|3|4) -> (3, height, width) in [-1, 1].
    Converted to RGB, then resized with Lanczos as diffusers' VaeImageProcessor resizes PIL images."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ValueError(
                f"init_images[{row}]: expected a uint8 array of shape (H, W), (H, W, 3) or (H, W, 4), "
                f"got a {image.dtype} array of shape {image.shape}"
            )
        image = Image.fromarray(image.squeeze(2) if image.ndim == 3 and image.shape[2] == 1 else image)
    elif not isinstance(image, Image.Image):
        raise TypeError(f"init_images[{row}]: expected a PIL image or a uint8 array, got {type(image).__name__}")
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(image).astype(np.float32) / 255.0)
    return pixels.permute(2, 0, 1) * 2.0 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), rounding (not truncating) to the nearest level."""
    images = ((images.float().clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


@contextmanager
def _placed(module: torch.nn.Module, device: torch.device | None) -> Iterator[None]:
    """Move `module` to `device` for the block, and back to where it was after (no-op for None)."""
    if device is None:
        yield
        return
    home = next(module.parameters()).device
    module.to(device)
    try:
        yield
    finally:
        module.to(home)


@torch.inference_mode()
def generate(
    model,
    prompts: Sequence[str],
    negative_prompts: Sequence[str] | None = None,
    *,
    seeds: Sequence[int],
    steps: int = 25,
    cfg_scale: float = 7.5,
    sampler: str = "dpmpp_2m_karras",
    width: int = 512,
    height: int = 512,
    init_images: Sequence[InitImage] | None = None,
    strength: float = 0.8,
    progress: bool = True,
    offload: str | torch.device | None = None,
    return_latents: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Generate one image per prompt; returns uint8 (B, height, width, 3).

    negative_prompts: one per prompt ("" = unconditional, the default). cfg_scale 1 skips the
    unconditional pass. init_images (PIL images or uint8 arrays, one per prompt) switch to
    image-to-image: each is resized to (width, height), encoded, and noised to the level of the
    first of the last int(steps * strength) steps, which are then run.
    offload: run on this device (e.g. "cuda") while the model stays where it is (the CPU), moving
    each network there only while it runs: for GPUs too small to hold the whole model.
    return_latents: also return the sampler's final latents, float32 (B, 4, height/8, width/8),
    in the scaled latent space (what the VAE decodes after dividing by config.latent_scale).
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    prompts = _check_strings("prompts", prompts, len(prompts))
    n = len(prompts)
    negatives = [""] * n if negative_prompts is None else _check_strings("negative_prompts", negative_prompts, n)
    seeds = _check_seeds(seeds, n)
    spec = get_sampler(sampler)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise ValueError(f"steps must be an integer in [1, 1000], got {steps!r}")
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, int | float) or not np.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
    for name, size in (("width", width), ("height", height)):
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 8:
            raise ValueError(f"{name} must be a positive multiple of 8, got {size!r}")
    schedule = spec.schedule(steps)
    if init_images is not None:
        if len(init_images) != n:
            raise ValueError(f"init_images has {len(init_images)} entries but there are {n} prompts")
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength!r}")
        if int(steps * strength) < 1:
            raise ValueError(f"strength {strength} with {steps} steps leaves no step to run: raise steps or strength")
        pixels = torch.stack([load_init_image(im, width, height, i) for i, im in enumerate(init_images)])
        schedule = schedule[steps - int(steps * strength) :]
    if n == 0:
        empty = np.zeros((0, height, width, 3), np.uint8)
        return (empty, np.zeros((0, 4, height // 8, width // 8), np.float32)) if return_latents else empty

    # The U-Net and the VAE cast inputs to their own dtype (a float16 VAE decoder may be kept in float32) and
    # return float32 for float32 inputs: sampling and guidance stay in float32 whatever the model dtype.
    offload = None if offload is None else torch.device(offload)
    device = offload or model.device
    guided = cfg_scale != 1
    tokens = model.tokenize(negatives + prompts if guided else prompts).to(device)
    with _placed(model.text_encoder, offload):
        context = model.text_encoder(tokens)

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if guided:
            x = torch.cat([x, x])
        out = model.unet(x, t.to(device).expand(len(x)), context)
        if not guided:
            return out
        uncond, cond = out.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    noise = row_noise_sampler([torch.Generator("cpu").manual_seed(s) for s in seeds], (4, height // 8, width // 8), device)
    if init_images is None:
        x = noise() * spec.initial_noise_scale(schedule.sigmas[0])
    else:
        with _placed(model.vae, offload):
            mean, logvar = model.vae.encode(pixels.to(device))
        latents = (mean + torch.exp(0.5 * logvar) * noise()) * model.config.latent_scale
        x = latents + noise() * schedule.sigmas[0]

    # sigmas stay 0-d CPU tensors: they mix with tensors on any device without a sync.
    with _placed(model.unet, offload):
        latents = run_sampler(spec, eps_denoiser(eps, schedule), x, schedule.sigmas, noise, disable=not progress)
    with _placed(model.vae, offload):
        images = model.vae.decode(latents / model.config.latent_scale)
    if return_latents:
        return to_uint8(images), latents.float().cpu().numpy()
    return to_uint8(images)
