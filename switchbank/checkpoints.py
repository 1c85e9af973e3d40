"""Reading open_clip state dicts from disk without unpickling arbitrary objects.

``.safetensors`` files are read with safetensors; ``.pt``/``.pth``/``.bin`` files with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import CheckpointError, Incompatible

VISUAL_PREFIX = "visual."
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict of tensors from ``.safetensors`` or a torch file (weights only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # both readers raise many types; the message is what matters
        raise CheckpointError(f"{path}: cannot read as a state dict ({exc})") from exc
    # Training scripts often wrap the weights: {"state_dict": {...}} with a DDP "module." prefix.
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: expected a non-empty dict of tensors, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:5]}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def image_tower(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image tower's tensors, keyed without the ``visual.`` prefix.

    A whole open_clip model keeps its image tower under ``visual.``; a state dict with no such key
    is taken to be an image tower already.
    """
    if any(k.startswith(VISUAL_PREFIX) for k in state):
        return {k[len(VISUAL_PREFIX):]: v for k, v in state.items() if k.startswith(VISUAL_PREFIX)}
    return dict(state)


def is_buffer_name(name: str, tensor: torch.Tensor) -> bool:
    """Whether a state-dict entry is a buffer rather than a trainable parameter.

    A state dict does not say; BatchNorm statistics and integer tensors are the buffers that occur
    in open_clip image towers (timm trunks included).
    """
    return name.endswith(_BUFFER_SUFFIXES) or not tensor.is_floating_point()


def check_compatible(pre: dict[str, torch.Tensor], fin: dict[str, torch.Tensor]) -> None:
    """Raise Incompatible naming the first tensor whose name or shape differs."""
    missing = sorted(set(pre) - set(fin))
    extra = sorted(set(fin) - set(pre))
    if missing:
        raise Incompatible(f"fine-tuned checkpoint lacks tensor {missing[0]!r} ({len(missing)} missing in all)")
    if extra:
        raise Incompatible(f"fine-tuned checkpoint has unknown tensor {extra[0]!r} ({len(extra)} extra in all)")
    for name, t in pre.items():
        if tuple(t.shape) != tuple(fin[name].shape):
            raise Incompatible(
                f"tensor {name!r}: pretrained shape {tuple(t.shape)} != fine-tuned shape {tuple(fin[name].shape)}"
            )


def fingerprint(tower: dict[str, torch.Tensor]) -> str:
    """A hash of an image tower's floating-point tensors (names, shapes and fp32 values).

    Casting to fp32 lets an fp16 checkpoint and the fp32 model loaded from it agree; integer
    buffers such as ``num_batches_tracked`` say nothing about the weights and are left out.
    """
    h = hashlib.sha256()
    for name in sorted(tower):
        t = tower[name]
        if not t.is_floating_point():
            continue
        data = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(data.shape)};".encode())
        h.update(data.numpy().tobytes())
    return "sha256:" + h.hexdigest()
