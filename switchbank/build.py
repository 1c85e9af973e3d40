"""Building a task switch from a pretrained and a fine-tuned image tower (Bin-Discard).

Follows the authors' released code (docs/method.md): per tensor, positive and negative entries
of the task vector are thresholded separately, keeping the int(n * (1 - alpha)) largest by
magnitude of each sign (ties at the threshold kept; when that count is 0, all entries of that
sign are kept, as the released code does); lambda is the RMS of the kept values.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from tqdm import tqdm

from .checkpoints import check_compatible, fingerprint, is_buffer_name
from .errors import CheckpointError, InvalidInput
from .format import to_bytes
from .packing import encode_compact, compact_to_dense
from .types import Head, Switch, TensorEntry

log = logging.getLogger(__name__)


def keep_count(n: int, alpha: float) -> int:
    """How many of ``n`` same-signed entries Bin-Discard keeps (the released code's int())."""
    return int(n * (1 - alpha))


def bin_discard(tau: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mask, positive, lambda) for one task-vector tensor.

    ``mask`` marks kept entries, ``positive`` their polarity (meaningful where ``mask`` is set),
    ``lambda`` the RMS of the kept values, computed in float64 and returned as a Python float.
    """
    flat = tau.detach().reshape(-1).to(torch.float32)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    for sign in (1.0, -1.0):
        signed = flat * sign
        of_sign = signed > 0
        values = signed[of_sign]
        n = values.numel()
        if n == 0:
            continue
        k = keep_count(n, alpha)
        if k <= 0:
            mask |= of_sign
            continue
        threshold = torch.kthvalue(values, n - k + 1).values  # the k-th largest magnitude
        mask |= of_sign & (signed >= threshold)
    kept = flat[mask].to(torch.float64)
    scale = math.sqrt(float((kept * kept).mean())) if kept.numel() else 0.0
    return mask, flat > 0, scale


def build_switch(
    pretrained: dict[str, torch.Tensor],
    finetuned: dict[str, torch.Tensor],
    name: str,
    alpha: float,
    *,
    head: Head | None = None,
    queries: torch.Tensor | None = None,
    router_fingerprint: str | None = None,
    arch: str | None = None,
    progress: bool = False,
) -> Switch:
    """Compress ``finetuned - pretrained`` (image-tower state dicts) into a task switch."""
    if not 0.0 <= alpha < 1.0:
        raise InvalidInput(f"alpha (the discard ratio) must be in [0, 1), got {alpha}")
    check_compatible(pretrained, finetuned)
    entries: list[TensorEntry] = []
    masks: list[np.ndarray] = []
    poss: list[np.ndarray] = []
    dense: dict[str, torch.Tensor] = {}
    differing: list[str] = []
    offset = 0
    names = sorted(pretrained)
    for tname in tqdm(names, desc=f"switch {name}", unit="tensor", disable=not progress):
        pre, fin = pretrained[tname], finetuned[tname]
        if is_buffer_name(tname, pre):
            if not torch.equal(pre, fin):
                differing.append(tname)
            continue
        tau = fin.to(torch.float32) - pre.to(torch.float32)
        if not torch.isfinite(tau).all():
            raise CheckpointError(f"tensor {tname!r}: the checkpoints hold NaN or infinite values")
        if tau.dim() == 0:
            if tau.item() != 0.0:
                dense[tname] = tau.clone()
            continue
        mask, positive, scale = bin_discard(tau, alpha)
        mask_bytes, sign_bytes, kept = encode_compact(mask, positive)
        # lambda is stored as fp32; round it now so a switch in memory equals its file.
        entries.append(TensorEntry(tname, tuple(tau.shape), kept, float(np.float32(scale)), offset))
        masks.append(mask_bytes)
        poss.append(compact_to_dense(mask_bytes, sign_bytes, tau.numel(), kept))
        offset += mask_bytes.size
    if differing:
        log.warning(
            "switch %s: %d buffers differ between the checkpoints and are not part of the switch "
            "(the pretrained values are served): %s", name, len(differing), ", ".join(differing[:10]),
        )
    if queries is not None:
        queries = queries.detach().to("cpu", torch.float32).contiguous()
        if queries.dim() != 2 or queries.shape[0] == 0:
            raise InvalidInput(f"query embeddings must be a non-empty [n, dim] matrix, got {tuple(queries.shape)}")
        if router_fingerprint is None:
            raise InvalidInput("query embeddings need the fingerprint of the encoder that made them")
    sw = Switch(
        name=name,
        alpha=float(alpha),
        backbone_fingerprint=fingerprint(pretrained),
        entries=entries,
        mask=torch.from_numpy(np.concatenate(masks) if masks else np.zeros(0, np.uint8)),
        pos=torch.from_numpy(np.concatenate(poss) if poss else np.zeros(0, np.uint8)),
        dense=dense,
        head=head,
        queries=queries,
        router_fingerprint=router_fingerprint if queries is not None else None,
        arch=arch,
        buffers_differing=differing,
    )
    to_bytes(sw)  # sets the content hash, so an in-memory switch is keyed like its file
    return sw
