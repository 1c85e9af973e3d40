"""The exact index's bfloat16 scan gives the answer of a float32 scan, near ties included."""

import itertools

import numpy as np
import pytest
import torch

from switchbank import knn
from switchbank.knn import Exact, _slack, bf16_scores


def near_ties(n_groups: int, per: int, dim: int, spread: float, seed: int, unit: bool):
    """Groups of vectors around random centres, ``spread`` apart: many neighbours at almost the
    same distance, which is what makes a quantised scan misplace them."""
    g = np.random.default_rng(seed)
    centres = g.normal(size=(n_groups, dim)).astype(np.float32)
    x = np.repeat(centres, per, axis=0) + spread * g.normal(size=(n_groups * per, dim)).astype(np.float32)
    q = centres[g.integers(0, n_groups, 24)] + 0.3 * g.normal(size=(24, dim)).astype(np.float32)
    if unit:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q


def truth(x: np.ndarray, ids: np.ndarray, q: np.ndarray, ip: bool, m: int):
    """The m nearest in float64, with the gap after the m-th (ties within float32 noise are not a
    question a float32 index can answer)."""
    dots = q.astype(np.float64) @ x.astype(np.float64).T
    dist = -dots if ip else (x.astype(np.float64) ** 2).sum(1) - 2 * dots
    order = np.argsort(dist, axis=1, kind="stable")
    gap = np.take_along_axis(dist, order[:, m:m + 1], 1)[:, 0] - np.take_along_axis(dist, order[:, m - 1:m], 1)[:, 0]
    return ids[order[:, :m]], gap


@pytest.mark.parametrize("ip", [True, False])
def test_bfloat16_scan_finds_what_a_float32_scan_finds(ip):
    x, q = near_ties(80, 60, 96, spread=0.02, seed=0, unit=ip)
    ids = np.arange(len(x)) * 7 + 3
    fast, plain = Exact(96, ip, scan="bfloat16"), Exact(96, ip, scan="float32")
    for index in (fast, plain):
        index.add(ids, x)
        index.remove(ids[:300])  # freed slots are reused by the next additions
        index.add(ids[:100], x[:100])
    assert fast.ntotal == plain.ntotal == len(x) - 200 and fast.used == len(x)
    keep = np.r_[0:100, 300:len(x)]
    for m in (1, 20):
        d_fast, i_fast = fast.search(q, m)
        d_plain, i_plain = plain.search(q, m)
        want, gap = truth(x[keep], ids[keep], q, ip, m)
        scale = float(np.abs(d_plain).max()) + 1
        clear = gap > 1e-5 * scale
        assert clear.sum() >= len(q) // 2
        for r in np.nonzero(clear)[0]:  # as a float64 scan where float32 can tell
            assert set(i_fast[r]) == set(want[r]) == set(i_plain[r])
        np.testing.assert_allclose(d_fast, d_plain, rtol=0, atol=1e-5 * scale)
        assert not np.isin(i_fast, ids[100:300]).any()  # removed vectors never come back


def test_a_shortlist_too_short_for_the_near_ties_is_widened():
    # a hundred copies of each vector moved by far less than bfloat16's resolution: the best 4 of
    # a scan are the same vectors whatever the quantisation does, but their order is not
    x, q = near_ties(4, 100, 64, spread=1e-4, seed=1, unit=True)
    fast, plain = Exact(64, True, scan="bfloat16"), Exact(64, True, scan="float32")
    fast.SHORTLIST = 4
    for index in (fast, plain):
        index.add(np.arange(len(x)), x)
    d_fast, i_fast = fast.search(q, 10)
    d_plain, i_plain = plain.search(q, 10)
    np.testing.assert_allclose(d_fast, d_plain, rtol=0, atol=1e-6)
    want, gap = truth(x, np.arange(len(x)), q, True, 10)
    for r in np.nonzero(gap > 1e-6)[0]:
        assert set(i_fast[r]) == set(want[r])


def test_the_slack_bounds_the_bfloat16_error():
    g = torch.Generator().manual_seed(0)
    # neighbours: large products, where the bound has to be tight to be of use
    centre = torch.randn(300, generator=g)
    v = (centre + 0.3 * torch.randn(5000, 300, generator=g)) * 10
    q = centre + 0.3 * torch.randn(16, 300, generator=g)
    ql, vl = q.to(torch.bfloat16), v.to(torch.bfloat16)
    err = torch.stack([torch.linalg.vector_norm(v - vl.float(), dim=1), torch.linalg.vector_norm(vl.float(), dim=1)], 1)
    # both orientations of the product (the index scans the table as the input, the queries as
    # the weight), which accumulate in different orders
    for c, product in itertools.product((1.0, 2.0), (ql @ vl.T, bf16_scores(vl, ql))):
        approx = -c * product.float()
        exact = -c * (q.double() @ v.double().T)
        off = (approx.double() - exact).abs().max(1).values
        bound = _slack(q, ql, err, c).double()
        assert (off <= bound).all() and (bound < 5 * off).all()  # a bound, and not a vacuous one


