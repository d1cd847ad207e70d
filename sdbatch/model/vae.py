"""The KL autoencoder (VAE) of Stable Diffusion v1.x.

Module names mirror the checkpoint keys below `first_stage_model.`: `encoder.down.i`,
`decoder.up.i` (indexed by resolution level, highest resolution first, so the decoder runs
them in reverse), `mid.block_1/attn_1/block_2`, `quant_conv`, `post_quant_conv`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import layers
from .layers import normalization

EPS = 1e-6


@dataclass
class VAEConfig:
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    in_channels: int = 3
    out_channels: int = 3


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = normalization(in_channels, EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalization(out_channels, EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels; q/k/v/proj_out are 1x1 convs in the checkpoint."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = normalization(channels, EPS)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        seq = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (F.linear(seq, conv.weight.flatten(1), conv.bias) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        out = F.linear(out, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


def _fold(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3 kernel taps along `dim` -> 2 taps per output phase of a nearest 2x upsample.

    Output pixel 2i reads upsampled pixels 2i-1, 2i, 2i+1 = input i-1, i, i (taps 0 | 1+2 over
    inputs i-1, i); output 2i+1 reads 2i, 2i+1, 2i+2 = input i, i, i+1 (taps 0+1 | 2 over i, i+1).
    """
    t0, t1, t2 = w.unbind(dim)
    return torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)


class Upsample(layers.Upsample):
    """Nearest 2x upsampling then a 3x3 conv, computed as one 2x2 conv per output phase on the
    low-resolution input: the same result with 4/9 of the multiply-adds (the decoder's
    upsampling convs are about a quarter of its work)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        weight = self.conv.weight.float()  # fold in float32, then round once
        padded = F.pad(x, (1, 1, 1, 1))
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        out = torch.empty((b, weight.shape[0], 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=fmt)
        phases = out.unflatten(3, (w, 2)).unflatten(2, (h, 2))  # (B, C, H, 2, W, 2) view
        for dy, rows in enumerate(_fold(weight, 2)):
            for dx, kernel in enumerate(_fold(rows, 3)):
                window = padded[:, :, dy : dy + h + 1, dx : dx + w + 1]
                phases[:, :, :, dy, :, dx] = F.conv2d(window, kernel.to(x.dtype), self.conv.bias)
        return out


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel on the right and bottom only."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: resnet blocks (`block`) and an optional resampler."""

    def __init__(self, in_channels: int, out_channels: int, n_blocks: int, resample: str | None):
        super().__init__()
        channels = [in_channels] + [out_channels] * n_blocks
        self.block = nn.ModuleList(ResnetBlock(channels[i], channels[i + 1]) for i in range(n_blocks))
        if resample == "down":
            self.downsample = Downsample(out_channels)
        elif resample == "up":
            self.upsample = Upsample(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.block_out_channels
        n = len(ch)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, "down" if i < n - 1 else None)
            for i in range(n)
        )
        self.mid = Mid(ch[-1])
        self.norm_out = normalization(ch[-1], EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x)), inplace=True))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.mid = Mid(ch[-1])
        self.up = nn.ModuleList(
            Level(ch[min(i + 1, len(ch) - 1)], ch[i], cfg.layers_per_block + 1, "up" if i > 0 else None)
            for i in range(len(ch))
        )
        self.norm_out = normalization(ch[0], EPS)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True))


class AutoencoderKL(nn.Module):
    """`encode` images in [-1, 1] to the unscaled latent distribution; `decode` unscaled latents.

    The decoder may be kept in a wider dtype than the rest (float16 overflows in it): both
    methods cast their input to the dtype of the part they run and return the input's dtype.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def _input(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # channels-last lets oneDNN/cuDNN run the convs without reordering around each one
        fmt = torch.channels_last if like.device.type in ("cpu", "cuda") else torch.contiguous_format
        return x.to(like.device, like.dtype, memory_format=fmt)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moments = self.quant_conv(self.encoder(self._input(images, self.quant_conv.weight)))
        mean, logvar = moments.to(images.dtype).contiguous().chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.decoder(self.post_quant_conv(self._input(latents, self.post_quant_conv.weight)))
        return images.to(latents.dtype).contiguous()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mean (a convenience for checks)."""
        return self.decode(self.encode(images)[0])


def infer_vae_config(sd: dict[str, torch.Tensor]) -> VAEConfig:
    """Hyper-parameters from LDM-layout tensor shapes."""
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
    blocks = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
    return VAEConfig(
        block_out_channels=tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)),
        layers_per_block=blocks,
        latent_channels=sd["post_quant_conv.weight"].shape[0],
        in_channels=sd["encoder.conv_in.weight"].shape[1],
        out_channels=sd["decoder.conv_out.weight"].shape[0],
    )


def vae_config_from_diffusers(cfg: dict) -> VAEConfig:
    """VAEConfig from a diffusers folder's vae/config.json."""
    return VAEConfig(
        block_out_channels=tuple(cfg["block_out_channels"]),
        layers_per_block=cfg["layers_per_block"],
        latent_channels=cfg["latent_channels"],
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
    )


# diffusers names (and the older query/key/value/proj_attn ones some folders still carry) -> LDM
_LEAF_RENAMES = {
    "conv_shortcut": "nin_shortcut",
    "group_norm": "norm",
    **dict.fromkeys(("to_q", "query"), "q"),
    **dict.fromkeys(("to_k", "key"), "k"),
    **dict.fromkeys(("to_v", "value"), "v"),
    **dict.fromkeys(("to_out.0", "proj_attn"), "proj_out"),
}


def _rename_vae_key(key: str, levels: int) -> str:
    parts = key.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return key
    side, rest = parts[0], parts[1:]
    if rest[0] == "down_blocks":  # encoder.down_blocks.i.{resnets.j|downsamplers.0}
        i, kind = rest[1], rest[2]
        sub = ["block", rest[3]] if kind == "resnets" else ["downsample"]
        rest = ["down", i] + sub + rest[4:]
    elif rest[0] == "up_blocks":  # decoder.up_blocks.i -> up.{levels-1-i}
        i, kind = str(levels - 1 - int(rest[1])), rest[2]
        sub = ["block", rest[3]] if kind == "resnets" else ["upsample"]
        rest = ["up", i] + sub + rest[4:]
    elif rest[0] == "mid_block":  # mid_block.resnets.{0,1} / mid_block.attentions.0
        if rest[1] == "resnets":
            rest = ["mid", f"block_{int(rest[2]) + 1}"] + rest[3:]
        else:
            rest = ["mid", "attn_1"] + rest[3:]
    elif rest[0] == "conv_norm_out":
        rest = ["norm_out"] + rest[1:]
    name = ".".join(rest)
    for old, new in _LEAF_RENAMES.items():
        name = name.replace(f".{old}.", f".{new}.")
    return f"{side}.{name}"


def vae_state_dict_from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> LDM keys; mid attention linears become 1x1 convs."""
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down_blocks."))
    out = {}
    for key, value in sd.items():
        new = _rename_vae_key(key, levels)
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out
