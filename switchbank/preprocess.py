"""open_clip's image preprocessing, with its last two steps (to a float tensor, normalise) in numpy.

Why: torch runs those two steps on an OpenMP team of the calling thread. A server decodes images on
several threads, and once more than one thread owns a team (more OpenMP threads than cores), GNU
OpenMP stops letting the engine's idle worker spin between operations and puts it to sleep instead:
every small operation of a forward then pays for waking it. Measured on the demo tower, batches of
one request: 7-8 ms for a named task and 14-18 ms with Auto-Switch while the engine's thread owned
the only team, 10-13 and 20-27 ms once a second thread had one. numpy's arithmetic takes no team.
The result is the same, bit for bit (tested against the torch steps).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class Preprocess:
    """PIL image -> [3, H, W] float32 tensor, as ``compose`` (open_clip's transforms) makes it."""

    def __init__(self, compose: Any):
        self.compose = compose
        steps = list(getattr(compose, "transforms", []))
        self.head, self.mean, self.std = None, None, None
        if len(steps) >= 2 and _to_tensor(steps[-2]) and type(steps[-1]).__name__ == "Normalize" \
                and not getattr(steps[-1], "inplace", False):
            mean, std = (np.asarray(v, dtype=np.float32) for v in (steps[-1].mean, steps[-1].std))
            if mean.shape == std.shape == (3,):
                self.head, self.mean, self.std = steps[:-2], mean.reshape(3, 1, 1), std.reshape(3, 1, 1)

    def __call__(self, im) -> torch.Tensor:
        if self.head is None:
            return self.compose(im)
        for step in self.head:
            im = step(im)
        if getattr(im, "mode", None) != "RGB":  # only 8-bit RGB takes the numpy path
            return self.compose.transforms[-1](self.compose.transforms[-2](im))
        x = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32, order="C")
        x /= np.float32(255)
        x -= self.mean
        x /= self.std
        return torch.from_numpy(x)

    def __repr__(self) -> str:
        return f"Preprocess({self.compose!r})"


def _to_tensor(step) -> bool:
    # torchvision's ToTensor, or open_clip's wrapper that applies it to PIL images only
    return type(step).__name__ in ("ToTensor", "MaybeToTensor")
