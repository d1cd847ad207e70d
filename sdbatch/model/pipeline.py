"""Text-to-image and image-to-image generation with classifier-free guidance and per-row seeds.

Randomness follows diffusers' StableDiffusion(Img2Img)Pipeline given one CPU generator per
image: each row draws, from its own `torch.Generator("cpu")` seeded with its seed, first the
image-to-image encoder noise, then its initial latent noise (1, 4, h, w), then the noise of every
stochastic sampler step. So a seed gives the same image on any device and in any batch.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import chain

import numpy as np
import torch
from PIL import Image

from sdbatch.images import to_rgb

from .samplers import Sampler, Schedule, eps_denoiser, get_sampler, row_noise_sampler, run_sampler

InitImage = Image.Image | np.ndarray


class NonFiniteError(ValueError):
    """Rows of a batch whose latents or decoded images held NaN or inf, also after a float32 retry.

    rows: their indices in the batch (ascending). images: uint8 (B, H, W, 3), the whole batch; the
    listed rows are black placeholders that must never be used as images; the others are good.
    latents: float32 (B, 4, H/8, W/8), the final latents (the listed rows' are not finite).
    """

    def __init__(self, rows: list[int], images: np.ndarray, dtype: torch.dtype, latents: np.ndarray | None = None):
        self.rows, self.images, self.latents = rows, images, latents
        retried = "" if dtype == torch.float32 else f" in {str(dtype).removeprefix('torch.')} and again in float32"
        super().__init__(
            f"rows {rows} of the batch came out non-finite (NaN or inf){retried}: the model's weights or "
            "these settings overflow; no image was made for them")


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

    Converted to RGB as a viewer shows it (`sdbatch.images.to_rgb`: EXIF orientation applied,
    transparency composited onto white), then resized with Lanczos as diffusers'
    VaeImageProcessor resizes PIL images."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ValueError(
                f"init_images[{row}]: expected a uint8 array of shape (H, W), (H, W, 3) or (H, W, 4), "
                f"got a {image.dtype} array of shape {image.shape}"
            )
        image = Image.fromarray(image.squeeze(2) if image.ndim == 3 and image.shape[2] == 1 else image)
    elif not isinstance(image, Image.Image):
        raise TypeError(f"init_images[{row}]: expected a PIL image or a uint8 array, got {type(image).__name__}")
    image = to_rgb(image)
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

    Rows whose latents or images come out non-finite (NaN/inf: float16 overflow) are generated
    again in float32 (the model is cast for that and cast back); rows still non-finite then raise
    NonFiniteError, which lists them and carries the other rows' images.
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

    pixels = pixels if init_images is not None else None
    images, bad, latents = _sample(model, prompts, negatives, seeds, spec, schedule, cfg_scale, width, height,
                                   pixels, progress, offload)
    if bad.any() and model.dtype != torch.float32:
        # as AUTOMATIC1111 does for its VAE: redo the rows that overflowed, in float32 this time
        redo = bad.nonzero()[0].tolist()
        with _in_float32(model):
            images[redo], bad[redo], latents[redo] = _sample(
                model, [prompts[i] for i in redo], [negatives[i] for i in redo], [seeds[i] for i in redo], spec,
                schedule, cfg_scale, width, height, None if pixels is None else pixels[redo], progress, offload)
    if bad.any():
        images[bad] = 0
        raise NonFiniteError(bad.nonzero()[0].tolist(), images, model.dtype, latents)
    return (images, latents) if return_latents else images


@contextmanager
def _in_float32(model: torch.nn.Module) -> Iterator[None]:
    """Run the model in float32 for the block, then give every module its own dtype back (a float16
    model's float32 VAE decoder stays float32). Costs a float32 copy of the weights meanwhile."""
    dtypes = {}
    for module in model.modules():
        tensors = chain(module.parameters(recurse=False), module.buffers(recurse=False))
        floating = [t.dtype for t in tensors if t is not None and t.is_floating_point()]
        if floating:
            dtypes[module] = floating[0]
    model.float()
    try:
        yield
    finally:
        for module, dtype in dtypes.items():
            module._apply(lambda t, dtype=dtype: t.to(dtype) if t.is_floating_point() else t, recurse=False)


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> bool (B,) on the CPU: whether each row is free of NaN and inf."""
    return torch.isfinite(x).flatten(1).all(1).cpu()


def _sample(model, prompts: list[str], negatives: list[str], seeds: list[int], spec: Sampler, schedule: Schedule,
            cfg_scale: float, width: int, height: int, pixels: torch.Tensor | None, progress: bool,
            offload: torch.device | str | None) -> tuple[np.ndarray, np.ndarray]:
    """The checked inputs of `generate` -> uint8 images (B, height, width, 3), bool (B,) non-finite rows,
    float32 final latents (B, 4, height/8, width/8)."""
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
    if pixels is None:
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
    finite = _finite_rows(latents) & _finite_rows(images)
    return to_uint8(images), (~finite).numpy(), latents.float().cpu().numpy()
