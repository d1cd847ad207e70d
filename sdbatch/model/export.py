"""Trained models out to other tools: one single-file checkpoint in the original LDM layout
(what sdbatch, diffusers' from_single_file and A1111 read) with safetensors metadata, and the
diffusers config folder that lets diffusers load a checkpoint of any size offline."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from . import samplers
from .tokenizer import VOCAB_DIR
from .weights import PREFIXES, ModelConfig, StableDiffusion, _sha256_files, ldm_state_dict, save_checkpoint


def export_checkpoint(
    model: StableDiffusion,
    path_or_uri: str | os.PathLike,
    metadata: dict[str, str],
    storage_options: dict | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    """Write the model as one .safetensors file in the original LDM layout; returns its sha256.

    The file is what SD v1.x single-file tools read: `sdbatch.load_model`, diffusers'
    `StableDiffusionPipeline.from_single_file` (given the model's config folder), A1111.
    metadata (str -> str, e.g. base model hash, steps, data) goes into the safetensors header,
    with "format": "pt" unless given. dtype: cast floating tensors (e.g. torch.float16 for a
    half-size file); default keeps the model's. path_or_uri: a local path or any fsspec URI
    (storage_options go to fsspec); the file appears there whole or not at all (written under a
    temporary name, then renamed; or written locally, then uploaded: object stores show an
    object once its upload completes). Raises ValueError for a name not ending in
    .safetensors, TypeError for non-string metadata.
    """
    target = str(path_or_uri)
    if not target.endswith(".safetensors"):
        raise ValueError(f"{target}: the exported checkpoint must be a .safetensors file")

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    parts = {name: {k: cast(v) for k, v in getattr(model, name).state_dict().items()} for name in PREFIXES}
    sd = ldm_state_dict(parts)
    header = {"format": "pt", **metadata}
    fs, path = fsspec.core.url_to_fs(target, **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        local = Path(path)
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f".{local.stem}.{os.getpid()}.partial.safetensors")
        try:
            save_checkpoint(sd, partial, header)
            os.replace(partial, local)
        finally:
            partial.unlink(missing_ok=True)
        return _sha256_files((local,))
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / Path(path).name
        save_checkpoint(sd, local, header)
        digest = _sha256_files((local,))
        fs.put_file(str(local), path)
    return digest


# SD v1.5's scheduler/scheduler_config.json (the scheduler diffusers' pipelines start with)
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": samplers.BETA_END,
    "beta_schedule": "scaled_linear",
    "beta_start": samplers.BETA_START,
    "clip_sample": False,
    "num_train_timesteps": samplers.NUM_TRAIN_TIMESTEPS,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": samplers.STEPS_OFFSET,
    "trained_betas": None,
}


def diffusers_configs(config: ModelConfig) -> dict[str, dict]:
    """The diffusers/transformers config.json of each component of a model of this config,
    {"unet": ..., "vae": ..., "text_encoder": ..., "scheduler": ...}, as SD v1.5's folder spells
    them (the inverse of `unet_config_from_diffusers` and its siblings)."""
    unet, vae, clip = config.unet, config.vae, config.text_encoder
    levels = range(len(unet.channel_mult))
    down = ["CrossAttnDownBlock2D" if i in unet.attention_levels else "DownBlock2D" for i in levels]
    return {
        "unet": {
            "_class_name": "UNet2DConditionModel",
            "act_fn": "silu",
            "attention_head_dim": unet.num_heads,  # SD v1.x configs put the head count here
            "block_out_channels": [unet.model_channels * m for m in unet.channel_mult],
            "center_input_sample": False,
            "cross_attention_dim": unet.context_dim,
            "down_block_types": down,
            "downsample_padding": 1,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "in_channels": unet.in_channels,
            "layers_per_block": unet.num_res_blocks,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-5,
            "norm_num_groups": 32,
            "out_channels": unet.out_channels,
            "sample_size": 64,
            "transformer_layers_per_block": unet.transformer_depth,
            "up_block_types": [t.replace("Down", "Up") for t in reversed(down)],
        },
        "vae": {
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "block_out_channels": list(vae.block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * len(vae.block_out_channels),
            "in_channels": vae.in_channels,
            "latent_channels": vae.latent_channels,
            "layers_per_block": vae.layers_per_block,
            "norm_num_groups": 32,
            "out_channels": vae.out_channels,
            "sample_size": 512,
            "scaling_factor": config.latent_scale,
            "up_block_types": ["UpDecoderBlock2D"] * len(vae.block_out_channels),
        },
        "text_encoder": {
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "hidden_act": "quick_gelu",
            "hidden_size": clip.width,
            "intermediate_size": clip.mlp_width,
            "layer_norm_eps": clip.eps,
            "max_position_embeddings": clip.max_positions,
            "num_attention_heads": clip.heads,
            "num_hidden_layers": clip.layers,
            "vocab_size": clip.vocab_size,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
            "torch_dtype": "float32",
        },
        "scheduler": SD15_SCHEDULER_CONFIG,
    }


def write_diffusers_config(config: ModelConfig, folder: str | os.PathLike) -> Path:
    """Write the config files of a diffusers StableDiffusionPipeline folder for this config (no
    weights): model_index.json, each component's config, the CLIP tokenizer. Pass the folder as
    `config=` to diffusers' `StableDiffusionPipeline.from_single_file(checkpoint, config=folder)`
    to load an exported checkpoint of a size the Hugging Face Hub has no config for, offline.
    Returns the folder."""
    folder = Path(folder)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", SD15_SCHEDULER_CONFIG["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    files = {"model_index.json": index}
    for name, cfg in diffusers_configs(config).items():
        files[f"{name}/{'scheduler_config' if name == 'scheduler' else 'config'}.json"] = cfg
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    files["tokenizer/special_tokens_map.json"] = special
    files["tokenizer/tokenizer_config.json"] = dict(special, do_lower_case=True, model_max_length=77,
                                                    tokenizer_class="CLIPTokenizer")
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(content, indent=2) + "\n")
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(VOCAB_DIR / name, folder / "tokenizer" / name)
    return folder
