"""Stable Diffusion's safety checker (CompVis/stable-diffusion-safety-checker), from scratch.

A CLIP ViT-L/14 image tower and a projection embed each image; its cosine similarity with 17
concept embeddings and 3 "special care" embeddings, minus a threshold per embedding, gives a
score per concept, and an image with any concept score above 0 is flagged. The scores are
rounded to 3 decimals, and every special-care concept that scores above 0 raises the later
scores by 0.01, exactly as diffusers' `StableDiffusionSafetyChecker.forward` does (the
pipeline then blacks the image out; we do not write it at all).

Module names mirror the weight keys transformers 5 saves (`vision_model.*`); the published
weights' `vision_model.vision_model.*` are renamed on loading. Images are prepared as the
model's `preprocessor_config.json` says (transformers' CLIPImageProcessor with its PIL
backend: shortest side resized with Pillow, centre crop, rescale, normalise), without
transformers.
"""

from __future__ import annotations

import io
import json
import posixpath
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from sdbatch import storage

from .clip import CLIPConfig, Encoder
from .layers import pack_for_cpu
from .weights import CheckpointError, _listing, _pick_weights, load_component_, read_weights

# transformers' CLIPVisionConfig / CLIPConfig defaults, for config.json files that leave them out
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=32, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu")
PROJECTION_DIM = 512
# OpenAI CLIP's normalisation and transformers' CLIPImageProcessor defaults
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPECIAL_CARE_ADJUSTMENT = 0.01  # diffusers: added to later scores once a special-care concept scores > 0
WEIGHT_STEMS = ("model", "pytorch_model")
# Keys the published weights carry that hold nothing the model needs (position ids are arange).
IGNORED_KEYS = ("vision_model.embeddings.position_ids",)
OLD_PREFIX, NEW_PREFIX = "vision_model.vision_model.", "vision_model."


@dataclass
class SafetyConfig:
    vision: CLIPConfig  # max_positions: patches + 1; vocab_size unused
    image_size: int = 224
    patch_size: int = 14
    projection_dim: int = 768
    concepts: int = 17
    special_concepts: int = 3


