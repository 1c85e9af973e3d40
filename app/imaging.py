"""Untrusted image bytes -> the tower's input tensor, with bounded work and memory and clear errors.

What an image may cost is bounded before anything large is allocated:
- the declared width x height (read from the header, before decoding) must be at most
  ``max_pixels``, so decoding allocates at most a few bytes per allowed pixel;
- preprocessing scales the short side to the tower's size and keeps the centre square. A very
  elongated image (a 100000 x 1 strip) would become enormous when scaled, so an image more than
  twice as long as it is wide is first cut to that centre square, which is all the tower ever sees;
- float and 16-bit images are rescaled in float32, in place;
- the app runs at most ``SWITCHBANK_DECODE_CONCURRENCY`` decodes at once.

Images are read as a viewer shows them: the EXIF orientation is applied, transparency is laid on
white, palette and greyscale images become RGB, and animations give their first frame. Float
images with NaN or infinite pixels are refused, since no viewer shows them one way.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import BadRequest

ImageFile.LOAD_TRUNCATED_IMAGES = False
FORMATS = "PNG, JPEG, GIF, BMP, TIFF or WebP"
MAX_ASPECT = 2.0  # longer than this relative to the short side: cut to the centre square first


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """An RGB PIL image from encoded bytes; 413/422 for anything that is not a sound, bounded image."""
    if not data:
        raise BadRequest("image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w <= 0 or h <= 0 or w * h > max_pixels:
                raise BadRequest(f"image is {w}x{h} pixels; the limit is {max_pixels:,} pixels "
                                 "(SWITCHBANK_MAX_IMAGE_PIXELS)", 413)
            im.seek(0)  # animated images: the first frame
            im.load()
            im = ImageOps.exif_transpose(im)
    except BadRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadRequest(f"image declares too many pixels; the limit is {max_pixels:,}", 413) from None
    except UnidentifiedImageError:
        raise BadRequest(f"not an image in a supported format ({FORMATS})") from None
    except (OSError, ValueError, SyntaxError, EOFError, KeyError, IndexError, TypeError, MemoryError):
        raise BadRequest("image is truncated or corrupt") from None
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float32).copy()
        if not np.isfinite(arr).all():
            raise BadRequest("image has NaN or infinite pixels")
        lo, hi = float(arr.min()), float(arr.max())
        if hi > lo:
            arr -= lo
            arr *= 255.0 / (hi - lo)
        else:
            arr[:] = 0
        im = Image.fromarray(arr.astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        out = Image.new("RGB", im.size, (255, 255, 255))
        out.paste(im, mask=im.getchannel("A"))
        return out
    return im.convert("RGB")


def centre_crop_if_elongated(im: Image.Image) -> Image.Image:
    """The centre square of an image whose long side exceeds MAX_ASPECT times its short side: the
    region the tower's resize-then-centre-crop keeps, without scaling the whole strip first."""
    w, h = im.size
    short = min(w, h)
    if max(w, h) <= MAX_ASPECT * short:
        return im
    left, top = (w - short) // 2, (h - short) // 2
    return im.crop((left, top, left + short, top + short))


def prepare(data: bytes, preprocess, max_pixels: int):
    """The tower's input tensor [3, H, W] for encoded image bytes."""
    return preprocess(centre_crop_if_elongated(decode(data, max_pixels)))
