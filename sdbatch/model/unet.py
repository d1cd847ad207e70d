"""The Stable Diffusion v1.x denoising U-Net.

Module names mirror the original LDM checkpoint below `model.diffusion_model.`, so
`UNetModel(config).state_dict()` has exactly the keys of an SD v1.x single-file checkpoint.
"""

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import PackedConv2d, Upsample, attention, normalization

NUM_HEADS = 8  # SD v1.x: 8 heads at every width (head size = channels / 8)


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels (0 = full resolution) with a SpatialTransformer
    context_dim: int = 768
    num_heads: int = NUM_HEADS
    transformer_depth: int = 1

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)
        self.attention_levels = tuple(self.attention_levels)
        if not set(self.attention_levels) <= set(range(len(self.channel_mult))):
            raise ValueError(f"attention_levels {self.attention_levels} outside the {len(self.channel_mult)} levels")


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) in float32, cos half first (LDM's layout)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / half * torch.arange(half, dtype=torch.float32, device=timesteps.device))
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        # in-place SiLU and adds on fresh tensors: fewer passes over memory, same results
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(inplace=True), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(inplace=True),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h += self.emb_layers(emb)[:, :, None, None]
        return self.out_layers(h).add_(self.skip_connection(x))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(x)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, depth: int, context_dim: int):
        super().__init__()
        self.norm = normalization(channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)]
        )
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            t = block(t, context)
        return self.proj_out(t.transpose(1, 2).reshape(b, c, h, w)).add_(x)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class TimestepEmbedSequential(nn.Sequential):
    """A U-Net stage: hands the time embedding to ResBlocks and the context to transformers."""

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, upsample_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        mc, emb_dim = cfg.model_channels, cfg.model_channels * 4
        last = len(cfg.channel_mult) - 1

        def stage(ch_in: int, ch_out: int, level: int) -> list[nn.Module]:
            layers: list[nn.Module] = [ResBlock(ch_in, emb_dim, ch_out)]
            if level in cfg.attention_levels:
                layers.append(SpatialTransformer(ch_out, cfg.num_heads, cfg.transformer_depth, cfg.context_dim))
            return layers

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels, ch = [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.input_blocks.append(TimestepEmbedSequential(*stage(ch, mc * mult, level)))
                ch = mc * mult
                skip_channels.append(ch)
            if level != last:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch),
            SpatialTransformer(ch, cfg.num_heads, cfg.transformer_depth, cfg.context_dim),
            ResBlock(ch, emb_dim, ch),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = stage(ch + skip_channels.pop(), mc * mult, level)
                ch = mc * mult
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(inplace=True), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor) -> torch.Tensor:
        """Predict the noise: x (B, C, h, w), timesteps (B,) or scalar, context (B, L, context_dim)."""
        dtype = self.out[2].weight.dtype
        t = torch.as_tensor(timesteps, device=x.device)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(dtype))
        context = context.to(dtype)

        layout = torch.channels_last if _wants_channels_last(self.input_blocks[0][0]) else torch.contiguous_format
        h = x.to(dtype).contiguous(memory_format=layout)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            # odd latent sizes (e.g. 520 px -> 65) round down when downsampled: upsample to the skip's size
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h).to(x.dtype, memory_format=torch.contiguous_format)


def _wants_channels_last(conv: nn.Module) -> bool:
    """Packed convs (oneDNN on CPU) and channels-last weights run fastest on channels-last activations."""
    if isinstance(conv, PackedConv2d):
        return conv.runs_packed()
    return conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()


def _ldm_key_error(what: str) -> ValueError:
    return ValueError(f"not an SD v1.x U-Net state dict (LDM layout): {what}")


def infer_unet_config(state_dict: dict[str, torch.Tensor]) -> UNetConfig:
    """Hyper-parameters from the tensor shapes of an LDM-layout U-Net state dict (prefix removed).

    Raises KeyError(key) for a key it needs that is missing, ValueError for other layouts.
    """
    sd = state_dict
    for key in ("input_blocks.0.0.weight", "out.2.weight", "middle_block.1.proj_in.weight"):
        if key not in sd:
            raise KeyError(key)
    if sd["middle_block.1.proj_in.weight"].ndim != 4:
        raise _ldm_key_error("proj_in is a linear layer (an SD 2.x checkpoint?); only SD v1.x's 1x1 conv is supported")

    model_channels, in_channels = sd["input_blocks.0.0.weight"].shape[:2]
    # Structure comes from any key of a block (a downsample's weight or bias, any key of an
    # attention layer), never from one chosen key: a checkpoint missing one key then still gets
    # the right structure, and the loader's error names the missing key.
    n_input = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
    downsamples = sorted({int(k.split(".")[1]) for k in sd if re.match(r"input_blocks\.\d+\.0\.op\.", k)})
    # input blocks: conv_in, then per level num_res_blocks stages and (but the last) a downsample
    num_res_blocks = downsamples[0] - 1 if downsamples else n_input - 1
    levels = len(downsamples) + 1
    if n_input != 1 + levels * num_res_blocks + levels - 1:
        raise _ldm_key_error(f"{n_input} input blocks do not fit {levels} levels of {num_res_blocks} res blocks")

    channel_mult, attention_levels = [], []
    for level in range(levels):
        first = 1 + level * (num_res_blocks + 1)
        out_ch = sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0]
        if out_ch % model_channels:
            raise _ldm_key_error(f"level {level} width {out_ch} is not a multiple of {model_channels}")
        channel_mult.append(out_ch // model_channels)
        if any(k.startswith(f"input_blocks.{first}.1.") for k in sd):
            attention_levels.append(level)

    depth = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("middle_block.1.transformer_blocks."))
    return UNetConfig(
        in_channels=in_channels,
        out_channels=sd["out.2.weight"].shape[0],
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=num_res_blocks,
        attention_levels=tuple(attention_levels),
        context_dim=sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        num_heads=NUM_HEADS,
        transformer_depth=depth,
    )