class VisionEmbeddings(nn.Module):
    """(B, 3, S, S) pixels -> (B, 1 + (S/patch)^2, width): a class token, then one token per patch."""

    def __init__(self, cfg: SafetyConfig):
        super().__init__()
        width, patches = cfg.vision.width, (cfg.image_size // cfg.patch_size) ** 2
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.patch_embedding = nn.Conv2d(3, width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(patches + 1, width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class VisionTransformer(nn.Module):
    """CLIP's image tower: (B, 3, S, S) -> the class token's final state after post_layernorm (B, width)."""

    def __init__(self, cfg: SafetyConfig):
        super().__init__()
        width = cfg.vision.width
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(width, eps=cfg.vision.eps)  # sic: CLIP's name
        self.encoder = Encoder(cfg.vision)
        self.post_layernorm = nn.LayerNorm(width, eps=cfg.vision.eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
        return self.post_layernorm(x[:, 0])


@dataclass
class SafetyResult:
    """Per image: `nsfw` (B,) bool; `concept_scores` (B, concepts) and `special_scores`
    (B, special concepts) float32, rounded to 3 decimals (> 0 means the concept was found)."""

    nsfw: np.ndarray
    concept_scores: np.ndarray
    special_scores: np.ndarray


def safety_scores(cos: np.ndarray, special_cos: np.ndarray, thresholds: np.ndarray,
                  special_thresholds: np.ndarray) -> SafetyResult:
    """Flags and scores from cosine similarities, as diffusers' StableDiffusionSafetyChecker.forward.

    cos (B, C) and special_cos (B, S): float32 similarities with the concept and special-care
    embeddings; thresholds (C,), special_thresholds (S,): float32. Special-care concepts are
    scored in order; once one scores above 0, SPECIAL_CARE_ADJUSTMENT is added to the scores
    of the special-care concepts after it and of every concept. All arithmetic is float32, and
    each score is rounded to 3 decimals before it is compared with 0, as there.
    """
    cos, special_cos = np.asarray(cos, np.float32), np.asarray(special_cos, np.float32)
    thresholds, special_thresholds = np.asarray(thresholds, np.float32), np.asarray(special_thresholds, np.float32)
    adjustment = np.zeros(cos.shape[0], np.float32)
    special = np.empty_like(special_cos)
    for j in range(special_cos.shape[1]):
        special[:, j] = np.round(special_cos[:, j] - special_thresholds[j] + adjustment, 3)
        adjustment = np.where(special[:, j] > 0, np.float32(SPECIAL_CARE_ADJUSTMENT), adjustment)
    scores = np.round(cos - thresholds + adjustment[:, None], 3)
    return SafetyResult(nsfw=(scores > 0).any(axis=1), concept_scores=scores, special_scores=special)


@dataclass
class Preprocess:
    """uint8 RGB images -> the (B, 3, crop_h, crop_w) float32 tensor CLIP takes.

    As transformers' CLIPImageProcessor (PIL backend): resize with Pillow so the shortest side
    is `shortest_edge` (the long side becomes int(shortest_edge * long / short)), or to
    exactly `size` (h, w); centre crop (top = (h - crop_h) // 2); multiply by
    `rescale_factor` in float64 then cast to float32; normalise (x - mean) / std per channel.
    """

    shortest_edge: int | None = 224
    size: tuple[int, int] | None = None
    crop: tuple[int, int] | None = (224, 224)
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float | None = 1 / 255
    mean: tuple[float, ...] | None = CLIP_MEAN
    std: tuple[float, ...] | None = CLIP_STD

    @classmethod
    def from_config(cls, cfg: dict, source: str) -> Preprocess:
        """From a preprocessor_config.json dict (old CLIPFeatureExtractor ints or newer dicts).

        Raises CheckpointError naming `source` for sizes it cannot read.
        """
        def pair(value, what: str) -> tuple[int, int]:
            if isinstance(value, int):
                return value, value
            if isinstance(value, dict) and {"height", "width"} <= value.keys():
                return int(value["height"]), int(value["width"])
            raise CheckpointError(f"{source}: cannot read {what} {value!r} (expected an int or height/width)")

        shortest, size = None, None
        if cfg.get("do_resize", True):
            value = cfg.get("size", 224)
            if isinstance(value, int):
                shortest = value
            elif isinstance(value, dict) and "shortest_edge" in value:
                shortest = int(value["shortest_edge"])
            else:
                size = pair(value, "size")
        crop = pair(cfg.get("crop_size", 224), "crop_size") if cfg.get("do_center_crop", True) else None
        return cls(
            shortest_edge=shortest, size=size, crop=crop,
            resample=int(cfg.get("resample", Image.Resampling.BICUBIC)),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else None,
            mean=tuple(cfg.get("image_mean", CLIP_MEAN)) if cfg.get("do_normalize", True) else None,
            std=tuple(cfg.get("image_std", CLIP_STD)) if cfg.get("do_normalize", True) else None,
        )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) of the tensor for a height x width image."""
        if self.crop is not None:
            return self.crop
        if self.size is not None:
            return self.size
        if self.shortest_edge is not None:
            return self._resized(height, width)
        return height, width

    def _resized(self, height: int, width: int) -> tuple[int, int]:
        if self.size is not None:
            return self.size
        short, long = min(height, width), max(height, width)
        new_long = int(self.shortest_edge * long / short)
        return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)

    def one(self, image: np.ndarray | Image.Image) -> np.ndarray:
        """One image (uint8 (H, W, 3) array or PIL image) -> float32 (3, h, w)."""
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        pil = pil.convert("RGB")
        if self.size is not None or self.shortest_edge is not None:
            h, w = self._resized(pil.height, pil.width)
            pil = pil.resize((w, h), resample=self.resample)
        x = np.asarray(pil)
        if self.crop is not None:
            (h, w), (ch, cw) = x.shape[:2], self.crop
            top, left = (h - ch) // 2, (w - cw) // 2
            if top < 0 or left < 0:
                raise ValueError(f"image of {h}x{w} after resizing is smaller than the {ch}x{cw} crop")
            x = x[top:top + ch, left:left + cw]
        x = (x.astype(np.float64) * self.rescale_factor if self.rescale_factor is not None else x).astype(np.float32)
        if self.mean is not None:
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def __call__(self, images) -> torch.Tensor:
        """A list of images (uint8 (H, W, 3) arrays or PIL images) or a uint8 (B, H, W, 3) array -> (B, 3, h, w) float32."""
        return torch.from_numpy(np.stack([self.one(im) for im in images]))


class SafetyChecker(nn.Module):
    """Stable Diffusion's safety checker: images -> SafetyResult (see `safety_scores`).

    `check(images)` prepares uint8 images with `preprocess` and runs `forward`.
    """

    def __init__(self, config: SafetyConfig, preprocess: Preprocess | None = None):
        super().__init__()
        self.config = config
        self.preprocess = preprocess or Preprocess()
        self.vision_model = VisionTransformer(config)
        self.visual_projection = nn.Linear(config.vision.width, config.projection_dim, bias=False)
        self.register_buffer("concept_embeds", torch.ones(config.concepts, config.projection_dim))
        self.register_buffer("special_care_embeds", torch.ones(config.special_concepts, config.projection_dim))
        self.register_buffer("concept_embeds_weights", torch.ones(config.concepts))
        self.register_buffer("special_care_embeds_weights", torch.ones(config.special_concepts))

    @property
    def device(self) -> torch.device:
        return self.concept_embeds.device

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> SafetyResult:
        """pixels: (B, 3, image_size, image_size), normalised as `preprocess` makes them."""
        size = self.config.image_size
        if pixels.shape[1:] != (3, size, size):
            raise ValueError(f"the safety checker takes (B, 3, {size}, {size}) pixels, got {tuple(pixels.shape)}")
        dtype = self.concept_embeds.dtype
        embeds = self.visual_projection(self.vision_model(pixels.to(self.device, dtype)))
        embeds = nn.functional.normalize(embeds)

        def cosine(concepts: torch.Tensor) -> np.ndarray:
            return (embeds @ nn.functional.normalize(concepts).T).cpu().float().numpy()

        return safety_scores(cosine(self.concept_embeds), cosine(self.special_care_embeds),
                             self.concept_embeds_weights.cpu().float().numpy(),
                             self.special_care_embeds_weights.cpu().float().numpy())

    def check(self, images) -> SafetyResult:
        """A list of uint8 (H, W, 3) images (any size) or PIL images -> SafetyResult."""
        return self(self.preprocess(images))


# ---------------------------------------------------------------------------------------------
# loading


def config_from_json(cfg: dict, source: str) -> SafetyConfig:
    """SafetyConfig from a safety_checker/config.json (transformers' CLIPConfig, with its
    `vision_config`; missing fields take transformers' defaults). Raises CheckpointError."""
    vision = {**VISION_DEFAULTS, **(cfg.get("vision_config") or cfg.get("vision_config_dict") or {})}
    if vision["hidden_act"] != "quick_gelu":
        raise CheckpointError(f"{source}: vision_config.hidden_act is {vision['hidden_act']!r}; "
                              f"the safety checker's CLIP uses quick_gelu")
    if vision["num_channels"] != 3:
        raise CheckpointError(f"{source}: vision_config.num_channels is {vision['num_channels']}, not 3")
    width, heads = vision["hidden_size"], vision["num_attention_heads"]
    if width % heads:
        raise CheckpointError(f"{source}: hidden_size {width} is not a multiple of num_attention_heads {heads}")
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    return SafetyConfig(
        vision=CLIPConfig(vocab_size=0, max_positions=patches + 1, width=width, layers=vision["num_hidden_layers"],
                          heads=heads, mlp_width=vision["intermediate_size"], eps=vision["layer_norm_eps"],
                          causal=False),
        image_size=vision["image_size"], patch_size=vision["patch_size"],
        projection_dim=cfg.get("projection_dim", PROJECTION_DIM),
    )


def rename_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Both saved layouts -> ours: `vision_model.vision_model.*` (the published weights,
    transformers 4) becomes `vision_model.*` (transformers 5); position ids are dropped."""
    out = {}
    for key, value in sd.items():
        if key.startswith(OLD_PREFIX):
            key = NEW_PREFIX + key[len(OLD_PREFIX):]
        if key not in IGNORED_KEYS:
            out[key] = value
    return out


def _read_json(fs, path: str, uri: str, what: str) -> dict:
    try:
        return json.loads(storage.read_bytes(fs, path))
    except FileNotFoundError:
        raise CheckpointError(f"{uri}: no such file (the {what})") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{uri}: cannot read the {what}: {e}") from None


def _read_remote_weights(fs, path: str, uri: str) -> dict[str, torch.Tensor]:
    data = storage.read_bytes(fs, path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load

            return load(data)
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{uri}: refused to load: the file holds Python objects other than tensors "
                              f"(nothing was executed): {str(e).splitlines()[0]}") from None
    except Exception as e:  # safetensors and torch raise their own types for corrupt files
        raise CheckpointError(f"{uri}: unreadable weights file (truncated or corrupt?): {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{uri}: not a state dict (the file holds a {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def find_safety_checker(source: str) -> tuple[object, str, str | None]:
    """(filesystem, safety_checker folder, preprocessor_config.json or None) for `source`: a
    diffusers model folder (its safety_checker/ and feature_extractor/) or a safety checker
    folder itself (its preprocessor config beside config.json, or in ../feature_extractor/).
    Raises CheckpointError naming what it looked for."""
    fs, root = storage.url_to_fs(source)
    if storage.exists(fs, storage.join(root, "safety_checker", "config.json")):
        folder, candidates = storage.join(root, "safety_checker"), [storage.join(root, "feature_extractor")]
    elif storage.exists(fs, storage.join(root, "config.json")):
        folder = root
        candidates = [root, storage.join(posixpath.dirname(root), "feature_extractor")]
    else:
        raise CheckpointError(f"{source}: not a safety checker: neither safety_checker/config.json "
                              f"(a diffusers model folder) nor config.json (a safety_checker folder) is there")
    for candidate in candidates:
        path = storage.join(candidate, "preprocessor_config.json")
        if storage.exists(fs, path):
            return fs, folder, path
    return fs, folder, None


def load_safety_checker(source: str, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> SafetyChecker:
    """Load the safety checker from a diffusers model folder or a safety_checker/ folder.

    source: local path or fsspec URI (see `find_safety_checker`). Weights: model.safetensors
    or pytorch_model.bin (read with torch.load(weights_only=True)), in either key layout.
    The preprocessing comes from preprocessor_config.json. On CPU the layers are packed for
    oneDNN (`layers.pack_for_cpu`). Raises CheckpointError naming the file or key at fault.
    """
    device = torch.device(device)
    fs, folder, preprocessor = find_safety_checker(source)
    uri = storage.to_uri(fs, folder)
    if preprocessor is None:
        raise CheckpointError(f"{uri}: no preprocessor_config.json beside config.json or in ../feature_extractor/ "
                              f"(the image preprocessing the safety checker expects)")
    config = config_from_json(_read_json(fs, storage.join(folder, "config.json"), uri + "/config.json",
                                         "safety checker config"), uri + "/config.json")
    pre_uri = storage.to_uri(fs, preprocessor)
    preprocess = Preprocess.from_config(_read_json(fs, preprocessor, pre_uri, "preprocessor config"), pre_uri)
    if preprocess.output_size(config.image_size, config.image_size) != (config.image_size, config.image_size):
        raise CheckpointError(f"{pre_uri}: makes {preprocess.output_size(config.image_size, config.image_size)} "
                              f"images, but the safety checker takes {config.image_size}x{config.image_size}")

    names = {posixpath.basename(n) for n in fs.ls(folder, detail=False)}
    name = _pick_weights(names, WEIGHT_STEMS)
    if name is None:
        raise CheckpointError(f"{uri}: no weights file (model.safetensors or pytorch_model.bin)")
    path = storage.join(folder, name)
    weights_uri = storage.to_uri(fs, path)
    sd = read_weights(Path(path)) if weights_uri == path else _read_remote_weights(fs, path, weights_uri)
    sd = rename_keys(sd)
    for key, n in (("concept_embeds", "concepts"), ("special_care_embeds", "special_concepts")):
        if key not in sd or sd[key].ndim != 2:
            raise CheckpointError(f"{weights_uri}: no 2-d {key} (has {_listing(sd, 8)})")
        setattr(config, n, sd[key].shape[0])

    with torch.device("meta"):
        model = SafetyChecker(config, preprocess)
    load_component_(model, "safety_checker", sd, weights_uri, device, dtype)
    if device.type == "cpu":
        pack_for_cpu(model)
    return model.eval().requires_grad_(False)
