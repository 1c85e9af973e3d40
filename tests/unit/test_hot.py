from fractions import Fraction

import pytest

from switchbank.hot import HotSet
from switchbank.types import Combination


def key(*names: str) -> Combination:
    """The combination of equal weights over ``names``."""
    return Combination(tuple((n, "h", Fraction(1, len(names))) for n in sorted(names)))


def test_hot_after_two_batches_and_cools_down():
    h = HotSet(after=2, window=6)
    h.seen([key("a"), key("b")])
    assert not h.is_hot(key("a"))
    h.seen([key("a"), key("c")])
    assert h.is_hot(key("a")) and not h.is_hot(key("b")) and not h.is_hot(key("c"))
    h.seen([key("d"), key("e")])  # six observations: every count halves, ones drop out
    assert not h.is_hot(key("a")) and len(h) == 1
    h.seen([key("a")])
    assert h.is_hot(key("a"))


def test_first_use_and_never():
    first, never = HotSet(after=1), HotSet(after=0)
    first.seen([key("x")])
    never.seen([key("x")] * 5)
    assert first.is_hot(key("x")) and not first.is_hot(key("y")) and not never.is_hot(key("x"))


def test_forget_and_bounds():
    h = HotSet(after=1, window=100)
    h.seen([key("a:1"), key("b:1")])
    h.forget(lambda k: k.names[0].startswith("a"))
    assert not h.is_hot(key("a:1")) and h.is_hot(key("b:1"))
    for i in range(1000):
        h.seen([key(f"k{i}")])
    assert len(h) <= 200
    with pytest.raises(ValueError):
        HotSet(after=-1)


def test_admission_keeps_combinations_that_come_more_often():
    h = HotSet(after=2)
    for _ in range(5):
        h.seen([key("every-batch")])
    h.seen([key("now-and-then")])
    h.seen([key("now-and-then")])
    assert h.admits(key("now-and-then"), [])  # room in the cache: hot is enough
    assert not h.admits(key("now-and-then"), [key("every-batch")])  # would evict something that comes more often
    assert h.admits(key("every-batch"), [key("now-and-then")])
    assert not h.admits(key("never-seen"), []) and not h.admits(key("every-batch"), None)


def test_mixes_need_more_batches_than_one_switch():
    h = HotSet(after=2, mix_after=4)
    one, mix = key("a"), key("a", "b")
    for i in range(3):
        h.seen([one, mix])
        assert h.is_hot(one) == (i >= 1)
        assert not h.is_hot(mix)
    h.seen([mix])
    assert h.is_hot(mix)
    assert h.admits(mix, [one])  # it has come in four batches, the switch alone in three
    never = HotSet(after=1, mix_after=0)
    never.seen([mix] * 50)
    assert not never.is_hot(mix) and not never.admits(mix, [])
    with pytest.raises(ValueError):
        HotSet(mix_after=-1)
