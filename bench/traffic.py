"""Traffic as users send it: shuffled held-out images of every demo task, and the switch mixes that
Auto-Switch gives them.

- ``demo_images``: every held-out test image of the six demo tasks, in one shuffled order.
- ``demo_mixes``: the weights the demo's router (cosine k-NN, as the demo serves) gives each of
  those images, in the same order. About 80% are one switch; the rest spread over about 100
  distinct mixes, most of them seen once.
- ``stream``: batches cut from a list, wrapping around, so a benchmark can run longer than the list.
"""

from __future__ import annotations

import io
import random
from functools import lru_cache

SEED = 0


@lru_cache(maxsize=1)
def demo_images() -> tuple[tuple[str, object], ...]:
    """(task, PIL image) for every held-out test image of every demo task, shuffled."""
    from demo.tasks import LOADERS, load
    pool = [(name, im) for name in LOADERS for im in load(name).test]
    random.Random(SEED).shuffle(pool)
    return tuple(pool)


def demo_pngs() -> list[tuple[str, bytes]]:
    out = []
    for task, im in demo_images():
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append((task, buf.getvalue()))
    return out


def demo_mixes(engine, batch: int = 64) -> list[dict[str, float]]:
    """The Auto-Switch weights ``engine`` (the demo bank, cosine routing) gives each demo image."""
    import torch
    images = [im for _, im in demo_images()]
    out = []
    for i in range(0, len(images), batch):
        x = torch.stack([engine.backbone.preprocess(im) for im in images[i:i + batch]])
        out.extend({k: float(v) for k, v in w.items()} for w in engine.router.weights(engine.embed(x)))
    return out


def mix_summary(mixes: list[dict[str, float]], batch: int = 16) -> dict:
    """How diverse a list of mixes is: share of single-switch rows, distinct mixes, mixes seen
    once, and distinct mixes per batch."""
    from collections import Counter
    keys = [tuple(sorted(m.items())) for m in mixes]
    counts = Counter(keys)
    per_batch = [len(set(keys[i:i + batch])) for i in range(0, len(keys) - batch + 1, batch)]
    return {"requests": len(mixes), "single_switch": sum(len(m) == 1 for m in mixes) / max(1, len(mixes)),
            "distinct": len(counts), "seen_once": sum(c == 1 for c in counts.values()),
            "groups_per_batch": sum(per_batch) / max(1, len(per_batch)), "batch": batch}


def stream(items: list, batch: int, start: int, count: int) -> list[list]:
    """``count`` batches of ``batch`` items, from item ``start`` on, wrapping around."""
    n = len(items)
    return [[items[(start + b * batch + i) % n] for i in range(batch)] for b in range(count)]
