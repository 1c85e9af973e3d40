"""Switch bits loaded on first use, kept under a budget, least recently used out, pinned kept."""

import threading

import pytest

from switchbank.bank import Bank
from switchbank.errors import Unavailable
from switchbank.format import to_bytes
from switchbank.resident import Residency
from tests.helpers import make_switch


@pytest.fixture()
def light(tmp_path, tower):
    bank = Bank(tmp_path / "bank", create=True)
    bank.add_many([to_bytes(make_switch(tower, n, seed=i)) for i, n in enumerate("abcd")])
    return {n: bank.load(n, light=True) for n in "abcd"}


def test_loaded_on_first_use_and_least_recently_used_out(light):
    one = Residency(1)  # smaller than any switch: only what a batch holds stays
    size = None
    for name in "abc":
        with one.use([light[name]]):
            assert light[name].loaded
            size = light[name].resident_bytes()
        assert not light[name].loaded  # evicted once released
    res = Residency(2 * size)
    for name in "abc":
        with res.use([light[name]]):
            pass
    assert [n for n in "abc" if light[n].loaded] == ["b", "c"]  # a was least recently used
    with res.use([light["b"]]):
        pass
    with res.use([light["d"]]):
        pass
    assert [n for n in "abcd" if light[n].loaded] == ["b", "d"]
    s = res.stats()
    assert s.resident == 2 and s.resident_bytes == 2 * size and s.loads == 4 and s.evictions == 2


def test_pinned_and_held_switches_stay(light):
    res = Residency(1)
    res.pin([light["a"]])
    with res.use([light["b"], light["c"]]):
        with res.use([light["d"]]):
            pass
        assert light["b"].loaded and light["c"].loaded  # held by the outer batch
    assert light["a"].loaded and not light["b"].loaded and not light["d"].loaded
    assert res.per_switch()["a"]["pinned"]


def test_resident_bytes_follow_loads_evictions_replacements_and_removals(light, tower):
    """The budget is checked against a running count: after every kind of change it equals the
    bytes of the switches held."""
    size = None

    def held(res):
        return sum(sw.resident_bytes() for sw in res._order.values())

    res = Residency(1 << 30)
    for name in "abc":
        with res.use([light[name]]):
            size = light[name].resident_bytes()
    assert res.stats().resident_bytes == held(res) == 3 * size
    new = make_switch(tower, "a", seed=9)  # added in-process: its bits in memory, no file to reload them from
    res.track(new)  # replaces the tracked "a"
    assert res.stats().resident_bytes == held(res) == 3 * size
    res.forget("b")
    assert res.stats().resident_bytes == held(res) == 2 * size
    res.budget = size
    with res.use([light["d"]]):
        pass
    # c and d evicted, least recently used first; the new "a" has no file, so it stays
    assert set(res.per_switch()) == {"a"} and not light["c"].loaded and not light["d"].loaded
    assert res.stats().resident_bytes == held(res) == size and res.stats().evictions == 2


def test_concurrent_batches_load_a_cold_switch_once(light):
    res = Residency(1 << 30)
    barrier = threading.Barrier(8)

    def work():
        barrier.wait()
        with res.use([light["c"]]):
            assert light["c"].loaded

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert res.stats().loads == 1


def test_a_file_changed_underneath_is_unavailable(light, tower):
    sw = light["a"]
    sw.source.write_bytes(to_bytes(make_switch(tower, "a", seed=99)))
    with pytest.raises(Unavailable, match="content hash"):
        with Residency(1 << 30).use([sw]):
            pass
