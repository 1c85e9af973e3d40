"""Decoding untrusted image bytes into a preprocessed tensor, with clear errors."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from .errors import BadRequest

ImageFile.LOAD_TRUNCATED_IMAGES = False


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """An RGB PIL image from encoded bytes; 422 for anything that is not a sound, bounded image."""
    if not data:
        raise BadRequest("image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels or w <= 0 or h <= 0:
                raise BadRequest(f"image is {w}x{h} pixels; the limit is {max_pixels} pixels", 413)
            im.seek(0)  # animated images: the first frame
            im.load()
    except BadRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadRequest(f"image declares too many pixels; the limit is {max_pixels}", 413) from None
    except UnidentifiedImageError as exc:
        raise BadRequest(f"not a supported image: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BadRequest(f"image is truncated or corrupt: {exc}") from None
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        im = Image.fromarray(arr.astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")
