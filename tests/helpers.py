"""Tiny open_clip checkpoints and switches, made on the fly (no downloads)."""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from switchbank.backbone import register_configs
from switchbank.build import build_switch
from switchbank.checkpoints import is_buffer_name
from switchbank.format import to_bytes
from switchbank.types import Head

ARCH = "switchbank-tiny-vit"
ROOT_DEMO_BANK = Path(__file__).resolve().parents[1] / "demo" / "bank"


def pretrained_model_state() -> dict[str, torch.Tensor]:
    """The whole tiny open_clip model (image and text towers), seeded like load_backbone does."""
    register_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(ARCH, pretrained=None)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def finetune(tower: dict[str, torch.Tensor], seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """A synthetic fine-tune: heavy-tailed (Laplace) task vectors on every parameter."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in tower.items():
        if is_buffer_name(k, v):
            out[k] = v.clone()
            continue
        u = torch.rand(v.shape, generator=g).clamp(1e-7, 1 - 1e-7) - 0.5  # log1p(-1) would be infinite
        lap = -torch.sign(u) * torch.log1p(-2 * u.abs()) * scale
        out[k] = v + lap.to(v.dtype)
    return out


def visual(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}


def make_switch(tower, name, seed, alpha=0.6, classes=3, dim=32, queries=None, router_fp=None, center=None):
    fin = finetune(tower, seed)
    g = torch.Generator().manual_seed(1000 + seed)
    head = Head(torch.randn(classes, dim, generator=g), torch.randn(classes, generator=g),
                [f"{name}-c{i}" for i in range(classes)])
    if queries is None and center is not None:
        queries = center + 0.01 * torch.randn(8, dim, generator=g)
    return build_switch(tower, fin, name, alpha, head=head, queries=queries, router_fingerprint=router_fp)


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def switch_bytes(sw) -> bytes:
    return to_bytes(sw)


TASKS = ["red", "green", "blue"]


def colour_png(task: str, seed: int, size: int = 32) -> bytes:
    """A PNG whose pixels centre on the task's colour: one distinct image distribution per task."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 90, size=(size, size, 3))
    arr[..., TASKS.index(task) if task in TASKS else 0] += 160
    buf = io.BytesIO()
    Image.fromarray(arr.astype("uint8"), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def task_switch_bytes(backbone, tower, task: str, seed: int, alpha: float = 0.6) -> bytes:
    """A switch whose query examples are the router embeddings of that task's colour images."""
    import io

    import torch
    from PIL import Image

    x = torch.stack([backbone.preprocess(Image.open(io.BytesIO(colour_png(task, 1000 * seed + i))).convert("RGB"))
                     for i in range(8)])
    q = backbone.forward(x)
    return to_bytes(make_switch(tower, task, seed=seed, alpha=alpha, dim=backbone.embed_dim, queries=q,
                                router_fp=backbone.fingerprint))


def make_bank(path: Path, backbone, tower, tasks=TASKS) -> Path:
    from switchbank.bank import Bank

    bank = Bank(path, create=True)
    for i, t in enumerate(tasks):
        bank.add(task_switch_bytes(backbone, tower, t, seed=10 + i))
    return path
