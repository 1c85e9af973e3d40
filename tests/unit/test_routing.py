from fractions import Fraction

import numpy as np
import pytest

from switchbank.errors import Incompatible
from switchbank.routing import Router


def test_weights_are_neighbour_counts_over_k():
    r = Router(dim=2, k=4)
    r.add("left", np.array([[-1, 0], [-1.1, 0], [-0.9, 0]], dtype=np.float32))
    r.add("right", np.array([[1, 0], [1.1, 0], [0.9, 0]], dtype=np.float32))
    counts = r.counts(np.array([[-1, 0], [1, 0], [-0.2, 0]], dtype=np.float32))
    assert counts[0] == {"left": 3, "right": 1}
    assert counts[1] == {"right": 3, "left": 1}
    assert counts[2] == {"left": 3, "right": 1}
    w = r.weights(np.array([[-1, 0]], dtype=np.float32))[0]
    assert w == {"left": Fraction(3, 4), "right": Fraction(1, 4)} and sum(w.values()) == 1


def test_ties_are_deterministic():
    r = Router(dim=1, k=1)
    r.add("a", np.array([[1.0]], dtype=np.float32))
    r.add("b", np.array([[-1.0]], dtype=np.float32))
    # equidistant: the earlier-added example wins, every time
    for _ in range(5):
        assert r.counts(np.array([[0.0]], dtype=np.float32)) == [{"a": 1}]


def test_add_remove_replace_without_rebuild():
    r = Router(dim=2, k=2)
    r.add("a", np.zeros((3, 2), dtype=np.float32))
    r.add("b", np.ones((3, 2), dtype=np.float32))
    assert len(r) == 6
    r.remove("a")
    assert len(r) == 3 and r.tasks == ["b"]
    assert r.counts(np.zeros((1, 2), dtype=np.float32)) == [{"b": 2}]
    r.add("b", np.full((2, 2), 5, dtype=np.float32))  # replace
    assert len(r) == 2
    r.add("a", np.zeros((1, 2), dtype=np.float32))
    assert r.counts(np.zeros((1, 2), dtype=np.float32)) == [{"a": 1, "b": 1}]


def test_k_larger_than_index():
    r = Router(dim=2, k=10)
    r.add("a", np.zeros((2, 2), dtype=np.float32))
    r.add("b", np.ones((1, 2), dtype=np.float32))
    assert r.weights(np.zeros((1, 2), dtype=np.float32)) == [{"a": Fraction(2, 3), "b": Fraction(1, 3)}]


def test_wrong_dimension_is_rejected():
    r = Router(dim=4)
    with pytest.raises(Incompatible):
        r.add("a", np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(Incompatible):
        r.counts(np.zeros((1, 3), dtype=np.float32))


def test_cosine_metric_ranks_by_angle():
    r = Router(dim=2, k=1, metric="cosine")
    r.add("east", np.array([[10.0, 0.0]], dtype=np.float32))
    r.add("north", np.array([[0.0, 0.1]], dtype=np.float32))
    # Euclidean would pick "north" (closer in absolute terms); the angle says "east"
    assert r.counts(np.array([[1.0, 0.1]], dtype=np.float32)) == [{"east": 1}]
    plain = Router(dim=2, k=1)
    plain.add("east", np.array([[10.0, 0.0]], dtype=np.float32))
    plain.add("north", np.array([[0.0, 0.1]], dtype=np.float32))
    assert plain.counts(np.array([[1.0, 0.1]], dtype=np.float32)) == [{"north": 1}]
    with pytest.raises(Exception, match="metric"):
        Router(dim=2, metric="manhattan")
