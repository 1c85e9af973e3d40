"""A bank served lazily: start-up reads no bits; answers equal those of fully loaded switches."""

import pytest
import torch

from switchbank.bank import Bank
from switchbank.engine import Engine, Route
from switchbank.errors import NotFound, Unavailable
from tests.helpers import make_bank, task_switch_bytes
from tests.integration.test_mixed import close, images

TASKS = ["red", "green", "blue", "cyan", "grey"]


@pytest.fixture()
def bank(tmp_path, backbone, tower):
    return Bank(make_bank(tmp_path / "bank", backbone, tower, tasks=TASKS))


def test_start_up_reads_no_bits_and_answers_match(bank, backbone):
    lazy = Engine(backbone, k=5, cache_bytes=64 << 20, resident_bytes=1, head_bytes=1)
    lazy.sync(bank)
    assert not any(sw.loaded for sw in lazy.switches.values())
    assert all(sw.head.listed for sw in lazy.switches.values()) and lazy.heads.stats().heads == 0
    assert lazy.resident.stats().resident == 0 and len(lazy.router) == 8 * len(TASKS)
    assert all(sw.queries is None for sw in lazy.switches.values())  # the router holds them
    full = Engine(backbone, k=5, cache_bytes=64 << 20)
    for name in TASKS:
        full.add(bank.load(name))
    routes = [Route(task="red"), Route(), Route(weights={"green": 0.5, "cyan": 0.5}), Route(task="grey"), Route()]
    x = images(len(routes), 32, seed=9)
    for a, b in zip(lazy.run(x, routes), full.run(x, routes)):
        assert (a.head, a.weights) == (b.head, b.weights)
        close(a.logits, b.logits)
    assert lazy.resident.stats().loads >= 4 and lazy.resident.stats().resident == 0  # budget of one byte
    heads = lazy.heads.stats()  # read for red, grey and the routed rows' top switches; one held
    assert heads.loads >= 3 and heads.heads == 1 and all(sw.head.listed for sw in lazy.switches.values())


def test_a_bank_past_the_exact_limit_is_ready_on_exact_search_and_gets_its_ivf_index_from_its_files(
        bank, backbone, monkeypatch):
    """By default the first sync leaves the IVF index to a rebuild in the background, which reads
    the query embeddings again from the switch files (the switches no longer hold them); with
    router_ready_exact off the sync builds it. Both route alike."""
    import switchbank.routing as routing
    monkeypatch.setattr(routing, "bf16_fast", lambda: False)
    monkeypatch.setattr(routing, "EXACT_MAX_FLOAT32", 20)  # the bank holds 40 distinct vectors
    monkeypatch.setattr(routing, "EXACT_MAX", 100)
    x = images(6, 32, seed=5)
    answers = []
    for ready_exact in (True, False):
        eng = Engine(backbone, k=5, cache_bytes=64 << 20, router_nprobe=1 << 20, router_ready_exact=ready_exact)
        eng.sync(bank)
        assert ready_exact or eng.router.kind == "approximate"
        assert all(sw.queries is None for sw in eng.switches.values())
        assert eng.router.join(60)
        assert eng.router.kind == "approximate" and len(eng.router) == 8 * len(TASKS)
        assert eng.router.rebuilds == int(ready_exact)
        answers.append(eng.run(x, [Route()] * len(x)))
    for a, b in zip(*answers):
        assert (a.head, a.weights) == (b.head, b.weights)
        close(a.logits, b.logits)


def test_pin_and_warm(bank, backbone):
    eng = Engine(backbone, k=5, cache_bytes=64 << 20, resident_bytes=1, head_bytes=1)
    eng.sync(bank)
    eng.pin(["blue"])
    assert eng.switches["blue"].loaded and eng.cache.stats().entries == 1
    eng.run(images(1, 32, seed=3), [Route(task="red")])
    assert eng.switches["blue"].loaded and not eng.switches["red"].loaded
    assert sorted(eng.heads.per_switch()) == ["blue", "red"]
    eng.run(images(1, 32, seed=3), [Route(task="green")])
    assert sorted(eng.heads.per_switch()) == ["blue", "green"]  # the pinned switch's head stays
    with pytest.raises(Exception, match="unknown switch"):
        eng.pin(["nope"])


def test_changes_to_the_bank_are_picked_up(bank, backbone, tower):
    eng = Engine(backbone, k=5, cache_bytes=64 << 20)
    eng.sync(bank)
    bank.add(task_switch_bytes(backbone, tower, "teal", seed=40))
    bank.remove("grey")
    assert eng.sync(bank)
    assert "teal" in eng.switches and "grey" not in eng.switches and "grey" not in eng.router.tasks
    res = eng.run(images(1, 32, seed=4), [Route(task="teal")])[0]
    assert res.head == "teal" and torch.isfinite(res.logits).all()


def test_a_copy_uploaded_later_adds_no_vectors_to_the_router(bank, backbone):
    """Per-customer copies of a task share its example images: the router holds their vectors once,
    whether a copy was read at start-up or arrived later."""
    from switchbank.format import to_bytes

    eng = Engine(backbone, k=5, cache_bytes=64 << 20)
    eng.sync(bank)
    distinct, examples = eng.router.stats()["distinct_vectors"], len(eng.router)
    copy = bank.load("red")
    copy.name = "red-customer-2"
    bank.add(to_bytes(copy))
    assert eng.sync(bank) and "red-customer-2" in eng.router.tasks
    assert len(eng.router) == examples + 8 and eng.router.stats()["distinct_vectors"] == distinct


def test_a_switch_replaced_or_removed_by_another_process_before_its_bits_load(bank, backbone, tower):
    """Replicas share a bank: another one may replace a switch (its old file goes) after this engine
    listed it and before a request first needs its bits. The batch follows the bank instead of
    failing until the next periodic sync."""
    eng = Engine(backbone, k=5, cache_bytes=64 << 20, resident_bytes=1)
    eng.sync(bank)
    listed = eng.switches["red"]
    assert not listed.loaded
    other = Bank(bank.root)  # another process's handle on the same directory
    new, _ = other.add(task_switch_bytes(backbone, tower, "red", seed=77), replace=True)
    assert not listed.source.exists() and new.content_hash != listed.content_hash
    x = images(2, 32, seed=5)
    got = eng.run(x, [Route(task="red"), Route(weights={"red": 0.5, "green": 0.5})])
    assert eng.switches["red"].content_hash == new.content_hash
    reference = Engine(backbone, k=5, cache_bytes=64 << 20)
    for name in ("red", "green"):
        reference.add(bank.load(name))
    for a, b in zip(got, reference.run(x, [Route(task="red"), Route(weights={"red": 0.5, "green": 0.5})])):
        close(a.logits, b.logits)
    other.remove("grey")
    with pytest.raises(NotFound):
        eng.run(x[:1], [Route(task="grey")])


def test_a_switch_file_changed_outside_the_bank_is_reported_not_retried_forever(bank, backbone):
    eng = Engine(backbone, k=5, cache_bytes=64 << 20, resident_bytes=1)
    eng.sync(bank)
    eng.switches["cyan"].source.unlink()  # removed behind the bank's back: the manifest still lists it
    with pytest.raises(Unavailable, match="removed since it was listed"):
        eng.run(images(1, 32, seed=6), [Route(task="cyan")])
