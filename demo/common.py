"""Shared pieces of the demo pipeline and evaluation: tensors, heads, forward passes."""

from __future__ import annotations

from pathlib import Path

import torch

from switchbank.backbone import Backbone

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "work-cache"


def to_tensor(backbone: Backbone, images) -> torch.Tensor:
    return torch.stack([backbone.preprocess(im) for im in images])


def embed(backbone: Backbone, x: torch.Tensor, params=None, batch: int = 128) -> torch.Tensor:
    return torch.cat([backbone.forward(x[i:i + batch], params) for i in range(0, len(x), batch)])


def logits(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return feats @ weight.T + bias


def accuracy(backbone: Backbone, x, y, weight, bias, params=None) -> float:
    pred = logits(embed(backbone, x, params), weight, bias).argmax(1)
    return float((pred == torch.as_tensor(y)).float().mean()) * 100


def fit_head(feats: torch.Tensor, labels, n_classes: int, steps: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear probe on frozen pretrained features (full batch, Adam), used as the frozen task head."""
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(n_classes, feats.shape[1], generator=g) * 0.01).requires_grad_(True)
    bias = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=1e-2, weight_decay=1e-4)
    y = torch.as_tensor(labels)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(logits(feats, weight, bias), y).backward()
        opt.step()
    return weight.detach(), bias.detach()


def finetune(backbone: Backbone, x, y, weight, bias, steps: int, batch: int = 32, lr: float = 2e-4,
             seed: int = 0) -> dict[str, torch.Tensor]:
    """Fine-tune the tower's parameters with the head frozen and BatchNorm in eval mode."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in backbone.params.items()}
    opt = torch.optim.Adam(params.values(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    y = torch.as_tensor(y)
    backbone.model.eval()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        feats = torch.func.functional_call(backbone.model, (params, backbone.buffers), (x[idx],))
        loss = torch.nn.functional.cross_entropy(logits(feats, weight, bias), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in params.items()}
