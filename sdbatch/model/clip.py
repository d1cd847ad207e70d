"""CLIP ViT-L/14 text encoder, as Stable Diffusion v1.x uses it.

Module names mirror the checkpoint keys below `cond_stage_model.transformer.`
(the same names transformers' CLIPTextModel uses), so loading is a plain load_state_dict.
"""

from dataclasses import dataclass

import torch
from torch import nn

from .layers import attention

# Keys real checkpoints carry that hold nothing the model needs (position ids are always arange).
IGNORED_KEYS = ("text_model.embeddings.position_ids",)


@dataclass
class CLIPConfig:
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    eps: float = 1e-5
    causal: bool = True  # the text encoder's attention is causal; the vision tower's (safety checker) is not


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens) + self.position_embedding.weight[: tokens.shape[1]]


class SelfAttention(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.heads = cfg.heads
        self.causal = cfg.causal
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=self.causal)
        return self.out_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # QuickGELU


class EncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = SelfAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class TextModel(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.final_layer_norm(self.encoder(self.embeddings(tokens)))


class CLIPTextEncoder(nn.Module):
    """tokens (B, L) -> last hidden state after the final LayerNorm (B, L, width)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.text_model = TextModel(cfg)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_model(tokens.to(self.text_model.embeddings.token_embedding.weight.device))


def infer_clip_config(sd: dict[str, torch.Tensor]) -> CLIPConfig:
    """Hyper-parameters from LDM-layout tensor shapes (SD v1.x convention: head size 64)."""
    vocab_size, width = sd["text_model.embeddings.token_embedding.weight"].shape
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers."))
    return CLIPConfig(
        vocab_size=vocab_size,
        max_positions=sd["text_model.embeddings.position_embedding.weight"].shape[0],
        width=width,
        layers=layers,
        heads=width // 64,
        mlp_width=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
    )


def clip_config_from_diffusers(cfg: dict) -> CLIPConfig:
    """CLIPConfig from a diffusers folder's text_encoder/config.json."""
    if cfg.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise ValueError(f"text encoder uses {cfg['hidden_act']!r}; SD v1.x's CLIP uses quick_gelu")
    return CLIPConfig(
        vocab_size=cfg["vocab_size"],
        max_positions=cfg["max_position_embeddings"],
        width=cfg["hidden_size"],
        layers=cfg["num_hidden_layers"],
        heads=cfg["num_attention_heads"],
        mlp_width=cfg["intermediate_size"],
        eps=cfg.get("layer_norm_eps", 1e-5),
    )


def clip_state_dict_from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModel keys -> LDM keys: the same names below `text_model.`.

    transformers 5 saves them without the `text_model.` prefix (so do some old single-file
    checkpoints); unused buffers (position ids) are dropped.
    """
    out = {}
    for key, value in sd.items():
        key = key if key.startswith("text_model.") else "text_model." + key
        if key not in IGNORED_KEYS:
            out[key] = value
    return out
