"""Small offline image-classification tasks from packages (see README: demo bank)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def _rgb(arr: np.ndarray) -> Image.Image:
    arr = np.asarray(arr, dtype=np.float64)
    arr = (arr - arr.min()) / max(arr.max() - arr.min(), 1e-9) * 255
    return Image.fromarray(arr.astype(np.uint8)).convert("RGB")


def digits():
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    return [_rgb(im) for im in d.images], d.target.tolist(), [str(i) for i in range(10)]


def textures(per_class: int = 120, size: int = 48, seed: int = 0):
    """Patches of scikit-image's brick, grass and gravel photos (3 classes)."""
    from skimage import data
    rng = np.random.default_rng(seed)
    images, labels, classes = [], [], ["brick", "grass", "gravel"]
    for c, name in enumerate(classes):
        src = getattr(data, name)()
        for _ in range(per_class):
            y, x = rng.integers(0, src.shape[0] - size), rng.integers(0, src.shape[1] - size)
            images.append(_rgb(src[y:y + size, x:x + size]))
            labels.append(c)
    return images, labels, classes


def faces():
    """scikit-image's LFW subset: 100 faces and 100 non-faces, 25x25."""
    from skimage import data
    imgs = data.lfw_subset()
    labels = [1] * 100 + [0] * 100
    return [_rgb(im) for im in imgs], labels, ["not a face", "face"]


TASKS = {"digits": digits, "textures": textures, "faces": faces}


def split(n: int, test_fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed train/test split of range(n)."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(n * test_fraction)
    return np.sort(order[cut:]), np.sort(order[:cut])
