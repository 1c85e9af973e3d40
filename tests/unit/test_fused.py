"""The fused CPU kernel gives bitwise the torch path's merge, on every shape and mix."""

import threading

import numpy as np
import pytest
import torch

from switchbank import fused
from switchbank.build import build_switch
from switchbank.combine import merged_params

SHAPES = {"a": (1,), "b": (7,), "c": (3, 3), "d": (fused.BLOCK + 3,), "e": (2, fused.BLOCK), "f": (5, 17, 3),
          "s": ()}


def tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k, shape in SHAPES.items()}


@pytest.fixture(scope="module")
def base():
    b = tensors(0)
    b["c"][0, 0] = -0.0  # the torch path turns -0.0 + (+0.0) into +0.0; so must the kernel
    b["d"][::5] = -0.0
    return b


@pytest.fixture(scope="module")
def switches(base):
    out = []
    for i, alpha in enumerate((0.5, 0.7, 0.9)):
        fin = {k: v + 1e-2 * t for (k, v), t in zip(base.items(), tensors(i + 1).values())}
        out.append(build_switch(base, fin, f"s{i}", alpha))
    # one switch covering only some tensors, laid out differently from the others
    part = {k: base[k] for k in ("f", "b", "d")}
    out.append(build_switch(part, {k: v * 1.5 for k, v in part.items()}, "part", 0.6))
    return out


def torch_path(base, weighted):
    return merged_params(base, weighted, kernel=False)


def test_numba_is_installed():
    assert fused.AVAILABLE, "numba is a dependency: without it every merge takes the slow path"


@pytest.mark.parametrize("picks", [[(0, 1.0)], [(0, 0.3), (1, 0.7)], [(2, 2.0), (0, 0.0), (3, 1.0)],
                                   [(3, 1.0)], [(0, 0.2), (1, 0.2), (2, 0.2), (3, 0.4)]])
def test_fused_equals_torch_bitwise(base, switches, picks):
    weighted = [(switches[i], w) for i, w in picks]
    expected = torch_path(base, weighted)
    got = merged_params(base, weighted)
    assert got.keys() == expected.keys()
    for k in base:
        assert got[k].shape == base[k].shape
        # compare the bits, so that -0.0 against +0.0 counts as a difference
        assert torch.equal(got[k].view(torch.int32), expected[k].view(torch.int32)), k
        assert (got[k] is base[k]) == (expected[k] is base[k]), k


def test_scale_zero_tensor_is_left_to_the_base(base, switches):
    sw = switches[3]
    saved = list(sw.entries)
    try:
        sw.entries = [e if e.name != "b" else type(e)(e.name, e.shape, e.kept, 0.0, e.offset) for e in saved]
        merged = merged_params(base, [(sw, 1.0)])
        assert merged["b"] is base["b"]
        assert not torch.equal(merged["f"], base["f"])
    finally:
        sw.entries = saved


def test_concurrent_merges_are_serialised_not_crashed(base, switches):
    weighted = [(switches[0], 0.5), (switches[1], 0.5)]
    expected = merged_params(base, weighted)
    errors, results = [], []

    def work():
        try:
            for _ in range(20):
                results.append(merged_params(base, weighted))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 80
    assert all(torch.equal(r["d"], expected["d"]) for r in results)


def test_bits_out_of_range_are_refused():
    bits = torch.zeros(1, dtype=torch.uint8)
    zero = np.zeros(1, dtype=np.int64)
    with pytest.raises(ValueError, match="out of range"):
        fused.merge([torch.zeros(9)], [fused.Term(bits, bits, zero, zero, np.ones(1, dtype=np.float32))])
    with pytest.raises(ValueError, match="out of range"):
        fused.merge([torch.zeros(8)], [fused.Term(bits, bits, zero, zero - 1, np.ones(1, dtype=np.float32))])


def test_strided_base_takes_the_torch_path(base, switches):
    strided = dict(base)
    strided["c"] = base["c"].t().contiguous().t()  # same values, column-major storage
    assert not strided["c"].is_contiguous()
    weighted = [(switches[0], 0.5), (switches[1], 0.5)]
    expected = torch_path(base, weighted)
    got = merged_params(strided, weighted)
    for k in base:
        assert torch.equal(got[k].view(torch.int32), expected[k].view(torch.int32)), k


def test_loading_the_kernels_leaves_scipy_linalg_unimported_and_importable():
    import subprocess
    import sys
    code = ("import sys; from switchbank import fused, packing; fused.warm_up(); packing.warm_up(); "
            "print('scipy.linalg' in sys.modules); import importlib.util; "
            "ok = importlib.util.find_spec('scipy') is None or __import__('scipy.linalg').linalg.norm([3.0, 4.0]) == 5.0; "
            "print(ok)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.split() == ["False", "True"]


def test_copies_mixed_by_the_kernel_as_by_the_product(monkeypatch):
    """Copies mixed by the CPU kernel (merge_kernel.mix) get each request's weighted sum, as the
    gather-product-scatter path gives it to within float32 rounding, every copy of a request the
    same values, and every other row left as it was; tensors the kernel does not take (not
    contiguous, not float32) go the other way and get the same."""
    import dataclasses

    from switchbank.mixed_ops import Copies

    g = torch.Generator().manual_seed(3)
    # rows of the batch: request 0 over rows 7, 1, 4; request 1 over 2 and 9; request 2 alone at 5
    rows = [(7, 0, 0.5), (2, 1, 0.25), (1, 0, 0.3), (5, 2, 1.0), (9, 1, 0.75), (4, 0, 0.2)]
    copies = Copies.of(rows, "cpu")
    used = []
    real = fused.kernel
    monkeypatch.setattr(fused, "kernel", lambda: used.append(1) or real())
    for shape in [(11, 5, 4099), (11, 3)]:  # columns past one 4,096 block, and a few
        x = torch.randn(shape, generator=g)
        got, want = copies.mix(x.clone()), dataclasses.replace(copies, grouped=None).mix(x.clone())
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        for req in range(3):
            at = [p for p, r, _ in rows if r == req]
            exact = sum(w * x[p].double() for p, r, w in rows if r == req)
            torch.testing.assert_close(got[at[0]].double(), exact, rtol=1e-6, atol=1e-6)
            assert all(torch.equal(got[p], got[at[0]]) for p in at)
        others = [i for i in range(shape[0]) if i not in {p for p, _, _ in rows}]
        assert torch.equal(got[others], x[others])
    assert len(used) == 2
    wide = torch.randn((11, 8, 6), generator=g)
    for make in (lambda: wide.clone()[:, ::2], lambda: wide.to(torch.bfloat16)):  # not contiguous; not float32
        got, want = copies.mix(make()), dataclasses.replace(copies, grouped=None).mix(make())
        assert torch.equal(got, want)
    assert len(used) == 2
