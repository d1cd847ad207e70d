"""sdbatch: Stable Diffusion v1.x from scratch, and prompt tables to image datasets on Ray."""

__version__ = "0.1.0"
