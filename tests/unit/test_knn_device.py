"""The exact index held on the backbone's device (knn_device), run here on the CPU device: the
same code as on a GPU, every tensor on the index's device and only ids and answers on the CPU."""

import logging

import numpy as np
import pytest
import torch
import faiss  # noqa: F401,E402  (after torch, as switchbank.ivf imports them)

from switchbank import knn_device
from switchbank.knn import Exact
from switchbank.knn_device import DeviceExact
from switchbank.routing import Router

from .test_routing import clusters, source_of


@pytest.mark.parametrize("ip", [False, True])
def test_device_index_finds_what_the_float32_scan_finds(ip, monkeypatch):
    """Adds in batches (float16 rows with norms, as the cosine router gives them, or float32
    rows), removals, slots reused and a table that grows: the same neighbours at the same
    distances as the CPU's float32 scan."""
    monkeypatch.setattr(knn_device, "FIRST_ROWS", 16)  # grows several times
    check_against_float32_scan("cpu", ip, dim=24, steps=6, rows=(20, 200), queries=9, m=12, atol=1e-5)


def check_against_float32_scan(device: str, ip: bool, dim: int, steps: int, rows: tuple[int, int], queries: int,
                               m: int, atol: float) -> None:
    """A device index and the CPU's float32 scan given the same adds (``steps`` batches of a size
    drawn from ``rows``) and removals: the same ``m`` nearest, at the same distances."""
    g = np.random.default_rng(3)
    dev, ref = DeviceExact(dim, ip, device), Exact(dim, ip, scan="float32")
    next_id = 0
    for step in range(steps):
        n = int(g.integers(*rows))
        ids = np.arange(next_id, next_id + n)
        next_id += n
        x = g.normal(size=(n, dim)).astype(np.float16 if ip else np.float32)
        if ip:  # left for the index to make, from float16 rows
            dev.add(ids, None, None, x)
            ref.add(ids, None, None, x)
        else:
            dev.add(ids, x)
            ref.add(ids, x)
        gone = g.choice(next_id, size=15, replace=False)
        dev.remove(gone)
        ref.remove(gone)
    assert dev.ntotal == ref.ntotal and dev.free  # freed slots, some of them reused
    q = g.normal(size=(queries, dim)).astype(np.float32)
    if ip:
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    d, i = dev.search(q, m)
    d_ref, i_ref = ref.search(q, m)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_allclose(d, d_ref, rtol=1e-5, atol=atol)
    assert set(i.ravel().tolist()) <= set(dev.slot)


def test_removed_vectors_are_never_found_and_slots_are_reused():
    dev = DeviceExact(2, False, "cpu")
    dev.add(np.array([1, 2, 3]), np.array([[0, 0], [5, 5], [9, 9]], dtype=np.float32))
    dev.remove([1])
    _, ids = dev.search(np.zeros((1, 2), np.float32), 3)
    assert ids.tolist() == [[2, 3]]
    dev.add(np.array([4]), np.array([[0.1, 0]], dtype=np.float32))
    assert dev.used == 3  # the removed vector's slot
    _, ids = dev.search(np.zeros((1, 2), np.float32), 1)
    assert ids.tolist() == [[4]]
    np.testing.assert_array_equal(np.sort(dev.vectors(), axis=0), np.array([[0.1, 0], [5, 5], [9, 9]], np.float32))


def test_a_router_with_a_device_routes_as_the_cpu_router_up_to_the_device_budget():
    data, centres = clusters(30, 20, 16, seed=5)
    counts = {t: len(v) for t, v in data.items()}
    cpu = Router(dim=16, k=10, metric="cosine")
    dev = Router(dim=16, k=10, metric="cosine", device="cpu", device_bytes=700 * 16 * 4)
    for r in (cpu, dev):
        r.load(source_of(data), counts)
    assert dev.exact_limit() == 700 and dev.kind == "exact"
    assert dev.stats()["scan"] == "float32 on cpu"
    queries = np.repeat(centres, 3, axis=0) + 0.3 * np.random.default_rng(6).normal(size=(90, 16)).astype(np.float32)
    assert dev.counts(queries) == cpu.counts(queries)
    # past what the budget holds: the IVF index on the CPU, as on a CPU server past its limit
    small = Router(dim=16, k=10, metric="cosine", device="cpu", device_bytes=500 * 16 * 4, nprobe=8)
    small.load(source_of(data), counts)
    assert small.exact_limit() == 500 and small.kind == "approximate"


def test_no_device_bytes_keeps_the_router_on_the_cpu():
    r = Router(dim=4, device="cpu", device_bytes=0)
    assert r.device is None and r.stats()["scan"] in ("float32", "bfloat16")


def test_a_device_without_the_memory_leaves_the_router_on_the_cpu(monkeypatch, caplog):
    def no_room(self, *a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(DeviceExact, "__init__", no_room)
    data, _ = clusters(5, 10, 8, seed=7)
    with caplog.at_level(logging.WARNING, logger="switchbank.routing"):
        r = Router(dim=8, k=3, device="cpu")
        r.load(source_of(data), {t: 10 for t in data})
    assert r.device is None and isinstance(r._index, Exact)
    assert "searching on the CPU" in caplog.text
    assert sum(r.counts(data["t0"][:1])[0].values()) == 3


def test_a_device_that_runs_out_of_memory_as_the_table_grows_moves_the_index_to_the_cpu(monkeypatch):
    """A growth the device has no room for moves every vector to the CPU's exact index, which then
    answers as the device did (and takes the add that did not fit)."""
    monkeypatch.setattr(knn_device, "FIRST_ROWS", 32)
    monkeypatch.setattr(knn_device, "MOVE_ROWS", 10)  # moved in several blocks
    g = np.random.default_rng(8)
    rows = g.normal(size=(100, 6)).astype(np.float32)
    dev, ref = DeviceExact(6, False, "cpu"), Exact(6, False, scan="float32")
    dev.add(np.arange(30), rows[:30])
    ref.add(np.arange(30), rows[:30])
    dev.remove([4])
    ref.remove([4])
    q = g.normal(size=(5, 6)).astype(np.float32)
    on_device = dev.search(q, 7)
    real = DeviceExact._table

    def no_room(self, n):
        if n > 32:
            raise torch.OutOfMemoryError("out of memory")
        return real(self, n)
    monkeypatch.setattr(DeviceExact, "_table", no_room)
    dev.add(np.arange(30, 100), rows[30:])
    ref.add(np.arange(30, 100), rows[30:])
    assert dev.cpu is not None and dev.rows is None and "moved from cpu" in dev.scanning
    assert dev.ntotal == ref.ntotal == 99
    d, i = dev.search(q, 7)
    d_ref, i_ref = ref.search(q, 7)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_allclose(d, d_ref, rtol=1e-5, atol=1e-5)
    assert not np.isin(4, i)
    dev.remove([40])
    assert dev.ntotal == 98 and 40 not in dev.search(rows[40:41], 3)[1]
    # the 29 vectors held before the move answer as they did on the device, beside the new ones
    assert set(on_device[1].ravel()) <= set(range(30))
