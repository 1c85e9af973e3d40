import gc
import threading
import weakref

import pytest
import torch

from switchbank.cache import DeltaCache


def maker(nbytes, log, key):
    def make():
        log.append(key)
        return torch.zeros(nbytes // 4), nbytes
    return make


def test_eviction_step_by_step():
    cache = DeltaCache(capacity_bytes=300)
    built = []
    with cache.lease("a", maker(100, built, "a")):
        pass
    with cache.lease("b", maker(100, built, "b")):
        pass
    with cache.lease("c", maker(100, built, "c")):
        pass
    assert cache.keys() == ["a", "b", "c"] and cache.stats().bytes == 300
    with cache.lease("a", maker(100, built, "a")):  # hit: a becomes most recent
        pass
    assert built == ["a", "b", "c"] and cache.keys() == ["b", "c", "a"]
    with cache.lease("d", maker(100, built, "d")):  # evicts b, the least recently used
        pass
    assert cache.keys() == ["c", "a", "d"]
    with cache.lease("e", maker(200, built, "e")):  # needs 200: evicts c and a
        pass
    assert cache.keys() == ["d", "e"]
    s = cache.stats()
    assert (s.hits, s.misses, s.evictions, s.entries, s.bytes) == (1, 5, 3, 2, 300)


def test_pinned_entries_are_not_evicted():
    cache = DeltaCache(capacity_bytes=200)
    built = []
    with cache.lease("a", maker(100, built, "a")):
        with cache.lease("b", maker(100, built, "b")):
            with cache.lease("c", maker(100, built, "c")) as c:  # a and b pinned: c not cached
                assert c.numel() == 25
            assert cache.keys() == ["a", "b"] and cache.stats().bypasses == 1
    with cache.lease("c", maker(100, built, "c")):
        pass
    assert cache.keys() == ["b", "c"]


def test_oversize_entries_bypass_the_cache():
    cache = DeltaCache(capacity_bytes=100)
    with cache.lease("big", maker(400, [], "big")) as v:
        assert v.numel() == 100
    assert cache.keys() == [] and cache.stats().bypasses == 1


def test_memory_is_freed_on_eviction_and_invalidation():
    cache = DeltaCache(capacity_bytes=100)
    refs = {}

    def make(key):
        def f():
            t = torch.zeros(25)
            refs[key] = weakref.ref(t)
            return t, 100
        return f

    with cache.lease("a", make("a")):
        pass
    with cache.lease("b", make("b")):
        pass
    gc.collect()
    assert refs["a"]() is None and refs["b"]() is not None
    assert cache.invalidate(lambda k: k == "b") == 1
    gc.collect()
    assert refs["b"]() is None and cache.stats().bytes == 0


def test_invalidated_entry_stays_valid_for_its_lease():
    cache = DeltaCache(capacity_bytes=1000)
    with cache.lease("a", maker(100, [], "a")) as v:
        cache.invalidate(lambda k: True)
        assert v.numel() == 25
    assert cache.keys() == []


def test_concurrent_misses_build_once():
    cache = DeltaCache(capacity_bytes=1000)
    built = []
    gate = threading.Event()

    def slow():
        gate.wait(2)
        built.append(1)
        return torch.zeros(1), 4

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.lease("k", slow).__enter__())) for _ in range(4)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert len(built) == 1 and len(results) == 4 and cache.stats().misses == 1


def test_capacity_must_be_positive():
    with pytest.raises(ValueError):
        DeltaCache(0)


def test_victims_are_named_without_evicting():
    cache = DeltaCache(300)
    for key in "abc":
        with cache.lease(key, lambda: (key, 100)):
            pass
    assert cache.victims(50) == ["a"] and cache.victims(250) == ["a", "b", "c"] and cache.victims(400) is None
    assert cache.keys() == ["a", "b", "c"] and cache.typical_bytes() == 100
    with cache.lease("b", None):
        assert cache.victims(150) == ["a", "c"]  # b is pinned while leased
    with cache.lease("a", None), cache.lease("b", None), cache.lease("c", None):
        assert cache.victims(50) is None