# diffusers options whose non-default values would describe a model other than SD v1.x
_DIFFUSERS_SD1_FIXED = {
    "norm_num_groups": 32,
    "use_linear_projection": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "upcast_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "time_embedding_type": "positional",
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "resnet_time_scale_shift": "default",
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "encoder_hid_dim": None,
    "center_input_sample": False,
}


def unet_config_from_diffusers(cfg: dict) -> UNetConfig:
    """UNetConfig from a diffusers `unet/config.json` (UNet2DConditionModel) of an SD v1.x model."""
    unsupported = {k: cfg[k] for k, v in _DIFFUSERS_SD1_FIXED.items() if k in cfg and cfg[k] != v}
    if unsupported:
        raise ValueError(f"U-Net config is not SD v1.x: unsupported settings {unsupported}")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    allowed = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}
    if set(down + up) - allowed:
        raise ValueError(f"U-Net config has unsupported block types {sorted(set(down + up) - allowed)}")
    attention_levels = tuple(i for i, t in enumerate(down) if t == "CrossAttnDownBlock2D")
    if [t.startswith("CrossAttn") for t in reversed(up)] != [i in attention_levels for i in range(len(down))]:
        raise ValueError(f"U-Net config: up blocks {up} do not mirror down blocks {down}")

    def single(name: str, value):  # per-block lists must be uniform in SD v1.x
        values = set(value) if isinstance(value, (list, tuple)) else {value}
        if len(values) != 1:
            raise ValueError(f"U-Net config: {name}={value} differs per block; SD v1.x uses one value")
        return values.pop()

    widths = list(cfg["block_out_channels"])
    mc = widths[0]
    if any(w % mc for w in widths):
        raise ValueError(f"U-Net config: block_out_channels {widths} are not multiples of {mc}")
    # diffusers' SD1 configs put the head count in attention_head_dim (num_attention_heads unset)
    heads = single("num_attention_heads", cfg.get("num_attention_heads") or cfg.get("attention_head_dim", NUM_HEADS))
    return UNetConfig(
        in_channels=cfg.get("in_channels", 4),
        out_channels=cfg.get("out_channels", 4),
        model_channels=mc,
        channel_mult=tuple(w // mc for w in widths),
        num_res_blocks=single("layers_per_block", cfg.get("layers_per_block", 2)),
        attention_levels=attention_levels,
        context_dim=single("cross_attention_dim", cfg.get("cross_attention_dim", 768)),
        num_heads=heads,
        transformer_depth=single("transformer_layers_per_block", cfg.get("transformer_layers_per_block", 1)),
    )


_RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP_RENAMES = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def unet_state_dict_from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet2DConditionModel state dict to LDM keys (below `model.diffusion_model.`)."""
    down_resnets = [int(m[1]) for k in sd if (m := re.match(r"down_blocks\.\d+\.resnets\.(\d+)\.", k))]
    if not down_resnets:
        raise ValueError("not a diffusers U-Net state dict: no down_blocks.*.resnets.* keys")
    n = max(down_resnets) + 1  # res blocks per down block; up blocks have n + 1
    up_with_attention = {int(m[1]) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}

    def inner(kind: str, rest: str) -> str:
        if kind == "attentions":  # transformer parameter names are the same in both layouts
            return rest
        name, _, param = rest.rpartition(".")
        if name not in _RESNET_RENAMES:
            raise ValueError(f"unexpected resnet parameter in diffusers U-Net state dict: {rest!r}")
        return f"{_RESNET_RENAMES[name]}.{param}"

    def rename(key: str) -> str:
        for old, new in _TOP_RENAMES.items():
            if key.startswith(old + "."):
                return new + key[len(old) :]
        if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            i, kind, j = int(m[2]), m[3], int(m[4])
            block = f"input_blocks.{(n + 1) * i + j + 1}" if m[1] == "down" else f"output_blocks.{(n + 1) * i + j}"
            return f"{block}.{0 if kind == 'resnets' else 1}.{inner(kind, m[5])}"
        if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
            kind, j = m[1], int(m[2])
            return f"middle_block.{2 * j if kind == 'resnets' else 1}.{inner(kind, m[3])}"
        if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            return f"input_blocks.{(n + 1) * (int(m[1]) + 1)}.0.op.{m[2]}"
        if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            i = int(m[1])
            return f"output_blocks.{(n + 1) * i + n}.{2 if i in up_with_attention else 1}.conv.{m[2]}"
        raise ValueError(f"unexpected key in diffusers U-Net state dict: {key!r}")

    return {rename(k): v for k, v in sd.items()}
