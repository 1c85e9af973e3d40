"""The inputs of `switchbank build`, made from the bundled backbone in about a minute, so that the
walkthrough in docs/building.md runs as written.

    python -m demo.example_checkpoints OUT

writes into OUT:
- pretrained.safetensors: the bundled ImageNet EfficientNet-Lite0 image tower;
- finetuned.safetensors: that tower fine-tuned for 30 steps on scikit-learn's 8x8 digits, with a
  linear head fitted on the pretrained features and frozen, and BatchNorm statistics frozen;
- head.safetensors (`weight`, `bias`) and classes.txt: that head and its ten class names;
- query-images/: 100 example digit images (PNG) for Auto-Switch;
- test-digit.png: a held-out digit to ask a server about.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from demo.common import embed, finetune, fit_head, to_tensor
from switchbank.backbone import DEMO_ARCH, load_backbone


def digits() -> tuple[list[Image.Image], np.ndarray]:
    from sklearn.datasets import load_digits
    d = load_digits()
    images = [Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((32, 32)).convert("RGB") for img in d.images]
    return images, d.target


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args(argv)
    out = args.out
    (out / "query-images").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    backbone = load_backbone(DEMO_ARCH, device="cpu")
    images, labels = digits()
    train, held_out = slice(0, 1500), slice(1500, None)
    x = to_tensor(backbone, images[train])
    weight, bias = fit_head(embed(backbone, x), labels[train], 10)
    tuned = finetune(backbone, x, labels[train], weight, bias, steps=args.steps)
    tower = {k: v.detach().contiguous() for k, v in backbone.model.state_dict().items()}
    save_file(tower, str(out / "pretrained.safetensors"))
    save_file({**tower, **{k: v.detach().contiguous() for k, v in tuned.items()}}, str(out / "finetuned.safetensors"))
    save_file({"weight": weight.contiguous(), "bias": bias.contiguous()}, str(out / "head.safetensors"))
    (out / "classes.txt").write_text("\n".join(str(i) for i in range(10)) + "\n")
    for i, im in enumerate(images[train][:100]):
        im.save(out / "query-images" / f"{i:03d}.png")
    images[held_out][0].save(out / "test-digit.png")
    print(f"wrote the example checkpoints to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