def test_empty_and_tiny_indexes():
    index = Exact(8, False, scan="bfloat16")
    d, i = index.search(np.zeros((2, 8), np.float32), 5)
    assert d.shape == (2, 0) and i.shape == (2, 0)
    index.add(np.array([4, 9]), np.eye(8, dtype=np.float32)[:2])
    d, i = index.search(np.eye(8, dtype=np.float32)[:1], 5)
    assert i.tolist() == [[4, 9]]
    index.remove([4, 9])
    assert index.search(np.eye(8, dtype=np.float32)[:1], 5)[1].shape == (1, 0)
    with pytest.raises(ValueError):
        Exact(8, False, scan="int8")


@pytest.mark.parametrize("ip", [True, False])
def test_rows_kept_as_their_float16_source_answer_as_float32_rows_do(ip):
    """Rows given with the float16 rows they were made from are kept as those (half the bytes)
    and read back bitwise, so every answer equals that of an index holding the float32 rows. Rows
    without that form are kept aside in float32; many of them, or the float32 scan, turn the
    table float32."""
    g = np.random.default_rng(5)
    half = (3 * g.normal(size=(6000, 48))).astype(np.float16)
    x = torch.from_numpy(half).float().numpy()
    norms = None
    if ip:  # as the router makes unit rows from a file's rows
        norms = np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        x, norms = x / norms, norms[:, 0]
    q = x[g.integers(0, len(x), 16)] + 0.05 * g.normal(size=(16, 48)).astype(np.float32)
    ids = np.arange(len(x)) * 3 + 1
    compact, plain = Exact(48, ip, scan="bfloat16"), Exact(48, ip, scan="bfloat16")
    plain._to_float32()  # float32 rows from the start, the same scan
    for part in np.array_split(np.arange(len(x)), 3):
        compact.add(ids[part], x[part], None if norms is None else norms[part], half[part])
        plain.add(ids[part], x[part])
    for index in (compact, plain):
        index.remove(ids[:500])  # freed slots are reused, scattered, by the next additions
        index.add(ids[:200], x[:200], None if norms is None else norms[:200], half[:200])
    assert compact.full is None and plain.full is not None
    assert compact.nbytes() < 0.7 * plain.nbytes()
    assert np.array_equal(compact.vectors(), plain.vectors())

    def same():
        assert np.array_equal(compact.vectors(), plain.vectors())
        for m in (1, 20):
            (d1, i1), (d2, i2) = compact.search(q, m), plain.search(q, m)
            assert np.array_equal(i1, i2) and np.array_equal(d1, d2)

    same()
    for index in (compact, plain):  # now with the bfloat16 copy made: its scattered rows too
        index.remove(ids[1000:1300])
        index.add(ids[1000:1100], x[1000:1100], None if norms is None else norms[1000:1100], half[1000:1100])
    same()
    # float32 rows without a float16 form: a few are kept aside, in freed slots and new ones
    extra = g.normal(size=(300, 48)).astype(np.float32)
    if ip:
        extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    for index in (compact, plain):
        index.add(np.arange(300) * 3 + 100_000, extra)
    assert compact.full is None and len(compact.wide) == 300
    same()
    for index in (compact, plain):  # some of them removed, and their slots taken by float16 rows
        index.remove(np.arange(100) * 3 + 100_000)
        index.add(ids[1100:1300], x[1100:1300], None if norms is None else norms[1100:1300], half[1100:1300])
    assert compact.full is None and len(compact.wide) == 200
    same()
    compact.WIDE = 100  # past WIDE rows aside the whole table turns float32
    more = g.normal(size=(900, 48)).astype(np.float32)
    for index in (compact, plain):
        index.add(np.arange(900) * 3 + 200_000, more)
    assert compact.full is not None and not compact.wide
    same()
    small = Exact(48, ip, scan="bfloat16")  # the float32 scan reads float32 rows
    small.add(ids[:1000], x[:1000], None if norms is None else norms[:1000], half[:1000])
    small.scan = "float32"
    small.ready()
    assert small.scanning == "float32" and small.full is not None
    assert np.array_equal(small.vectors(), x[:1000])
    assert Exact(48, ip, capacity=1000).full is not None  # a table that starts small: float32 rows


