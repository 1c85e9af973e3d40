"""timm's VisionTransformer (open_clip's SigLIP towers) in the one-pass mixed forward.

Its linears, convolution, layer norms and layer scales are mixed operations like any tower's
(mixed_ops.py). What is left are parameters that the model reads as whole tensors rather than
through a module: the class and register tokens and the latent query of the attention pooling
(``tok.expand(B, -1, -1)``), and the positional embedding (added in ``_pos_embed``). Each becomes
a :class:`MixedRows`, which answers ``expand`` with every row's own copy, and the tower's
``_pos_embed`` adds per-row embeddings. Configurations this does not cover (image sizes resampled
at run time) are left alone, so the tower's probe check refuses them and the engine falls back to
one forward per group.
"""

from __future__ import annotations

from types import MethodType

import torch
from torch import nn

from .mixed_ops import _Active, _Op


class MixedRows(_Op):
    """A parameter of shape [1, ...] read as ``param.expand(B, ...)``: each row gets its group's."""

    def rows(self, b: int) -> torch.Tensor:
        g, ts = self.tensors()
        if len(ts) == 1:
            return ts[0][0].expand(b, *ts[0][0].shape[1:])
        return g.rows([t[0][0] for t in ts], ts[0][0].dim())

    def expand(self, b: int, *_) -> torch.Tensor:
        return self.rows(b)


def _vit_class():
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # timm absent: no timm towers either
        return None
    return VisionTransformer


def _pool_class():
    try:
        from timm.layers.attention_pool import AttentionPoolLatent
    except ImportError:
        return None
    return AttentionPoolLatent


def _as_rows(active: _Active, mod: nn.Module, attr: str, prefix: str) -> str | None:
    """Swap the parameter ``mod.<attr>`` (if any) for a MixedRows reading it; its name, or None."""
    if not isinstance(getattr(mod, attr, None), nn.Parameter):
        return None
    delattr(mod, attr)
    setattr(mod, attr, MixedRows(active, (prefix + attr,)))
    return prefix + attr


def adapt(active: _Active, root: nn.Module) -> set[str]:
    """Make timm's VisionTransformers and latent attention pools in ``root`` read their whole-tensor
    parameters per row; the parameter names now read that way."""
    vit, pool = _vit_class(), _pool_class()
    covered: set[str] = set()
    for name, mod in list(root.named_modules()):
        prefix = name + "." if name else ""
        if pool is not None and type(mod) is pool:
            covered.update(n for n in (_as_rows(active, mod, "latent", prefix),) if n)
        elif vit is not None and type(mod) is vit and not mod.dynamic_img_size and mod.pos_embed is not None:
            covered.update(n for n in (_as_rows(active, mod, a, prefix) for a in ("cls_token", "reg_token")) if n)
            covered.add(_as_rows(active, mod, "pos_embed", prefix))
            mod._pos_embed = MethodType(_pos_embed, mod)
    return covered


def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
    """timm's VisionTransformer._pos_embed at a fixed image size, with per-row embeddings."""
    b = x.shape[0]
    x = x.view(b, -1, x.shape[-1])
    tokens = [t.expand(b, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
    pos = self.pos_embed.rows(b)
    if self.no_embed_class:  # the embedding skips the prefix tokens: add, then concatenate
        x = torch.cat(tokens + [x + pos], dim=1)
    else:
        x = torch.cat(tokens + [x], dim=1) + pos
    return self.pos_drop(x)
