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


@pytest.mark.parametrize("norms", [False, True])
def test_ivf_keeps_the_same_rows_whether_ids_come_in_a_row_or_scattered(norms):
    """A build adds ids in a row, written in place in blocks; later adds scatter. Both must keep
    each row exactly as x * norm rounds to float16."""
    from switchbank.knn import IVF
    g = np.random.default_rng(3)
    x = g.normal(size=(2600, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    scale = (1 + 9 * g.random(2600)).astype(np.float32) if norms else None
    in_row, scattered = (IVF(16, True, 16, 4, x[:500], capacity=8) for _ in range(2))
    in_row.add(np.arange(2600), x, scale)
    order = g.permutation(2600)
    for part in np.array_split(order, 7):
        scattered.add(part, x[part], None if scale is None else scale[part])
    want = torch.from_numpy(x if scale is None else x * scale[:, None]).half()
    assert torch.equal(in_row.full[:2600], want) and torch.equal(scattered.full[:2600], want)
    assert torch.equal(in_row.norm[:2600], scattered.norm[:2600])
    d1, i1 = in_row.search(x[:20], 5)
    d2, i2 = scattered.search(x[:20], 5)
    assert (i1 == i2).all() and np.array_equal(d1, d2)


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


def lopsided(ip: bool, seed: int = 5):
    """Four tasks' many rows around their centres and one new domain's few rows around a centre of
    its own, far from all of them (an IVF's lists trained on the four leave it none)."""
    g = np.random.default_rng(seed)
    centres = 3 * g.normal(size=(5, 32)).astype(np.float32)
    common = np.repeat(centres[:4], 1500, axis=0) + g.normal(size=(6000, 32)).astype(np.float32)
    rare = centres[4] + g.normal(size=(40, 32)).astype(np.float32)
    queries = centres[4] + g.normal(size=(12, 32)).astype(np.float32)
    if ip:
        common, rare, queries = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in (common, rare, queries))
    return common[g.permutation(6000)], rare, queries  # the first rows, an IVF's training sample, of all four


@pytest.mark.parametrize("ip", [True, False])
def test_rows_far_from_every_list_are_held_apart_and_searched_exactly(ip, monkeypatch):
    """Rows of a domain the lists were not centred on lie in lists that their own queries do not
    probe; held apart and scanned exactly, they are found as an exact search finds them."""
    from switchbank.knn import IVF
    common, rare, queries = lopsided(ip)
    x = np.concatenate([common, rare])
    ids = np.arange(x.shape[0])
    order = np.random.default_rng(0).permutation(x.shape[0])
    want, _ = truth(x, ids, queries, ip, 10)

    def built():
        index = IVF(32, ip, 16, 2, common[:2000])
        for part in np.array_split(order, 5):
            index.add(ids[part], x[part])
        return index

    monkeypatch.setattr(IVF, "SIDE_FAR", float("inf"))  # none held apart
    plain = built()
    assert plain.side_ids.size == 0 and plain.ntotal == x.shape[0]
    if ip:  # the inner product's lists miss them (Euclidean ones happen not to, on these rows)
        assert (np.sort(plain.search(queries, 10)[1], 1) != np.sort(want, 1)).any(axis=1).sum() >= 2
    monkeypatch.undo()
    index = built()
    assert set(range(6000, 6040)) <= set(index.side_ids.tolist()) and index.side_ids.size <= IVF.SIDE_MAX
    assert index.ntotal == x.shape[0] == index.index.ntotal
    assert np.array_equal(np.sort(index.search(queries, 10)[1], 1), np.sort(want, 1))
    # rows of the four tasks are still found where they were
    near = common[::500] + 0.01
    assert np.array_equal(index.search(near, 1)[1][:, 0], truth(x, ids, near, ip, 1)[0][:, 0])


@pytest.mark.parametrize("ip", [True, False])
def test_rows_held_apart_stay_within_the_limit_and_leave_when_removed(ip, monkeypatch):
    """The farthest SIDE_MAX rows are held apart; those that farther ones displace are still found
    in their lists; removed rows, held apart or not, are never returned, and none twice."""
    from switchbank.knn import IVF
    monkeypatch.setattr(IVF, "SIDE_MAX", 15)
    common, rare, _ = lopsided(ip)
    index = IVF(32, ip, 16, 16, common[:2000])  # every list probed: whatever is in a list is found
    index.add(np.arange(6000), common)
    far = index._far(rare)[0]
    by_far = np.argsort(far)
    index.add(6000 + by_far[:20], rare[by_far[:20]])  # the nearer half first, then the farther
    held_first = set(index.side_ids.tolist())
    index.add(6000 + by_far[20:], rare[by_far[20:]])
    x = np.concatenate([common, rare])
    all_far = index._far(x)[0]
    farthest = np.argsort(all_far)[-15:]
    assert all_far[farthest].min() > IVF.SIDE_FAR * index.typical()
    assert sorted(index.side_ids.tolist()) == sorted(farthest.tolist())
    assert index.ntotal == 6040
    assert np.array_equal(index.search(rare, 1)[1][:, 0], truth(x, np.arange(6040), rare, ip, 1)[0][:, 0])
    displaced = sorted(held_first - set(index.side_ids.tolist()))
    assert len(held_first) == 15 and displaced  # by the new domain's farther rows
    assert index.search(x[displaced], 1)[1][:, 0].tolist() == displaced
    gone = [int(farthest[-1]), displaced[-1], int(np.argmin(all_far))]  # held apart, displaced, never apart
    index.remove(gone)
    assert index.ntotal == 6037 and index.side_ids.size == 14
    _, got = index.search(np.concatenate([rare, common[:50]]), 30)
    assert not set(got.ravel().tolist()) & set(gone)
    assert all(len(set(row)) == len(row) for row in got.tolist())


@pytest.mark.parametrize("l2", [True, False])
def test_nearest_centres_are_those_of_a_brute_force_search(l2):
    g = torch.Generator().manual_seed(7)
    x, c = torch.randn(1000, 24, generator=g), torch.randn(40, 24, generator=g)
    best, at = knn.nearest_centres(x, c, l2, block=128)  # several blocks, the last one short
    d = torch.cdist(x.double(), c.double()) ** 2 if l2 else -(x.double() @ c.double().T)
    assert torch.equal(at, d.argmin(1))
    want = d.min(1).values if l2 else -d.min(1).values
    torch.testing.assert_close(best.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spherical", [True, False])
def test_kmeans_fits_as_well_as_faiss(spherical):
    """The centres the IVF index is trained with fit the rows as closely as faiss's k-means does
    (the sum of each row's squared distance to its nearest centre), on clustered rows."""
    import faiss
    g = torch.Generator().manual_seed(3)
    x = (4 * torch.randn(40, 48, generator=g))[torch.randint(0, 40, (6000,), generator=g)]
    x += torch.randn(6000, 48, generator=g)
    if spherical:
        x = torch.nn.functional.normalize(x, dim=1)

    def fit(c):
        return float(knn.nearest_centres(x, torch.as_tensor(c), True)[0].sum())

    ours, theirs = [], []
    for seed in range(5):  # medians: a single start lands in a better or a worse local optimum
        c = knn.kmeans(x, 32, 10, spherical, seed=seed)
        if spherical:
            torch.testing.assert_close(c.norm(dim=1), torch.ones(32))
        ours.append(fit(c))
        km = faiss.Kmeans(48, 32, niter=10, spherical=spherical, seed=1234 + seed)
        km.train(x.numpy())
        theirs.append(fit(km.centroids))
    assert np.median(ours) <= 1.05 * np.median(theirs)
    assert max(ours) < 0.5 * fit(x[:32])  # and far better than rows taken as centres


def test_kmeans_refills_centres_left_empty():
    # 5 distinct rows for 8 centres: centres lose every row, and each is refilled by splitting the
    # largest cluster rather than left as a division by zero
    x = torch.eye(5, 16).repeat(40, 1) * 3
    c = knn.kmeans(x, 8, 5, spherical=False, seed=0)
    assert c.shape == (8, 16) and torch.isfinite(c).all()
    assert float(knn.nearest_centres(x, c, True)[0].max()) < 5  # every row near a centre (3^2 + 3^2 apart)


def test_an_ivf_built_on_a_background_thread_leaves_the_work_to_faiss():
    """A rebuild's thread (one_thread) trains and assigns with faiss, one thread; the index it
    makes answers as one built with torch's products does."""
    import threading
    from switchbank.knn import IVF
    g = np.random.default_rng(4)
    x = g.normal(size=(3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    built = {}

    def build(name):
        if name == "background":
            knn.one_thread()
        index = IVF(32, True, 16, 16, x[:1000])
        index.add(np.arange(3000), x)
        built[name] = (index, knn.alone())

    for name in ("background", "foreground"):
        t = threading.Thread(target=build, args=(name,))
        t.start()
        t.join()
    assert built["background"][1] and not built["foreground"][1]
    want = np.argsort(-(x[:50] @ x.T), axis=1)[:, :5]
    for index, _ in built.values():
        assert index.ntotal == 3000
        d, i = index.search(x[:50], 5)  # every list probed: exact
        assert (i == want).all()


@pytest.mark.parametrize("ip", [True, False])
def test_the_ivf_quantiser_is_trained_as_faiss_trains_it(ip):
    """The IVF index fits its 8-bit quantiser to the sample's residuals itself; faiss's own train,
    given the same list centres, fits the same one."""
    import faiss
    from switchbank.knn import IVF
    g = np.random.default_rng(6)
    x = g.normal(size=(2000, 24)).astype(np.float32)
    if ip:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = IVF(24, ip, 16, 4, x)
    q = faiss.IndexFlatIP(24) if ip else faiss.IndexFlatL2(24)
    q.add(index.centres.numpy())
    theirs = faiss.IndexIVFScalarQuantizer(q, 24, 16, faiss.ScalarQuantizer.QT_8bit,
                                           faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2)
    theirs.train(x)
    assert index.index.is_trained
    np.testing.assert_allclose(faiss.vector_to_array(index.index.sq.trained), faiss.vector_to_array(theirs.sq.trained),
                               rtol=1e-6, atol=1e-6)
