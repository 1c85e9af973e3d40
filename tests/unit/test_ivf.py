"""The IVF index: its rows kept as given, rows far from every list held apart, its k-means and
list assignment on torch's products, and its build on a background thread."""

import numpy as np
import pytest
import torch

from switchbank import ivf
from switchbank.ivf import IVF
from tests.unit.test_knn import truth


@pytest.mark.parametrize("norms", [False, True])
def test_ivf_keeps_the_same_rows_whether_ids_come_in_a_row_or_scattered(norms):
    """A build adds ids in a row, written in place in blocks; later adds scatter. Both must keep
    each row exactly as x * norm rounds to float16."""
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
    best, at = ivf.nearest_centres(x, c, l2, block=128)  # several blocks, the last one short
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
        return float(ivf.nearest_centres(x, torch.as_tensor(c), True)[0].sum())

    ours, theirs = [], []
    for seed in range(5):  # medians: a single start lands in a better or a worse local optimum
        c = ivf.kmeans(x, 32, 10, spherical, seed=seed)
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
    c = ivf.kmeans(x, 8, 5, spherical=False, seed=0)
    assert c.shape == (8, 16) and torch.isfinite(c).all()
    assert float(ivf.nearest_centres(x, c, True)[0].max()) < 5  # every row near a centre (3^2 + 3^2 apart)


def test_an_ivf_built_on_a_background_thread_leaves_the_work_to_faiss():
    """A rebuild's thread (one_thread) trains and assigns with faiss, one thread; the index it
    makes answers as one built with torch's products does."""
    import threading
    g = np.random.default_rng(4)
    x = g.normal(size=(3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    built = {}

    def build(name):
        if name == "background":
            ivf.one_thread()
        index = IVF(32, True, 16, 16, x[:1000])
        index.add(np.arange(3000), x)
        built[name] = (index, ivf.alone())

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
