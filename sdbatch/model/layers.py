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
    """Nearest-neighbour upsampling (2x, or to `size`) then a 3x3 conv (named `conv`, as in both LDM checkpoints)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))



class _Packed(nn.Module):
    """A layer whose weight is kept in oneDNN's blocked layout; state_dict() gives it back dense."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if bias is None else bias.detach())

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        weight = self.weight
        destination[prefix + "weight"] = weight.to_dense() if weight.is_mkldnn else weight.contiguous()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias


class PackedConv2d(_Packed):
    """CPU inference Conv2d with its weight reordered once, not on every call as nn.Conv2d
    does (which costs as much as the convolution itself at the U-Net's low resolutions).
    The layout oneDNN picks depends on the input shape: the first call's input decides.
    Takes channels-last input."""

    def __init__(self, conv: nn.Conv2d):
        self.args = ([*conv.padding], [*conv.stride], [*conv.dilation], conv.groups)
        super().__init__(conv.weight.detach().contiguous(memory_format=torch.channels_last), conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.weight.is_mkldnn:
            self.weight = torch.ops.mkldnn._reorder_convolution_weight(self.weight, *self.args, list(x.shape))
        return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, *self.args, "none", [], "")


class PackedLinear(_Packed):
    """CPU inference Linear with its weight reordered once."""

    def __init__(self, linear: nn.Linear):
        super().__init__(torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1024), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def pack_for_cpu(module: nn.Module) -> nn.Module:
    """Replace every Conv2d and Linear in `module` (in place) by its packed CPU inference form.

    For float32/bfloat16 models on CPU, once the weights are loaded. The module then runs on
    CPU only and cannot be trained, moved or cast; state_dict() still gives the plain weights.
    """
    if not torch.backends.mkldnn.is_available():
        return module
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            setattr(module, name, PackedConv2d(child))
        elif isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child))
        else:
            pack_for_cpu(child)
    return module
