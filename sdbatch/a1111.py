"""What AUTOMATIC1111 writes and reads: its sampler names and the `parameters` text of its PNGs,
which SD tools (and `sd-parsers`) read back."""

from __future__ import annotations

import io
from typing import Any

# Our sampler names -> the names AUTOMATIC1111 writes in "Sampler: ..." (what SD tools read).
A1111_SAMPLER_NAMES = {
    "ddpm": "DDPM",
    "ddim": "DDIM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
}


def _number(x: float) -> str:
    return f"{x:g}"


def a1111_parameters(row: dict[str, Any], model_hash: str) -> str:
    """The `parameters` text AUTOMATIC1111 writes into its PNGs (and SD tools parse)."""
    fields = [
        f"Steps: {row['steps']}",
        f"Sampler: {A1111_SAMPLER_NAMES.get(row['sampler'], row['sampler'])}",
        f"CFG scale: {_number(row['cfg_scale'])}",
        f"Seed: {row['seed']}",
        f"Size: {row['width']}x{row['height']}",
        f"Model hash: {model_hash[:10]}",
    ]
    if row.get("init_image"):
        fields.append(f"Denoising strength: {_number(row['strength'])}")
    negative = f"Negative prompt: {row['negative_prompt']}\n" if row.get("negative_prompt") else ""  # A1111 omits an empty one
    return f"{row['prompt']}\n{negative}{', '.join(fields)}"


def encode_png(image, parameters: str) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes carrying a `parameters` tEXt chunk (deterministic)."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()
