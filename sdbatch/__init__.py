"""sdbatch: Stable Diffusion v1.x from scratch, and prompt tables to image datasets on Ray."""

from typing import Any

__version__ = "0.1.0"

__all__ = ["load_model", "generate"]


def __getattr__(name: str) -> Any:
    # Imported on first use: commands that never run the model (dataset writing, status,
    # reports) then start without importing torch.
    if name == "load_model":
        from .model import load_model

        return load_model
    if name == "generate":
        from .model.pipeline import generate

        return generate
    raise AttributeError(f"module 'sdbatch' has no attribute {name!r}")
