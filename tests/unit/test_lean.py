"""open_clip imported without torch's compiler (switchbank/lean.py)."""

import subprocess
import sys
import textwrap
from pathlib import Path

from switchbank import lean

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, tmp_path: Path | None = None) -> str:
    """``code`` in a fresh interpreter (imports are process-wide); its stdout."""
    path = [str(ROOT)] + ([str(tmp_path)] if tmp_path else [])
    env = {"PYTHONPATH": ":".join(path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_serving_the_demo_bank_never_loads_the_compiler():
    out = _run("""
        import sys
        from switchbank.backbone import load_backbone, DEMO_ARCH
        from switchbank.bank import Bank
        from switchbank.engine import Engine, Route
        import torch
        print("after import", "torch._dynamo" in sys.modules, "timm" in sys.modules)
        bb = load_backbone(DEMO_ARCH)
        eng = Engine(bb, router_metric="cosine")
        eng.sync(Bank("demo/bank"))
        x = torch.rand(4, 3, 128, 128)
        eng.run(x, [Route(), Route(task="mnist"), Route(weights={"mnist": 0.5, "letters": 0.5}), Route()])
        print("after serving", "torch._dynamo" in sys.modules)
        # what the import stood in for is undone
        print("restored", torch.compiler.disable.__module__ == "torch.compiler"
              and torch.compiler.disable.__code__.co_filename.endswith("compiler/__init__.py"),
              "torch._dynamo.utils" in sys.modules)
    """.replace('"demo/bank"', repr(str(ROOT / "demo" / "bank"))))
    assert "after import False True" in out
    assert "after serving False" in out
    assert "restored True False" in out


def test_a_function_wrapped_lazily_gets_the_real_wrapper_on_its_first_call():
    made = []

    def real(fn, recursive=True, *, reason=None):
        made.append((fn, recursive, reason))
        return lambda *a, **k: ("real", fn(*a, **k))

    disable = lean._lazy(real)

    @disable
    def f(x):
        """doc"""
        return x + 1

    @disable(recursive=False, reason="r")
    def g():
        return 0

    assert made == [] and f.__name__ == "f" and f.__doc__ == "doc"
    assert f(1) == ("real", 2) and f(2) == ("real", 3)
    assert g() == ("real", 0)
    assert [m[1:] for m in made] == [(True, None), (False, "r")]  # one wrapper each, made once

    class C:
        pass

    disable(C)  # anything but a plain function goes to the real one at once
    assert made[-1][0] is C


def test_the_stand_in_for_dynamo_utils_hands_over_to_the_real_module(tmp_path):
    out = _run("""
        import sys
        import torch
        from switchbank import lean
        sys.modules[lean._UTILS] = lean._Utils(lean._UTILS)
        from torch._dynamo.utils import is_compile_supported  # stays a stand-in until called
        print("stand-in", "torch._dynamo" in sys.modules)
        from torch._dynamo.utils import counters  # another name loads the real module
        print("real", "torch._dynamo" in sys.modules, type(sys.modules[lean._UTILS]).__name__, type(counters).__name__)
        print("call", is_compile_supported("cpu") in (True, False))
    """)
    assert "stand-in False" in out
    assert "real True module" in out
    assert "call True" in out


def test_a_module_that_needs_the_compiler_to_import_is_imported_the_ordinary_way(tmp_path):
    (tmp_path / "needs_compiler.py").write_text(textwrap.dedent("""
        import torch.compiler
        if torch.compiler.disable.__code__.co_filename.endswith("lean.py"):
            raise ImportError("wants the real torch.compiler.disable")
        VALUE = 42
    """))
    out = _run("""
        import sys
        import torch
        from switchbank import lean
        m = lean.import_without_compiler("needs_compiler")
        print("value", m.VALUE, torch.compiler.disable.__code__.co_filename.endswith("compiler/__init__.py"),
              lean._UTILS in sys.modules)
    """, tmp_path)
    assert "value 42 True False" in out
