"""Pure-torch pieces of training SD v1.x models: named sizes, fresh and loaded trainable models,
noising, the diffusion and VAE losses, EMA of weights, conditioning; export (to one single-file
checkpoint) is in .export. Nothing here knows about Ray (the training job lives in sdbatch.jobs).

Randomness comes only from the `torch.Generator` (CPU) each function is handed, drawn in float32
on the CPU and moved to the data's device, so a step's draws depend on the generator alone,
never on the device or the thread count.
"""

import functools
import math
import os
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import samplers
from .export import export_checkpoint, write_diffusers_config
from .tokenizer import Tokenizer
from .clip import CLIPConfig
from .unet import ResBlock, SpatialTransformer, UNetConfig, UNetModel
from .vae import AutoencoderKL, VAEConfig
from .weights import LATENT_SCALE, TINY_CONFIG, ModelConfig, StableDiffusion, load_model

__all__ = [  # export_checkpoint and write_diffusers_config (from .export) close a training run
    "CONFIGS", "EMA", "add_noise", "diffusion_loss", "drop_captions", "encode_latents", "eps_loss",
    "export_checkpoint", "get_config", "gradient_checkpointing_", "kl_divergence", "load_for_training",
    "min_snr_weights", "new_model", "snr", "tokenize_captions", "vae_loss", "write_diffusers_config",
]

# Named model sizes, all with SD v1.x's structure (so every loader and tool reads them).
CONFIGS: dict[str, ModelConfig] = {
    "tiny": TINY_CONFIG,  # the tests' size: a few MB, 64x64 images train on a CPU in seconds
    "sd15": ModelConfig(),  # SD v1.5's size (860M-parameter U-Net)
    # The built-in demo model (`builtin:shapes`): 64x64 images, 4x8x8 latents, 5.33M parameters,
    # 21.3 MB in float32 (the cap is 25 MB). CLIP's token embedding (49,408 ids x width)
    # sets the floor, 3.16M at width 64. The U-Net (8x8 -> 4x4 -> 2x2, attention at 4x4 and 2x2,
    # 1.69M) takes about 1 s per step at batch 32 on the 2-core CPU; a 64-channel U-Net with
    # attention at 8x8 took 2.3x as long, too slow for a 2-hour recipe. The VAE (0.37M) is 32
    # channels wide at full resolution, GroupNorm's 32 groups being the minimum.
    "shapes": ModelConfig(
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1, 2),
                        context_dim=64),
        vae=VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1),
        text_encoder=CLIPConfig(width=64, layers=2, heads=1, mlp_width=256),
    ),
}


def get_config(config: str | ModelConfig) -> ModelConfig:
    """A ModelConfig, or the one named in CONFIGS; ValueError for an unknown name."""
    if isinstance(config, ModelConfig):
        return config
    if config not in CONFIGS:
        raise ValueError(f"unknown model config {config!r}; valid configs: {', '.join(CONFIGS)}")
    return CONFIGS[config]


# ----------------------------------------------------------------------------- models


def _zero_residual_outputs_(unet: UNetModel) -> None:
    """LDM's openaimodel.py starts every residual branch (ResBlock's last conv, the transformer's
    proj_out) and the output conv at zero: each block begins as the identity."""
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, ResBlock):
                nn.init.zeros_(module.out_layers[3].weight), nn.init.zeros_(module.out_layers[3].bias)
            elif isinstance(module, SpatialTransformer):
                nn.init.zeros_(module.proj_out.weight), nn.init.zeros_(module.proj_out.bias)
        nn.init.zeros_(unet.out[2].weight), nn.init.zeros_(unet.out[2].bias)


# The posterior's log-variance a new VAE starts from (std e^-4, about 0.02). Under LDM's KL weight
# (1e-6) only the reconstruction narrows the posterior, through quant_conv's bias, which AdamW
# moves by about the learning rate a step: from PyTorch's initial log-variance (about 0, std 1) a
# small VAE's decoder sees latents mostly made of noise for its first thousand steps. The 64x64
# `shapes` VAE after 16k images: every attribute right on 31% of reconstructions from PyTorch's
# initialisation (batch 32, lr 5e-4), 50% from this one (batch 16, lr 1e-3).
VAE_LOGVAR_INIT = -8.0


def new_model(config: str | ModelConfig, seed: int, tokenizer: Tokenizer | None = None) -> StableDiffusion:
    """A new model with random weights, on the CPU in float32, trainable (train mode, gradients on).

    config: a ModelConfig or a name in CONFIGS. Weights are PyTorch's default initialisation,
    drawn from a generator seeded with `seed` (the global RNG is left as it was), with the
    U-Net's residual branches and output at zero as in LDM, and the VAE's posterior starting
    narrow (log-variance VAE_LOGVAR_INIT). Raises ValueError for an unknown name.
    """
    config = get_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = StableDiffusion(config, tokenizer)
    _zero_residual_outputs_(model.unet)
    with torch.no_grad():
        model.vae.quant_conv.bias[config.vae.latent_channels:] = VAE_LOGVAR_INIT
    return model.train().requires_grad_(True)


