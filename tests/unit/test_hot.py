import pytest

from switchbank.hot import HotSet


def test_hot_after_two_batches_and_cools_down():
    h = HotSet(after=2, window=6)
    h.seen(["a", "b"])
    assert not h.is_hot("a")
    h.seen(["a", "c"])
    assert h.is_hot("a") and not h.is_hot("b") and not h.is_hot("c")
    h.seen(["d", "e"])  # six observations: every count halves, ones drop out
    assert not h.is_hot("a") and len(h) == 1
    h.seen(["a"])
    assert h.is_hot("a")


def test_first_use_and_never():
    first, never = HotSet(after=1), HotSet(after=0)
    first.seen(["x"])
    never.seen(["x"] * 5)
    assert first.is_hot("x") and not first.is_hot("y") and not never.is_hot("x")


def test_forget_and_bounds():
    h = HotSet(after=1, window=100)
    h.seen(["a:1", "b:1"])
    h.forget(lambda k: k.startswith("a"))
    assert not h.is_hot("a:1") and h.is_hot("b:1")
    for i in range(1000):
        h.seen([f"k{i}"])
    assert len(h) <= 200
    with pytest.raises(ValueError):
        HotSet(after=-1)


def test_admission_keeps_combinations_that_come_more_often():
    h = HotSet(after=2)
    for _ in range(5):
        h.seen(["every-batch"])
    h.seen(["now-and-then"])
    h.seen(["now-and-then"])
    assert h.admits("now-and-then", [])  # room in the cache: hot is enough
    assert not h.admits("now-and-then", ["every-batch"])  # would evict something that comes more often
    assert h.admits("every-batch", ["now-and-then"])
    assert not h.admits("never-seen", []) and not h.admits("every-batch", None)
