"""Layers shared by the U-Net, the VAE and the text encoder."""

import torch
import torch.nn.functional as F
from torch import nn


def normalization(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """SD v1.x normalises with 32-group GroupNorm everywhere (eps differs per block)."""
    return nn.GroupNorm(32, channels, eps=eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False) -> torch.Tensor:
    """Multi-head scaled dot-product attention over (B, L, C) tensors."""
    b, lq, c = q.shape
    q, k, v = (t.reshape(b, t.shape[1], heads, c // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(b, lq, c)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 conv (named `conv`, as in both LDM checkpoints)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
