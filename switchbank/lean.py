"""Importing open_clip without loading torch's compiler, which serving never uses.

Importing open_clip imports timm and torchvision, and both load ``torch._dynamo`` as they import:
torchvision's roi_align imports a helper from ``torch._dynamo.utils``, and timm decorates functions
with ``torch.compiler.disable``, which imports the compiler to build its wrapper. That was about a
third of the server's imports (1.0-1.1 s of 2.9-3.4 s on the 2-core machine measured), for
functions no forward of an image tower calls.

While open_clip imports, :func:`import_without_compiler` therefore

- lets ``torch.compiler.disable`` wrap plain functions lazily: the real wrapper is made on the
  first call, and the compiler loaded then (anything else is passed to the real one at once);
- stands in for ``torch._dynamo.utils`` with a module whose ``is_compile_supported`` loads the real
  helper when called; any other name asked of it loads the real module.

Both are undone once the import returns. Should the import fail this way, it is made again the
ordinary way, compiler and all. torch.compile, if a caller uses it, then loads the compiler as it
always does.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
import types

log = logging.getLogger(__name__)

_UTILS = "torch._dynamo.utils"


def import_without_compiler(name: str):
    """Module ``name`` (open_clip, and with it timm and torchvision), imported without loading
    torch's compiler where it can be."""
    if name in sys.modules or "torch._dynamo" in sys.modules:
        return importlib.import_module(name)
    import torch.compiler

    real = torch.compiler.disable
    torch.compiler.disable = _lazy(real)
    sys.modules[_UTILS] = _Utils(_UTILS)
    try:
        return importlib.import_module(name)
    except Exception as exc:  # a torchvision or timm that needs more of the compiler as it imports
        log.info("%s needs torch's compiler to import (%s: %s); loading it", name, type(exc).__name__, exc)
    finally:
        torch.compiler.disable = real
        if isinstance(sys.modules.get(_UTILS), _Utils):
            del sys.modules[_UTILS]
    return importlib.import_module(name)


def _lazy(real):
    """torch.compiler.disable, making its wrapper of a plain function on the function's first call."""

    def disable(fn=None, recursive=True, *, reason=None):
        if fn is None:  # used as @disable(recursive=...)
            return functools.partial(disable, recursive=recursive, reason=reason)
        if not isinstance(fn, types.FunctionType):
            return real(fn, recursive, reason=reason)
        wrapped = None

        @functools.wraps(fn)
        def call(*args, **kwargs):
            nonlocal wrapped
            if wrapped is None:
                wrapped = real(fn, recursive, reason=reason)
            return wrapped(*args, **kwargs)

        return call

    return disable


class _Utils(types.ModuleType):
    """Stands in for torch._dynamo.utils while open_clip imports."""

    @staticmethod
    def is_compile_supported(device_type):
        return _real_utils().is_compile_supported(device_type)

    def __getattr__(self, name):
        if name.startswith("__"):  # the import system asks for __path__, __spec__...: a plain module
            raise AttributeError(name)
        return getattr(_real_utils(), name)


def _real_utils():
    if isinstance(sys.modules.get(_UTILS), _Utils):
        del sys.modules[_UTILS]
    return importlib.import_module(_UTILS)
