"""The GPU paths, where torch sees a CUDA device: the one-pass mixed forward at fp32, fp16 and
bf16, the engine's mixed batches, and the router's exact index on the GPU, each against the same
computation served alone or on the CPU. Machines without CUDA (CI) skip this module; on a GPU
machine, ``bash scripts/gpu-check.sh`` runs it with the GPU benchmarks."""

import numpy as np
import pytest
import torch
import faiss  # noqa: F401,E402  (after torch, as switchbank.ivf imports them)

from switchbank import mixed
from switchbank.backbone import DEMO_ARCH, load_backbone
from switchbank.bank import Bank
from switchbank.engine import Engine
from switchbank.routing import Router
from tests.helpers import ROOT_DEMO_BANK
from tests.integration.test_mixed import close, half_precision_errors, images, perturbed, routes_for
from tests.unit.test_knn_device import check_against_float32_scan

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def one_pass(b, spans, variants):
    tower, why = mixed.build(b.model, b.params, b.buffers, b.probe())
    assert tower is not None, why
    x = images(spans[-1][1], b.probe().shape[-1], seed=1)
    groups = mixed.Groups(spans, lambda g, names: tuple(variants[g][n] if n else None for n in names), b.device)
    with torch.inference_mode():
        return x, b.forward_mixed(x, tower, groups)


@pytest.mark.parametrize("arch", ["switchbank-tiny-vit", DEMO_ARCH, "ViT-B-32"])
def test_mixed_forward_on_cuda_equals_groups_alone(arch):
    b = load_backbone(arch, device="cuda")
    spans = [(0, 1), (1, 4), (4, 6), (6, 7)]
    variants = [perturbed(b.params, s) for s in range(4)]
    x, got = one_pass(b, spans, variants)
    assert got.device.type == "cuda"
    with torch.inference_mode():
        for g, (s, e) in enumerate(spans):
            close(got[s:e], b.forward(x[s:e], variants[g]))


@pytest.mark.parametrize("arch", ["switchbank-tiny-vit", DEMO_ARCH])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_cuda_runs_one_pass_as_accurately_as_alone(arch, dtype):
    worst_mixed, worst_alone = half_precision_errors(arch, dtype, "cuda")
    assert worst_mixed <= 3 * worst_alone + 1e-6, (worst_mixed, worst_alone)


def test_engine_on_cuda_serves_named_weighted_and_auto_rows_as_the_cpu_engine():
    """Named, weighted (up to five switches, sums of 1 and not) and Auto-Switch rows in the same
    batches, cold and then cached, on the GPU against the CPU engine (whose rows the CPU tests hold
    to each request served alone on its merged weights); the router on the GPU."""
    from demo.tasks import LOADERS, load
    engines = []
    for device in ("cpu", "cuda"):
        b = load_backbone(DEMO_ARCH, device=device)
        eng = Engine(b, k=10, cache_bytes=256 << 20, router_metric="cosine")
        for sw in Bank(ROOT_DEMO_BANK).load_all()[1].values():
            eng.add(sw)
        engines.append(eng)
    cpu, gpu = engines
    assert gpu.router.stats()["scan"].startswith("float32 on cuda")
    x = torch.stack([cpu.backbone.preprocess(load(name).test[i]) for i in range(2) for name in LOADERS][:11])
    routes = routes_for(sorted(cpu.switches))
    for _ in range(3):  # cold, then cached as combinations turn hot
        for want, got in zip(cpu.run(x, routes), gpu.run(x, routes)):
            assert (got.head, got.weights) == (want.head, want.weights)
            close(got.logits.cpu(), want.logits.cpu())
    assert gpu.stats().mixed_forward and gpu.stats().batches_mixed > 0


@pytest.mark.parametrize("ip", [False, True])
def test_device_index_on_cuda_finds_what_the_cpu_float32_scan_finds(ip):
    check_against_float32_scan("cuda", ip, dim=1280, steps=3, rows=(4000, 6000), queries=16, m=20, atol=1e-4)


def test_router_on_cuda_routes_as_the_cpu_router():
    g = np.random.default_rng(1)
    centres = g.normal(size=(40, 64)).astype(np.float32)
    data = {f"t{i}": centres[i] + 0.3 * g.normal(size=(50, 64)).astype(np.float32) for i in range(40)}
    counts = {t: len(v) for t, v in data.items()}
    source = lambda names: ((t, data[t]) for t in (names if names is not None else sorted(data)))  # noqa: E731
    cpu, gpu = Router(64, 10, "cosine"), Router(64, 10, "cosine", device="cuda")
    for r in (cpu, gpu):
        r.load(source, counts)
    assert gpu.stats()["scan"].startswith("float32 on cuda")
    queries = np.repeat(centres, 4, axis=0) + 0.3 * g.normal(size=(160, 64)).astype(np.float32)
    assert gpu.counts(torch.from_numpy(queries).cuda()) == cpu.counts(queries)
