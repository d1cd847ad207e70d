"""sdbatch: Stable Diffusion v1.x from scratch, and prompt tables to image datasets on Ray."""

from .model import load_model
from .model.pipeline import generate

__version__ = "0.1.0"

__all__ = ["load_model", "generate"]
