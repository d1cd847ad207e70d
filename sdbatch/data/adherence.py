"""Reads back from a picture what the shapes dataset's attributes say, with plain image analysis.

`read_attributes` finds, on the image scaled to 64x64: the background (the nearest dataset
colour of most border pixels), the shape colour (the nearest dataset colour of most other
pixels), the shape (the biggest 4-connected region covered more than half by the shape colour),
its kind (the best-matching of the three shapes drawn by the dataset's own renderer into the
region's bounding box, by soft IoU), its size (bounding-box side over image side, split halfway
between small 0.40 and large 0.70) and its position (the bounding box's centre). `check` compares
that with what a prompt asks for.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict

import numpy as np
from PIL import Image

from .shapes import COLORS, SHAPES, SIDE, SIZES, parse_prompt, shape_mask

ATTRIBUTES = ("shape", "color", "background", "size", "position")
_NAMES = list(COLORS)
_PALETTE = np.asarray(list(COLORS.values()), dtype=np.float32)  # (6, 3)
BORDER = 2  # pixels of each edge read as background
SIZE_SPLIT = (SIZES["small"] + SIZES["large"]) / 2  # 0.55
CENTER_RADIUS = SIDE / 8  # a box centre within this many pixels of the image centre (per axis) is "center"


def to_side(image: np.ndarray, side: int = SIDE) -> np.ndarray:
    """uint8 (H, W, 3), any size -> float32 (side, side, 3) in 0..255 (area-averaged when smaller)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 array (H, W, 3), got {getattr(image, 'dtype', type(image))} "
                         f"of shape {getattr(image, 'shape', None)}")
    if image.shape[:2] != (side, side):
        image = np.asarray(Image.fromarray(image).resize((side, side), resample=Image.Resampling.BOX))
    return image.astype(np.float32)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected True region of a bool (H, W) mask (all False if none)."""
    h, w = mask.shape
    label = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if label[y0, x0]:
            continue
        current += 1
        label[y0, x0] = current
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not label[ny, nx]:
                    label[ny, nx] = current
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return label == best if best else np.zeros_like(mask)


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-6))


def read_attributes(image: np.ndarray) -> dict:
    """What the picture shows, as the dataset names it.

    image: uint8 (H, W, 3) of any size. Returns {"shape", "color", "background", "size",
    "position"} (each None when there is no shape to read) plus the measurements behind them:
    "box" (x0, y0, x1, y1) in 64x64 pixels, "extent" (box side / 64), "ious" {shape: soft IoU}.
    Raises ValueError for anything but a uint8 (H, W, 3) array.
    """
    pixels = to_side(image)
    labels = np.argmin(((pixels[:, :, None, :] - _PALETTE) ** 2).sum(-1), axis=-1)  # (64, 64)
    border = np.ones(labels.shape, dtype=bool)
    border[BORDER:-BORDER, BORDER:-BORDER] = False
    bg = int(np.bincount(labels[border], minlength=len(_NAMES)).argmax())
    out = dict.fromkeys(ATTRIBUTES, None) | {"background": _NAMES[bg], "box": None, "extent": None, "ious": None}
    others = labels[labels != bg]
    if others.size == 0:
        return out
    fg = int(np.bincount(others, minlength=len(_NAMES)).argmax())
    out["color"] = _NAMES[fg]
    # coverage: where each pixel lies on the segment background -> shape colour
    d = _PALETTE[fg] - _PALETTE[bg]
    alpha = np.clip(((pixels - _PALETTE[bg]) @ d) / (d @ d), 0.0, 1.0)
    region = _largest_component(alpha > 0.5)
    if not region.any():
        return out
    ys, xs = np.nonzero(region)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    near = np.zeros_like(region)  # the region's box, one pixel wider: the coverage we compare
    near[max(box[1] - 1, 0):box[3] + 1, max(box[0] - 1, 0):box[2] + 1] = True
    seen = np.where(near, alpha, 0.0)
    ious = {s: _soft_iou(seen, shape_mask(s, box)) for s in SHAPES}
    extent = max(box[2] - box[0], box[3] - box[1]) / SIDE
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    if max(abs(cx - SIDE / 2), abs(cy - SIDE / 2)) < CENTER_RADIUS:
        position = "center"
    else:
        position = f"{'top' if cy < SIDE / 2 else 'bottom'} {'left' if cx < SIDE / 2 else 'right'}"
    return out | {
        "shape": max(ious, key=ious.get),
        "size": "small" if extent < SIZE_SPLIT else "large",
        "position": position,
        "box": box,
        "extent": extent,
        "ious": ious,
    }


def check(image: np.ndarray, prompt: str) -> dict:
    """Whether `image` shows every attribute that `prompt` names.

    Returns {"prompt": attributes the prompt names (None where it names none), "read":
    `read_attributes(image)`, "correct": {attribute: bool} for the attributes the prompt names,
    "all_correct": bool}. Raises ValueError for a prompt outside the grammar (`parse_prompt`)
    or an image that is not uint8 (H, W, 3).
    """
    asked = asdict(parse_prompt(prompt))
    read = read_attributes(image)
    correct = {k: read[k] == v for k, v in asked.items() if v is not None}
    return {"prompt": asked, "read": read, "correct": correct, "all_correct": all(correct.values())}


def summarize(results: list[dict]) -> dict:
    """Shares of `check` results that are right: {"n", "all_correct", "per_attribute": {attribute:
    {"n": prompts naming it, "correct": share right among them}}}. Shares are in [0, 1] (None
    when n is 0)."""
    def share(k: int, n: int) -> float | None:
        return k / n if n else None

    per = {}
    for a in ATTRIBUTES:
        named = [r["correct"][a] for r in results if a in r["correct"]]
        per[a] = {"n": len(named), "correct": share(sum(named), len(named))}
    return {"n": len(results), "all_correct": share(sum(r["all_correct"] for r in results), len(results)),
            "per_attribute": per}
