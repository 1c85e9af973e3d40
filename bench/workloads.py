"""The two benchmark workloads.

A: open_clip ViT-B-32 (random weights are fine for speed) with 8 switches built through the real
   build path from synthetic fine-tunes (heavy-tailed task vectors), alpha 0.6. Each switch's query
   examples are router embeddings of its own image distribution, so Auto-Switch routes a batch of
   one task's images to that task.
B: the bundled demo backbone (EfficientNet-Lite0) and demo bank, real test images of one task per
   batch, cosine routing as the demo serves it. Real images do not all route to the same mix, so an
   Auto-Switch batch can need more than one merged pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from switchbank.backbone import DEMO_ARCH, Backbone, load_backbone
from switchbank.bank import Bank
from switchbank.build import build_switch
from switchbank.checkpoints import is_buffer_name
from switchbank.engine import Engine
from switchbank.types import Head, Switch

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Workload:
    name: str
    backbone: Backbone
    switches: dict[str, Switch]
    images: dict[str, torch.Tensor]  # per task: a pool of preprocessed inputs from its distribution

    router_metric: str = "l2"

    def engine(self, cache_bytes: int = 8 << 30, k: int = 10, **options) -> Engine:
        eng = Engine(self.backbone, k=k, cache_bytes=cache_bytes, router_metric=self.router_metric, **options)
        for sw in self.switches.values():
            eng.add(sw)
        return eng


def task_images(backbone: Backbone, task_index: int, n: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose statistics differ per task: a per-task colour cast plus noise."""
    h, w = backbone.probe().shape[-2:]
    g = torch.Generator().manual_seed(1000 * task_index + seed)
    cast = torch.randn(3, 1, 1, generator=g)
    return cast + 0.5 * torch.randn(n, 3, h, w, generator=g)


def synthetic_finetune(tower: dict[str, torch.Tensor], seed: int, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in tower.items():
        if is_buffer_name(k, v):
            out[k] = v
            continue
        u = torch.rand(v.shape, generator=g).clamp(1e-7, 1 - 1e-7) - 0.5  # log1p(-1) would be infinite
        out[k] = v + (-torch.sign(u) * torch.log1p(-2 * u.abs()) * scale).to(v.dtype)  # Laplace
    return out


def workload_a(n_switches: int = 8, alpha: float = 0.6, device: str = "auto", dtype: str = "float32") -> Workload:
    backbone = load_backbone("ViT-B-32", device=device, dtype=dtype)
    tower = {k: v.detach().to("cpu", torch.float32) for k, v in backbone.model.state_dict().items()}
    switches, images = {}, {}
    for i in range(n_switches):
        name = f"task{i}"
        images[name] = task_images(backbone, i, 64)
        q = backbone.forward(task_images(backbone, i, 100, seed=1)).cpu()
        g = torch.Generator().manual_seed(i)
        head = Head(torch.randn(10, backbone.embed_dim, generator=g), None, [f"{name}-{c}" for c in range(10)])
        switches[name] = build_switch(tower, synthetic_finetune(tower, seed=i), name, alpha, head=head,
                                      queries=q, router_fingerprint=backbone.fingerprint, arch="ViT-B-32")
    return Workload("A: ViT-B-32, 8 synthetic switches", backbone, switches, images)


def workload_b(device: str = "auto", dtype: str = "float32") -> Workload:
    from demo.tasks import load
    backbone = load_backbone(DEMO_ARCH, device=device, dtype=dtype)
    _, switches = Bank(ROOT / "demo" / "bank").load_all()
    images = {}
    for name in switches:
        task = load(name)
        images[name] = torch.stack([backbone.preprocess(im) for im in task.test[:64]])
    # cosine routing, as scripts/serve-demo.sh serves the demo bank
    return Workload("B: demo EfficientNet-Lite0 and bank", backbone, switches, images, router_metric="cosine")


WORKLOADS = {"A": workload_a, "B": workload_b}
