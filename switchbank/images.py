"""Reading images from disk and encoding them with the router encoder."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from .backbone import Backbone
from .errors import SwitchBankError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def encode_images(backbone: Backbone, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
    """Router embeddings [n, D] (pretrained encoder, not normalised) of PIL images."""
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([backbone.preprocess(im.convert("RGB")) for im in images[i:i + batch_size]])
        out.append(backbone.forward(x).cpu())
    return torch.cat(out) if out else torch.zeros(0, backbone.embed_dim)


def encode_folder(backbone: Backbone, folder: Path, limit: int) -> torch.Tensor:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise SwitchBankError(f"{folder}: no images found")
    images = []
    for p in files:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    return encode_images(backbone, images)