@pytest.mark.parametrize("seed", range(6))
def test_random_adds_and_removes_answer_as_a_float32_table_does(seed):
    """Adds (with and without a float16 form, new ids and ids already held), removes and searches
    in random order, on a bfloat16 scan with rows kept compact against one holding float32 rows."""
    g = np.random.default_rng(seed)
    ip = bool(seed % 2)
    compact, plain = Exact(32, ip, scan="bfloat16"), Exact(32, ip, scan="bfloat16")
    plain._to_float32()
    compact.WIDE = 40 if seed >= 4 else 10_000  # the last sequences turn the table float32 on the way
    held: dict[int, np.ndarray] = {}
    for step in range(60):
        op = g.random()
        if op < 0.55 or not held:
            with_half = g.random() < 0.8
            n = int(g.integers(1, 200 if with_half or seed >= 4 else 30))
            ids = g.choice(1000, n, replace=False)  # some of them held already: replaced in place
            half = (2 * g.normal(size=(n, 32))).astype(np.float16)
            x = torch.from_numpy(half).float().numpy()
            norms = None
            if ip:
                norms = np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
                x, norms = x / norms, norms[:, 0]
            for index in (compact, plain):
                if with_half:
                    index.add(ids, x, norms, half)
                else:
                    index.add(ids, x)
            held.update(zip(ids.tolist(), x))
        elif op < 0.85:
            gone = g.choice(sorted(held), min(len(held), int(g.integers(1, 150))), replace=False)
            for index in (compact, plain):
                index.remove(gone)
            for i in gone.tolist():
                del held[i]
        else:
            q = g.normal(size=(8, 32)).astype(np.float32)
            if ip:
                q /= np.linalg.norm(q, axis=1, keepdims=True)
            m = min(10, len(held))
            (d1, i1), (d2, i2) = compact.search(q, m), plain.search(q, m)
            assert np.array_equal(i1, i2) and np.array_equal(d1, d2)
            assert set(i1.ravel().tolist()) <= set(held)
        assert compact.ntotal == plain.ntotal == len(held)
    assert (compact.full is None) == (seed < 4) and (seed >= 4 or compact.wide)
    ids = np.array(sorted(held))
    assert np.array_equal(compact.vectors(), plain.vectors())
    slots = [compact.slot[i] for i in ids]
    assert np.array_equal(compact._rows(torch.tensor(slots)).numpy(), np.stack([held[i] for i in ids]))


@pytest.mark.parametrize("ip", [True, False])
def test_a_table_that_starts_small_turns_compact_as_it_grows(ip, monkeypatch):
    """A small table holds float32 rows; the add that takes it past SMALL turns it compact (rows
    that came without a float16 form kept aside) and makes the bfloat16 copy, and every answer
    stays that of a table holding float32 rows. With too many rows without that form it stays
    float32."""
    monkeypatch.setattr(knn, "bf16_fast", lambda: True)
    g = np.random.default_rng(7)
    half = (3 * g.normal(size=(1200, 48))).astype(np.float16)
    x = torch.from_numpy(half).float().numpy()
    norms = None
    if ip:
        norms = np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        x, norms = x / norms, norms[:, 0]
    bare = g.normal(size=(60, 48)).astype(np.float32)  # rows of files without float16 queries
    if ip:
        bare /= np.linalg.norm(bare, axis=1, keepdims=True)
    ids = np.arange(len(x)) * 3 + 1
    q = x[g.integers(0, len(x), 16)] + 0.05 * g.normal(size=(16, 48)).astype(np.float32)

    def grow(wide: int):
        grown, plain = Exact(48, ip), Exact(48, ip, scan="bfloat16")
        grown.SMALL, grown.WIDE = 500, wide
        plain._to_float32()
        for index in (grown, plain):
            index.add(np.arange(60) * 3 + 100_000, bare)
        steps = list(np.array_split(np.arange(len(x)), 12))
        for n, part in enumerate(steps):
            for index in (grown, plain):
                index.add(ids[part], x[part], None if norms is None else norms[part], half[part])
                if n == 2:  # freed slots, some reused by the next additions
                    index.remove(np.r_[ids[:40], np.arange(10) * 3 + 100_000])
            if n == 3:  # still small: the float32 scan, whose sums run in another order
                assert grown.full is not None and grown.low is None and grown.used <= 500
                (d1, i1), (d2, i2) = grown.search(q, 10), plain.search(q, 10)
                assert np.array_equal(i1, i2)
                np.testing.assert_allclose(d1, d2, rtol=0, atol=1e-5 * (float(np.abs(d2).max()) + 1))
        return grown, plain

    grown, plain = grow(wide=100)
    assert grown.full is None and grown.low is not None and grown.scanning == "bfloat16"
    assert len(grown.wide) == 50 and not grown._aside
    assert grown.nbytes() < 0.75 * plain.nbytes()
    for index in (grown, plain):  # after the switch: added rows are lowered as they come
        index.remove(ids[600:700])
        index.add(ids[600:650], x[600:650], None if norms is None else norms[600:650], half[600:650])
    assert np.array_equal(grown.vectors(), plain.vectors())
    for m in (1, 10):
        (d1, i1), (d2, i2) = grown.search(q, m), plain.search(q, m)
        assert np.array_equal(i1, i2) and np.array_equal(d1, d2)

    grown, plain = grow(wide=20)  # 50 rows without a float16 form: too many to keep aside
    assert grown.full is not None and not grown._aside
    (d1, i1), (d2, i2) = grown.search(q, 10), plain.search(q, 10)
    assert np.array_equal(i1, i2) and np.array_equal(d1, d2)
