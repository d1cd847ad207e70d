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



PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


class _Packed(nn.Module):
    """A Conv2d/Linear for inference whose weight is reordered into oneDNN's blocked layout on
    its first CPU call (float32/bfloat16), not on every call as nn.Conv2d/nn.Linear do (which
    costs as much as the convolution itself at the U-Net's low resolutions).

    Anywhere else (CUDA, MPS, float16) it runs the plain op. Moving or casting (`.to()`)
    turns the weight dense again first, and state_dict() always gives it dense.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight.detach())
        self.register_buffer("bias", None if bias is None else bias.detach())

    def _dense_weight(self) -> torch.Tensor:
        return self.weight.to_dense() if self.weight.is_mkldnn else self.weight

    def runs_packed(self) -> bool:
        """Whether the weight is (or on the next call will be) in packed form."""
        weight = self.weight
        return weight.is_mkldnn or (
            weight.device.type == "cpu" and weight.dtype in PACKABLE_DTYPES and torch.backends.mkldnn.is_available()
        )

    def _apply(self, fn, recurse: bool = True):
        self.weight = self._dense_weight()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:  # pickle, deepcopy: oneDNN tensors have no storage to copy
        state = self.__dict__.copy()
        state["_buffers"] = {**self._buffers, "weight": self._dense_weight()}
        return state

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self._dense_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        self.weight = self._dense_weight()
        super()._load_from_state_dict(state_dict, prefix, *args)


class PackedConv2d(_Packed):
    """Conv2d (see _Packed). oneDNN picks the packed layout for the first call's input shape;
    other shapes still compute correctly. Packed, it takes channels-last input."""

    def __init__(self, conv: nn.Conv2d):
        self.args = ([*conv.padding], [*conv.stride], [*conv.dilation], conv.groups)
        super().__init__(conv.weight, conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding, stride, dilation, groups = self.args
        if not self.runs_packed():
            return F.conv2d(x, self.weight, self.bias, stride, padding, dilation, groups)
        if not self.weight.is_mkldnn:
            weight = self.weight.contiguous(memory_format=torch.channels_last)
            self.weight = torch.ops.mkldnn._reorder_convolution_weight(weight, *self.args, list(x.shape))
        return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, *self.args, "none", [], "")


class PackedLinear(_Packed):
    """Linear (see _Packed)."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.runs_packed():
            return F.linear(x, self.weight, self.bias)
        if not self.weight.is_mkldnn:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(self.weight, 1024)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def pack_for_cpu(module: nn.Module) -> nn.Module:
    """Replace every Conv2d and Linear in `module` (in place) by its packed form, for fast
    inference on CPU (see _Packed). The module keeps working on any device and dtype, but is
    for inference only: the weights become buffers without gradients."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            setattr(module, name, PackedConv2d(child))
        elif isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child))
        else:
            pack_for_cpu(child)
    return module