def load_for_training(source: str | os.PathLike, storage_options: dict | None = None, ema: bool = False) -> StableDiffusion:
    """Load any checkpoint `load_model` reads (single file or diffusers folder, local or fsspec URI)
    for training: CPU, float32, plain nn.Conv2d/nn.Linear (not packed), train mode, gradients on.

    A full single-file checkpoint's raw U-Net weights are loaded, not its EMA (`ema=True` takes
    the EMA). `model.hash` is the sha256 of the source, for the exported checkpoint's metadata.
    Raises CheckpointError as load_model does.
    """
    model = load_model(source, "cpu", torch.float32, storage_options, ema=ema, packed=False)
    return model.train().requires_grad_(True)


def _checkpointed(forward, *args):
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False)
    return forward(*args)


def gradient_checkpointing_(unet: UNetModel) -> UNetModel:
    """Recompute each U-Net block's activations in the backward pass instead of keeping them
    (torch.utils.checkpoint, non-reentrant): the same gradients for less memory and about a
    third more compute, as diffusers' enable_gradient_checkpointing. In place; returns `unet`.
    Only while gradients are on: inference runs the blocks as before."""
    for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
        block.forward = functools.partial(_checkpointed, block.forward)
    return unet


# ----------------------------------------------------------------------------- noise and losses


