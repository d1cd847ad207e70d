"""The one image reader: every image that comes into sdbatch (init images of `generate`, of the
job and of the CLI, training data) is read here, the way an image viewer shows it.

- EXIF orientation is applied (phones store photos sideways with an orientation tag).
- Any colour mode becomes 8-bit RGB: palette and grey images are expanded, 16-bit grey
  (I;16) is scaled (v / 257), 32-bit integer grey (I) is taken as 16-bit, float grey (F) as
  [0, 1]; CMYK goes through its embedded ICC profile when there is one (Pillow's plain
  conversion otherwise).
- Transparency (an alpha channel, or a palette/grey `tRNS` entry) is composited onto white,
  as viewers and browsers show it on a white page.
- Files with several frames (animated GIF/PNG/WebP, multi-page TIFF) give their first frame.
- A file that cannot be decoded completely (truncated, corrupt, not an image, too large)
  raises `ImageReadError` naming the file: never a partly decoded image.
"""

import io
import os
import threading
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps

WHITE = (255, 255, 255)
_TRUNCATION_LOCK = threading.Lock()


class ImageReadError(ValueError):
    """An image file that cannot be read correctly; the message names the file and why."""


def _scaled_grey(im: Image.Image) -> Image.Image:
    """I;16*, I and F (single-channel, more than 8 bits) -> L, scaled rather than clipped."""
    pixels = np.asarray(im if im.mode != "I;16B" else im.convert("I"), dtype=np.float64)
    if im.mode == "F":
        pixels = pixels.clip(0.0, 1.0) * 255.0
    else:
        pixels = pixels.clip(0, 65535) / 257.0
    return Image.fromarray(pixels.round().astype(np.uint8), "L")


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    profile = im.info.get("icc_profile")
    if profile:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            return ImageCms.profileToProfile(im, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # an unusable profile: Pillow's plain conversion, as viewers without colour management
    return im.convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """A loaded PIL image of any mode -> 8-bit RGB as a viewer shows it (see the module docstring).

    Applies EXIF orientation; composites transparency onto white. Returns a new image (or `im`
    itself when it is already upright RGB). Raises ImageReadError for modes Pillow cannot convert.
    """
    im = ImageOps.exif_transpose(im) or im
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        im = _scaled_grey(im)
    if im.mode == "CMYK":
        return _cmyk_to_rgb(im)
    if im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE + (255,)), rgba).convert("RGB")
    if im.mode == "RGB":
        return im
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise ImageReadError(f"image mode {im.mode} cannot be converted to RGB ({e})") from None


def read_image(source: str | os.PathLike | bytes | BinaryIO, name: str | None = None) -> Image.Image:
    """Read an image file (a local path, its bytes or a binary file object) -> 8-bit RGB PIL image.

    The first frame of a multi-frame file; see the module docstring for orientation, modes and
    transparency. `name` (default: the path) is what errors call the file. Raises ImageReadError
    (a ValueError) for a missing, unreadable, truncated or corrupt file, or one Pillow refuses as a
    decompression bomb (more than Image.MAX_IMAGE_PIXELS * 2 pixels).
    """
    if name is None:
        name = str(source) if isinstance(source, (str, os.PathLike)) else "image"
    data = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with Image.open(data) as im:
            im.seek(0)
            # decode everything or fail: a truncated file must not come back padded with grey
            with _TRUNCATION_LOCK:
                lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
                try:
                    im.load()
                finally:
                    ImageFile.LOAD_TRUNCATED_IMAGES = lenient
            return to_rgb(im)
    except ImageReadError as e:
        raise ImageReadError(f"{name}: {e}") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{name}: refused, too many pixels ({e})") from None
    except FileNotFoundError:
        raise ImageReadError(f"{name}: no such file") from None
    except PermissionError:
        raise ImageReadError(f"{name}: permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        reason = str(e) or type(e).__name__
        if "truncated" in reason.lower() or isinstance(e, EOFError):
            reason = f"the file is truncated or corrupt ({reason})"
        raise ImageReadError(f"{name}: cannot read the image: {reason}") from None
