"""Contact sheets: many small images in one PNG, each with a caption and an optional coloured frame
(what the README shows of the demo, and what `benchmarks/bench_adherence.py` writes)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
FRAME = 3  # pixels of frame around each image
PAD = 6  # pixels between cells
RIGHT, WRONG = (0, 160, 0), (200, 0, 0)  # frames of images the adherence checker finds right / wrong


def wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, lines: int) -> list[str]:
    """`text` broken at spaces into at most `lines` lines no wider than `width` pixels (a word
    wider than that stands alone); an ellipsis ends the last line when text is left over."""
    out: list[str] = []
    for word in text.split():
        if out and draw.textlength(f"{out[-1]} {word}", font=font) <= width:
            out[-1] = f"{out[-1]} {word}"
        else:
            out.append(word)
    if len(out) > lines:
        out = out[:lines]
        out[-1] += " ..."
    return out


def contact_sheet(
    images: Sequence[np.ndarray | Image.Image],
    captions: Sequence[str] | None = None,
    frames: Sequence[tuple[int, int, int] | None] | None = None,
    columns: int = 8,
    scale: int = 2,
    title: str | None = None,
    caption_lines: int = 3,
    font_size: int = 11,
) -> Image.Image:
    """The images in a grid, row by row: an RGB PIL image.

    images: uint8 (H, W, 3) arrays (or one (N, H, W, 3) array) or PIL images, all of one size, each enlarged `scale`-fold by
    nearest neighbour (a 64x64 image keeps its pixels visible). frames: an RGB colour per image
    (None: no frame) drawn FRAME pixels wide around it. captions: text under each image, wrapped to
    its width in at most `caption_lines` lines. title: lines of text above the grid.
    Pillow's default font (a FreeType font where Pillow has FreeType) at `font_size` pixels.
    Raises ValueError for no images, images of different sizes, or lists of other lengths.
    """
    if len(images) == 0:
        raise ValueError("a contact sheet needs at least one image")
    pictures = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im)) for im in images]
    if len({p.size for p in pictures}) > 1:
        raise ValueError(f"the images differ in size: {sorted({p.size for p in pictures})}")
    for name, values in (("captions", captions), ("frames", frames)):
        if values is not None and len(values) != len(pictures):
            raise ValueError(f"{len(values)} {name} for {len(pictures)} images")
    font = ImageFont.load_default(size=font_size)
    w, h = pictures[0].width * scale, pictures[0].height * scale
    line = font_size + 3
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    texts = [wrap(measure, c, font, w + 2 * FRAME, caption_lines) for c in captions] if captions else None
    text_h = line * max(map(len, texts)) if texts else 0
    cell_w, cell_h = w + 2 * FRAME + PAD, h + 2 * FRAME + text_h + PAD
    columns = max(1, min(columns, len(pictures)))
    rows = -(-len(pictures) // columns)
    title_lines = title.splitlines() if title else []
    top = PAD + line * len(title_lines) + (PAD if title_lines else 0)
    sheet = Image.new("RGB", (PAD + columns * cell_w, top + rows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for k, text in enumerate(title_lines):
        draw.text((PAD, PAD + k * line), text, fill=INK, font=font)
    for i, picture in enumerate(pictures):
        x, y = PAD + i % columns * cell_w, top + i // columns * cell_h
        if frames is not None and frames[i] is not None:
            draw.rectangle((x, y, x + w + 2 * FRAME - 1, y + h + 2 * FRAME - 1), fill=frames[i])
        sheet.paste(picture.convert("RGB").resize((w, h), Image.Resampling.NEAREST), (x + FRAME, y + FRAME))
        for k, text in enumerate(texts[i] if texts else ()):
            draw.text((x, y + h + 2 * FRAME + 1 + k * line), text, fill=INK, font=font)
    return sheet
