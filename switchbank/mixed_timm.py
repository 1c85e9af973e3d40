"""timm's VisionTransformer, EVA and ConvNeXt (open_clip's SigLIP, EVA and ConvNeXt towers) in the
one-pass mixed forward.

Their linears, convolutions, layer norms and LayerScale modules are mixed operations like any
tower's (mixed_ops.py). What is left are parameters that the model reads as whole tensors rather
than through a module: the class and register tokens and the latent query of the attention pooling,
read as ``tok.expand(B, -1, -1)``, the positional embedding, read as ``x + pos_embed``, and
ConvNeXt's layer scale, read as ``gamma.reshape(1, -1, 1, 1)``. Each becomes a
:class:`MixedRows`, which answers all three with every row's own copy, so timm's code runs
unchanged. Towers that resample the positional embedding at run time (``dynamic_img_size``) are
left alone: no mixed operation then reads that embedding, so the tower is refused and the engine
runs one forward per group.
"""

from __future__ import annotations

import torch
from torch import nn

from .mixed_ops import _Active, _Op


class MixedRows(_Op):
    """A parameter read per row: ``expand(B, ...)`` and ``x + it`` (a [1, ...] token or
    embedding) and ``reshape(1, ...)`` (a layer scale) give each row its group's copy."""

    def _per_row(self, g, ts) -> torch.Tensor:
        return g.rows([t[0][0] for t in ts], ts[0][0].dim())

    def expand(self, b: int, *_) -> torch.Tensor:
        """A copy, also for one group: the caller holds it while later operations fetch their
        tensors, and a just-in-time merge (jit.py) reuses the scratch this one's were read from."""
        g, ts = self.tensors()
        if len(ts) == 1:
            return ts[0][0].expand(b, *ts[0][0].shape[1:]).clone()
        return self._per_row(g, ts)

    def __radd__(self, x: torch.Tensor) -> torch.Tensor:
        g, ts = self.tensors()
        return x + (ts[0][0] if len(ts) == 1 else self._per_row(g, ts)).to(x.dtype)

    def reshape(self, *shape) -> torch.Tensor:
        """``param.reshape(1, ...)`` for broadcasting over the batch: [B, ...] with each row's."""
        g, ts = self.tensors()
        if len(ts) == 1:
            return ts[0][0].reshape(*shape)
        if shape[0] != 1:
            raise NotImplementedError("a per-row parameter is reshaped to broadcast over the batch only")
        per_row = g.rows([t[0] for t in ts], ts[0][0].dim() + 1)  # [B, ...]: the rows' own copies
        return per_row.reshape(per_row.shape[0], *shape[1:])


def _whole() -> dict[type, tuple[str, ...]]:
    """The timm classes handled, each with the parameters it reads whole (where present)."""
    out = {}
    tokens = ("cls_token", "reg_token", "pos_embed")
    for module, name, attrs in (("timm.models.vision_transformer", "VisionTransformer", tokens),
                                ("timm.models.eva", "Eva", tokens),
                                ("timm.layers.attention_pool", "AttentionPoolLatent", ("latent",)),
                                ("timm.models.convnext", "ConvNeXtBlock", ("gamma",))):
        try:
            out[getattr(__import__(module, fromlist=[name]), name)] = attrs
        except (ImportError, AttributeError):  # timm absent, or a version without it
            pass
    return out


def adapt(active: _Active, root: nn.Module) -> set[str]:
    """Have the timm modules in ``root`` that read parameters whole read them per row; the names of
    the parameters now read that way."""
    whole = _whole()
    covered: set[str] = set()
    for name, mod in list(root.named_modules()):
        attrs = whole.get(type(mod), ())
        if getattr(mod, "dynamic_img_size", False):
            continue
        prefix = name + "." if name else ""
        for attr in attrs:
            if isinstance(getattr(mod, attr, None), nn.Parameter):
                delattr(mod, attr)
                setattr(mod, attr, MixedRows(active, (prefix + attr,)))
                covered.add(prefix + attr)
    return covered
