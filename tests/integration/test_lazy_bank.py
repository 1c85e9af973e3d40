"""A bank served lazily: start-up reads no bits; answers equal those of fully loaded switches."""

import pytest
import torch

from switchbank.bank import Bank
from switchbank.engine import Engine, Route
from tests.helpers import make_bank, task_switch_bytes
from tests.integration.test_mixed import close, images

TASKS = ["red", "green", "blue", "cyan", "grey"]


@pytest.fixture()
def bank(tmp_path, backbone, tower):
    return Bank(make_bank(tmp_path / "bank", backbone, tower, tasks=TASKS))


def test_start_up_reads_no_bits_and_answers_match(bank, backbone):
    lazy = Engine(backbone, k=5, cache_bytes=64 << 20, resident_bytes=1)
    lazy.sync(bank)
    assert not any(sw.loaded for sw in lazy.switches.values())
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


def test_pin_and_warm(bank, backbone):
    eng = Engine(backbone, k=5, cache_bytes=64 << 20, resident_bytes=1)
    eng.sync(bank)
    eng.pin(["blue"])
    assert eng.switches["blue"].loaded and eng.cache.stats().entries == 1
    eng.run(images(1, 32, seed=3), [Route(task="red")])
    assert eng.switches["blue"].loaded and not eng.switches["red"].loaded
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