def randn(shape: Sequence[int], generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal float32 noise drawn on the CPU from `generator`, then moved to `device`."""
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) broadcasting against `like`."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(
    x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor | None = None
) -> torch.Tensor:
    """The forward process at integer timesteps: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.

    x0, noise: (B, ...) of one dtype; timesteps: (B,) integers in [0, 1000); alphas_cumprod:
    (1000,) abar, by default SD v1.x's (`samplers.alphas_cumprod()`). Returns x0's dtype, with
    abar cast to it first, as diffusers' DDPMScheduler.add_noise does (Ho et al. 2020, eq. 4).
    """
    abar = (samplers.alphas_cumprod() if alphas_cumprod is None else alphas_cumprod).to(x0.device, x0.dtype)
    a = _per_sample(abar[timesteps.to(x0.device)], x0)
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor | None = None) -> torch.Tensor:
    """Signal-to-noise ratio abar_t / (1 - abar_t) at integer timesteps (B,), float32."""
    abar = (samplers.alphas_cumprod() if alphas_cumprod is None else alphas_cumprod).to(timesteps.device)
    a = abar[timesteps].float()
    return a / (1 - a)


def min_snr_weights(timesteps: torch.Tensor, gamma: float, alphas_cumprod: torch.Tensor | None = None) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction, min(SNR_t, gamma) / SNR_t (B,) float32
    (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"; as
    diffusers' examples/text_to_image/train_text_to_image.py weighs the per-sample MSE)."""
    s = snr(timesteps, alphas_cumprod)
    return s.clamp(max=gamma) / s


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32; float32 and float64 stay (losses are never summed in half precision)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def eps_loss(
    prediction: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    snr_gamma: float | None = None,
    alphas_cumprod: torch.Tensor | None = None,
) -> torch.Tensor:
    """Epsilon-prediction MSE (scalar, float32 or wider): the mean over all elements, or with
    `snr_gamma` the batch mean of each sample's mean squared error times its min-SNR weight."""
    if snr_gamma is None:
        return F.mse_loss(_wide(prediction), _wide(noise))
    per_sample = (_wide(prediction) - _wide(noise)).pow(2).flatten(1).mean(1)
    return (per_sample * min_snr_weights(timesteps.to(noise.device), snr_gamma, alphas_cumprod)).mean()


def draw_noise_and_timesteps(
    latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step's randomness, in diffusers' train_text_to_image.py order: the noise
    (B, C, h, w); if `noise_offset`, a per-channel offset noise (B, C, 1, 1) times noise_offset
    added to it (Guttenberg 2023, "Diffusion with Offset Noise"); then timesteps (B,) int64
    uniform in [0, 1000). All drawn on the CPU from `generator`, returned on latents' device."""
    noise = randn(latents.shape, generator)
    if noise_offset:
        noise = noise + noise_offset * randn((*latents.shape[:2], 1, 1), generator)
    timesteps = torch.randint(0, samplers.NUM_TRAIN_TIMESTEPS, (latents.shape[0],), generator=generator)
    return noise.to(latents.device), timesteps.to(latents.device)


def diffusion_loss(
    unet: nn.Module,
    latents: torch.Tensor,
    context: torch.Tensor,
    generator: torch.Generator,
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
) -> torch.Tensor:
    """The SD v1.x training loss of one batch (scalar, differentiable).

    latents: (B, 4, h, w) scaled latents (`encode_latents`); context: (B, 77, context_dim) text
    encoder states. Noise and timesteps come from `generator` (`draw_noise_and_timesteps`); the
    U-Net predicts the noise of x_t (`add_noise`) and the loss is `eps_loss`: MSE, min-SNR-gamma
    weighted when `snr_gamma` is given (5 is the paper's choice). Noising and the loss run in
    float32, or float64 for float64 latents; the U-Net casts x_t to its own dtype.
    """
    noise, timesteps = draw_noise_and_timesteps(latents, generator, noise_offset)
    latents = _wide(latents)
    noise = noise.to(latents.dtype)
    abar = samplers.alphas_cumprod()
    noisy = add_noise(latents, noise, timesteps, abar)
    return eps_loss(unet(noisy, timesteps, context), noise, timesteps, snr_gamma, abar)


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over each sample's latent elements: (B,) float32."""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)


def vae_loss(
    vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator, kl_weight: float = 1e-6
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The autoencoder's loss on images (B, 3, H, W) in [-1, 1]: (loss, {"rec": ..., "kl": ...}).

    The decoder reconstructs a sample of the posterior (noise from `generator`). rec is the mean
    absolute error per pixel value; kl is `kl_divergence` per image (batch mean). The loss is
    rec + kl_weight * kl / (3 H W): LDM's L1 + KL objective (kl_weight 1e-6, summed over an
    image's pixels) divided by the number of pixel values, so its scale does not grow with the
    resolution. LDM also trains with LPIPS and a patch GAN; LPIPS needs pretrained VGG weights,
    which are not used here, so reconstructions come out blurrier than SD's own VAE.
    """
    mean, logvar = vae.encode(images)
    z = mean + torch.exp(0.5 * logvar) * randn(mean.shape, generator, mean.device).to(mean.dtype)
    rec = (vae.decode(z).float() - images.float()).abs().mean()
    kl = kl_divergence(mean, logvar).mean()
    loss = rec + kl_weight * kl / images[0].numel()
    return loss, {"rec": rec.detach(), "kl": kl.detach()}


@torch.no_grad()
def calibrate_latent_scale_(
    vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator, latent_scale: float = LATENT_SCALE
) -> float:
    """Rescales a trained VAE's latent space in place so that its latents times `latent_scale`
    have unit standard deviation over `images` (B, 3, H, W) in [-1, 1]; returns the factor k.

    LDM's scale_by_std (ldm/models/diffusion/ddpm.py, LatentDiffusion) measures 1/std of the
    first batch's posterior samples and keeps it as the model's scale factor, so that the
    diffusion schedule sees unit-variance latents. An SD v1.x checkpoint has no place for that
    factor (loaders fix it at 0.18215), so it is folded into the weights instead: quant_conv's
    mean outputs grow by k, its log-variance outputs by 2 ln k, and post_quant_conv's weights
    shrink by k. decode(encode(x)) is unchanged; latents grow k-fold.
    """
    mean, logvar = vae.encode(images)
    z = mean + torch.exp(0.5 * logvar) * randn(mean.shape, generator, mean.device).to(mean.dtype)
    k = 1.0 / (latent_scale * float(z.float().std()))
    c = mean.shape[1]
    vae.quant_conv.weight[:c] *= k
    vae.quant_conv.bias[:c] *= k
    vae.quant_conv.bias[c:] += 2.0 * math.log(k)
    vae.post_quant_conv.weight /= k
    return k


# ----------------------------------------------------------------------------- conditioning


@torch.no_grad()
def sample_latents(
    mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator, latent_scale: float = LATENT_SCALE
) -> torch.Tensor:
    """A sample of the VAE posterior (mean, logvar: (B, 4, h, w)) times latent_scale, float32,
    as SD v1.x trains (noise from `generator`)."""
    return (mean + torch.exp(0.5 * logvar) * randn(mean.shape, generator, mean.device)).float() * latent_scale


@torch.no_grad()
def encode_latents(
    vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator, latent_scale: float = LATENT_SCALE
) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> `sample_latents` of their posterior (B, 4, H/8, W/8)
    float32. No gradients."""
    return sample_latents(*vae.encode(images), generator, latent_scale)


class PosteriorCache:
    """A frozen VAE's posterior (mean, logvar) of each training image, by key (e.g. its row),
    kept on the CPU after the image's first encoding, so that later epochs sample its latents
    without running the encoder: for a small model at 64x64 the encoder costs more than the
    U-Net's training step. Memory: 2 x 4 x (H/8) x (W/8) values an image (2 KB at 64x64 in
    float32, 128 KB at 512x512). Valid only while the VAE stays frozen and an image's pixels
    are the same every epoch (no random crops or flips)."""

    def __init__(self):
        self.moments: dict = {}

    @torch.no_grad()
    def encode(self, vae: AutoencoderKL, images: torch.Tensor, keys: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) (B, 4, H/8, W/8) of images (B, 3, H, W), encoding only keys not seen yet."""
        missing = [i for i, k in enumerate(keys) if k not in self.moments]
        if missing:
            mean, logvar = vae.encode(images[missing])
            for j, i in enumerate(missing):
                self.moments[keys[i]] = torch.cat([mean[j], logvar[j]]).cpu()
        return torch.stack([self.moments[k] for k in keys]).to(images.device).chunk(2, dim=1)


def drop_captions(captions: Sequence[str], p: float, generator: torch.Generator) -> list[str]:
    """Replace each caption by "" with probability p (one uniform draw per caption, always made,
    so the generator advances the same whatever p is). SD v1.5 was fine-tuned with p = 0.1,
    which is what lets classifier-free guidance use "" as the unconditional prompt."""
    if not 0 <= p <= 1:
        raise ValueError(f"caption dropout must be in [0, 1], got {p!r}")
    keep = torch.rand(len(captions), generator=generator) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def tokenize_captions(
    tokenizer: Tokenizer, captions: Sequence[str], generator: torch.Generator, dropout: float = 0.1
) -> torch.Tensor:
    """Captions -> token ids (B, 77) int64 after `drop_captions`; feed them to the text encoder."""
    return tokenizer(drop_captions(captions, dropout, generator))


# ----------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of parameters, kept in float32 beside the model.

    shadow <- shadow + (1 - d) (param - shadow) after each optimiser step. With `warmup` (the
    default), the decay of the n-th update is min(decay, (1 + n) / (10 + n)), as LDM's LitEma
    (ldm/modules/ema.py) does, so early averages do not hang on to the random start; without
    it, d = decay from the first update.

    params: a module (its parameters that require gradients, by name) or an iterable of
    parameters (matched by position). `update` and `copy_to` take the same kind of thing: for a
    DDP-wrapped model pass `ddp.module`.
    """

    def __init__(self, params: nn.Module | Iterable[torch.Tensor], decay: float = 0.9999, warmup: bool = True):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay!r}")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.names, tensors = self._named(params)
        self.shadow = [t.detach().to(torch.float32, copy=True) for t in tensors]

    @staticmethod
    def _named(params: nn.Module | Iterable[torch.Tensor]) -> tuple[list[str], list[torch.Tensor]]:
        if isinstance(params, nn.Module):
            named = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
        else:
            named = [(str(i), p) for i, p in enumerate(params)]
        return [n for n, _ in named], [p for _, p in named]

    def _match(self, params: nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
        names, tensors = self._named(params)
        if names != self.names:
            missing, unexpected = sorted(set(self.names) - set(names)), sorted(set(names) - set(self.names))
            raise ValueError(f"EMA parameters do not match: missing {missing[:10]}, unexpected {unexpected[:10]}")
        return tensors

    def current_decay(self) -> float:
        """The decay the last update used (that the next one uses, before any update)."""
        n = max(self.num_updates, 1)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, params: nn.Module | Iterable[torch.Tensor]) -> None:
        tensors = self._match(params)
        self.num_updates += 1
        weight = 1 - self.current_decay()
        torch._foreach_lerp_(self.shadow, [t.detach().to(torch.float32) for t in tensors], weight)

    @torch.no_grad()
    def copy_to(self, params: nn.Module | Iterable[torch.Tensor]) -> None:
        """Write the averages into the parameters (cast to each parameter's dtype)."""
        for target, value in zip(self._match(params), self.shadow):
            target.copy_(value)

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": dict(zip(self.names, self.shadow)),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s output; ValueError if it holds other parameters or shapes."""
        shadow = state["shadow"]
        if list(shadow) != self.names:
            missing, unexpected = sorted(set(self.names) - set(shadow)), sorted(set(shadow) - set(self.names))
            raise ValueError(f"EMA state does not match: missing {missing[:10]}, unexpected {unexpected[:10]}")
        wrong = [n for n, s in zip(self.names, self.shadow) if shadow[n].shape != s.shape]
        if wrong:
            raise ValueError(f"EMA state has other shapes for {wrong[:10]}")
        self.decay, self.warmup, self.num_updates = state["decay"], state["warmup"], int(state["num_updates"])
        self.shadow = [shadow[n].detach().to(torch.float32, copy=True) for n in self.names]
