"""Stable Diffusion v1.x written from scratch in PyTorch: CLIP text encoder, VAE, U-Net, loading."""

from .weights import CheckpointError, ModelConfig, StableDiffusion, load_model, save_random_checkpoint

__all__ = ["CheckpointError", "ModelConfig", "StableDiffusion", "load_model", "save_random_checkpoint"]
