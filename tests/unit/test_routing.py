import os
import threading
from fractions import Fraction

import numpy as np
import pytest
import torch
import faiss  # noqa: E402  (after torch, as switchbank.ivf imports them)

from switchbank.errors import Incompatible, InvalidInput
from switchbank.examples import Examples
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


@pytest.mark.parametrize(("dtype", "dim"), [(np.float16, 1280), (np.float32, 768), (np.float16, 7), (np.float32, 3)])
def test_row_keys_are_equal_for_equal_rows_and_differ_for_a_bit(dtype, dim):
    """Examples are shared by the keys of their bytes: equal rows share one, and a row one bit
    away has its own (rows whose bytes are not whole 8-byte words too)."""
    x = np.random.default_rng(0).normal(size=(6, dim)).astype(dtype)
    x[4] = x[1]
    keys = Examples.row_keys(x)
    assert keys[4] == keys[1] and len(set(keys)) == 5
    y = x.copy()
    y.view(np.uint8)[0, -1] ^= 1  # the last byte's lowest bit
    assert Examples.row_keys(y)[0] != keys[0] and Examples.row_keys(y)[1:] == keys[1:]
    assert Examples.row_keys(np.zeros((0, dim), dtype)) == []


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


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_query_embeddings_are_refused_and_huge_finite_ones_kept(metric, bad):
    r = Router(dim=3, k=1, metric=metric)
    x = np.ones((4, 3), dtype=np.float32)
    x[2, 1] = bad
    # float16 rows are told by their exponent bits (their largest finite value is kept)
    for form in (x, x.astype(np.float16), torch.from_numpy(x).half()):
        with pytest.raises(InvalidInput, match="NaN or infinity"):
            r.add("bad", form)
    assert r.tasks == []
    r.add("largest float16", np.full((2, 3), 65504, dtype=np.float16))
    r.remove("largest float16")
    # finite, though its float32 norm overflows (cosine scales the row to zeros): not refused
    r.add("huge", np.full((2, 3), 3e38, dtype=np.float32))
    assert r.tasks == ["huge"]


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


def source_of(data: dict):
    """A router's source over ``data`` (task -> embeddings): the tasks asked for, or all of them."""
    return lambda names: ((t, data[t]) for t in (names if names is not None else sorted(data)))


def clusters(n_tasks, per_task, dim, seed):
    g = np.random.default_rng(seed)
    centres = g.normal(size=(n_tasks, dim)).astype(np.float32)
    return {f"t{i}": centres[i] + 0.3 * g.normal(size=(per_task, dim)).astype(np.float32) for i in range(n_tasks)}, centres


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_approximate_index_agrees_with_exact_search(metric):
    data, centres = clusters(60, 20, 16, seed=0)
    counts = {t: len(v) for t, v in data.items()}
    exact = Router(dim=16, k=10, metric=metric)
    approx = Router(dim=16, k=10, metric=metric, exact_max=200, nprobe=8)
    for r in (exact, approx):
        r.load(source_of(data), counts)
    assert exact.kind == "exact" and approx.kind == "approximate" and len(approx) == 1200
    queries = np.repeat(centres, 5, axis=0) + 0.3 * np.random.default_rng(1).normal(size=(300, 16)).astype(np.float32)
    agree = np.mean([a == b for a, b in zip(exact.counts(queries), approx.counts(queries))])
    assert agree >= 0.95, agree


@pytest.mark.parametrize("fail", ["source", "index"])
def test_a_failed_ivf_build_raises_keeps_the_old_index_and_leaves_no_thread(fail, monkeypatch):
    """The IVF index is filled on a worker thread: a failure of the source (on the builder's
    thread) or of the index (on the worker) must reach the caller, stop the worker, and leave the
    router as it was."""
    import threading

    from switchbank import ivf
    data, _ = clusters(30, 20, 8, seed=4)
    r = Router(dim=8, k=5, exact_max=100, nprobe=4)
    r.add("before", data["t0"])
    passes = []

    def source(names):
        passes.append(names)
        for i, t in enumerate(names if names is not None else sorted(data)):
            if fail == "source" and len(passes) == 2 and i == 5:  # in the second pass, the IVF's
                raise RuntimeError("unreadable")
            yield t, data[t]

    if fail == "index":
        def broken(self, *a, **k):
            raise MemoryError("no room")
        monkeypatch.setattr(ivf.IVF, "add", broken)
    with pytest.raises(RuntimeError if fail == "source" else MemoryError):
        r.load(source, {t: 20 for t in data})
    assert len(passes) == 2 and r.tasks == ["before"] and r.kind == "exact"
    assert not [t for t in threading.enumerate() if t.name == "switchbank-router-index"]


def test_approximate_index_changes_incrementally_and_rebuilds_in_the_background():
    data, _ = clusters(30, 20, 8, seed=2)
    r = Router(dim=8, k=5, exact_max=100, nprobe=4)
    source = source_of(data)
    r.load(source, {t: 20 for t in data})
    assert r.kind == "approximate" and not r.needs_rebuild()
    r.remove("t0")
    assert "t0" not in r.tasks and len(r) == 580
    assert all("t0" not in c for c in r.counts(data["t0"]))
    extra = {f"x{i}": data["t1"] + 100 + i for i in range(40)}
    for t, v in extra.items():
        r.add(t, v)
    data.update(extra)
    del data["t0"]
    assert r.needs_rebuild()
    assert r.rebuild(source, {t: len(v) for t, v in data.items()}, background=False)
    assert r.rebuilds == 1 and len(r) == len(data) * 20 and not r.needs_rebuild()
    assert r.counts(extra["x3"][:1])[0] == {"x3": 5}



@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_tasks_of_a_domain_the_ivf_was_not_trained_on_make_it_rebuild(metric, monkeypatch):
    """New tasks of the domain the IVF's lists were trained on leave it be; tasks of a new domain,
    far from every list centre, make it drift and rebuild, after which it routes them as exact
    search does."""
    from switchbank import ivf
    monkeypatch.setattr(ivf.IVF, "DRIFT_ROWS", 100)
    g = np.random.default_rng(1)

    def domain(centre, n, prefix):  # tasks around a domain's centre, examples around each task's
        return {f"{prefix}{i}": (centre + 0.5 * g.normal(size=16) + 0.2 * g.normal(size=(50, 16))).astype(np.float32)
                for i in range(n)}

    a, b = 3 * g.normal(size=16), 3 * g.normal(size=16)
    data = domain(a, 40, "a")
    r = Router(dim=16, k=10, metric=metric, exact_max=1500, nprobe=4)
    r.load(source_of(data), {t: 50 for t in data})
    assert r.kind == "approximate" and r.stats()["drift"] == 0
    for t, v in domain(a, 10, "more").items():
        data[t] = v
        r.add(t, v)
    assert 0 < r.stats()["drift"] < ivf.IVF.DRIFT and not r.needs_rebuild()
    new = domain(b, 10, "new")
    for t, v in new.items():
        data[t] = v
        r.add(t, v)
    assert r.stats()["added_since_built"] == 1000 and r.stats()["drift"] > 5 * ivf.IVF.DRIFT
    assert r.needs_rebuild() and len(r) < 2 * 2000  # not for its size
    assert r.rebuild(source_of(data), {t: 50 for t in data}, background=False)
    assert r.rebuilds == 1 and r.stats()["drift"] == 0 and not r.needs_rebuild()
    exact = Router(dim=16, k=10, metric=metric)
    exact.load(source_of(data), {t: 50 for t in data})
    queries = np.concatenate([v[:10] for v in new.values()]) + 0.1 * g.normal(size=(100, 16)).astype(np.float32)
    agree = np.mean([x == y for x, y in zip(exact.counts(queries), r.counts(queries))])
    assert agree >= 0.95, agree


def test_a_task_of_a_domain_the_bank_holds_little_of_routes_as_exact_search_does():
    """A bank of many tasks of a few domains and one task of another: the IVF's lists are centred on
    the many, and its queries would probe lists that miss its examples; held apart, they are found."""
    g = np.random.default_rng(2)

    def domain(centre, n, prefix):
        return {f"{prefix}{i}": (centre + 0.5 * g.normal(size=32) + 0.2 * g.normal(size=(50, 32))).astype(np.float32)
                for i in range(n)}

    centres = 3 * g.normal(size=(5, 32))
    data = {t: v for c, centre in enumerate(centres[:4]) for t, v in domain(centre, 30, f"d{c}-").items()}
    data["lone"] = (centres[4] + 0.2 * g.normal(size=(50, 32))).astype(np.float32)
    r = Router(dim=32, k=10, metric="cosine", exact_max=1500, nprobe=2)
    r.load(source_of(data), {t: 50 for t in data})
    exact = Router(dim=32, k=10, metric="cosine")
    exact.load(source_of(data), {t: 50 for t in data})
    queries = (centres[4] + 0.3 * g.normal(size=(40, 32))).astype(np.float32)
    assert all(c == {"lone": 10} for c in exact.counts(queries))
    assert r.counts(queries) == exact.counts(queries)
    assert r.kind == "approximate" and r.stats()["held_apart"] >= 50


def test_changes_made_during_a_background_rebuild_are_replayed_onto_the_new_index(monkeypatch):
    """Adds, replacements and removals while a rebuild runs reach the index it swaps in: most of
    them replayed outside the lock that searches take, the last few with the swap. Searches keep
    answering from the old index meanwhile."""
    import threading
    data, _ = clusters(30, 20, 8, seed=6)
    r = Router(dim=8, k=5, exact_max=100, nprobe=64)  # every list: routes equal exact search's
    r.load(source_of(data), {t: 20 for t in data})
    g = np.random.default_rng(7)
    extra = {f"x{i}": data[f"t{i % 30}"] + 2 * g.normal(size=8).astype(np.float32) for i in range(60)}
    for t, v in list(extra.items())[:40]:  # more than doubled: a rebuild is due
        r.add(t, v)
        data[t] = v
    assert r.needs_rebuild()
    reading, release = threading.Event(), threading.Event()
    seen, main_threads = {}, faiss.omp_get_max_threads()

    def niceness():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def slow(names):  # as the server's source does, it skips tasks removed meanwhile
        for i, t in enumerate(names if names is not None else sorted(data)):
            if i == 3:
                seen.update(nice=niceness(), faiss_threads=faiss.omp_get_max_threads())
                reading.set()
                assert release.wait(30)
            if t in data:
                yield t, data[t]

    assert r.rebuild(slow, {t: len(v) for t, v in data.items()}, background=True)
    assert reading.wait(30)
    replayed = []  # (task, whether the lock was held) for inserts made on the rebuilding thread
    insert = Router._insert
    rebuilder = r._rebuilding

    def spy(state, task, rows, keyed=None):
        if threading.current_thread() is rebuilder and keyed is None:  # the build's own pass keys its rows
            replayed.append((task, r._lock.locked()))
        return insert(state, task, rows, keyed)

    monkeypatch.setattr(Router, "_insert", staticmethod(spy))
    for t, v in list(extra.items())[40:]:
        r.add(t, v)
        data[t] = v
    data["t2"] = data["t2"] + 2 * g.normal(size=8).astype(np.float32)  # replaced
    r.add("t2", data["t2"])
    for t in ("t0", "x1"):
        r.remove(t)
        del data[t]
    assert r.counts(data["t5"][:1])[0] == {"t5": 5}  # the old index answers meanwhile
    release.set()
    while r.stats()["rebuilding"]:
        threading.Event().wait(0.01)
    # the rebuild ran on one faiss thread at a lower CPU priority; the caller's thread kept its own
    assert seen["faiss_threads"] == 1 and seen["nice"] >= min(19, niceness() + 1)
    assert faiss.omp_get_max_threads() == main_threads
    assert r.rebuilds == 1 and sorted(r.tasks) == sorted(data) and len(r) == 20 * len(data)
    late = [(t, held) for t, held in replayed if t.startswith("x") or t == "t2"]
    assert {t for t, _ in late} == {f"x{i}" for i in range(40, 60)} | {"t2"}
    assert not any(held for _, held in late)  # replayed outside the lock that searches take
    exact = Router(dim=8, k=5)
    exact.load(source_of(data), {t: 20 for t in data})
    queries = np.concatenate([v[:2] for v in data.values()]) + 0.05
    got, want = r.counts(queries), exact.counts(queries)
    assert np.mean([a == b for a, b in zip(got, want)]) >= 0.95  # an approximate index
    for t, c in zip(np.repeat(list(data), 2), got):
        assert max(c, key=c.get) == t  # tasks added and replaced meanwhile included
    assert not {"t0", "x1"} & {t for c in got for t in c}

def naive_counts(tasks: dict, queries: np.ndarray, k: int) -> list[dict]:
    """Every example sorted by (distance, position): the definition the router must match."""
    rows = [(t, v) for t, vs in tasks.items() for v in vs]
    out = []
    for q in queries:
        order = sorted(range(len(rows)), key=lambda i: (float(((rows[i][1] - q) ** 2).sum()), i))[:k]
        c = {}
        for i in order:
            c[rows[i][0]] = c.get(rows[i][0], 0) + 1
        out.append(c)
    return out


@pytest.mark.parametrize("exact_max", [10_000, 30])
def test_shared_query_vectors_route_as_every_example_would(exact_max):
    g = np.random.default_rng(5)
    shared = g.normal(size=(12, 6)).astype(np.float32)
    tasks = {}
    for i in range(20):  # copies built from the same example images, and a few of their own
        own = g.normal(size=(3, 6)).astype(np.float32) + 3 * (i % 4)
        tasks[f"copy{i:02d}"] = np.concatenate([shared[g.permutation(12)[:8]], own])
    r = Router(dim=6, k=7, exact_max=exact_max, nprobe=64)
    r.load(source_of(tasks), {t: 11 for t in tasks})
    assert len(r) == 220 and r.stats()["distinct_vectors"] == 12 + 60
    # the router adds in a shuffled order: compare with the naive search in that same order
    order = list(r._tid)
    queries = np.concatenate([shared, g.normal(size=(20, 6)).astype(np.float32) * 3])
    assert r.counts(queries) == naive_counts({t: tasks[t] for t in order}, queries, 7)
    r.remove(order[0])
    assert r.counts(queries) == naive_counts({t: tasks[t] for t in order[1:]}, queries, 7)


@pytest.mark.parametrize("exact_max", [10_000, 30])
def test_repeated_rows_in_one_task_and_tasks_of_new_rows_route_as_every_example_would(exact_max):
    """A task whose block repeats a row, tasks whose rows are all new, and tasks repeating rows of
    both all route as the naive search, and the router holds each distinct row once."""
    g = np.random.default_rng(11)
    tasks = {}
    for i in range(24):
        x = g.normal(size=(6, 5)).astype(np.float32)
        if i % 3 == 1:
            x[4] = x[1]  # a row repeated within the task
        if i % 3 == 2:
            x[:2] = tasks[f"t{i - 1:02d}"][3:5]  # rows of another task, one of them a repeat there
        tasks[f"t{i:02d}"] = x
    r = Router(dim=5, k=6, exact_max=exact_max, nprobe=64)
    r.load(source_of(tasks), {t: 6 for t in tasks})
    order = list(r._tid)
    queries = np.concatenate([tasks["t01"], g.normal(size=(16, 5)).astype(np.float32)])
    assert r.counts(queries) == naive_counts({t: tasks[t] for t in order}, queries, 6)
    assert r.stats()["distinct_vectors"] == 24 * 6 - 8 - 16


@pytest.mark.parametrize("exact_max", [10_000, 30])
def test_one_object_for_many_tasks_is_checked_once_and_routes_as_copies_would(exact_max, monkeypatch):
    """A source may yield one array for every task built from the same examples (SwitchSet does):
    it is checked once per build, and routing equals that over separate copies."""
    g = np.random.default_rng(6)
    blocks = [g.normal(size=(9, 5)).astype(np.float32) + 4 * i for i in range(3)]
    own = g.normal(size=(9, 5)).astype(np.float32)
    tasks = {f"t{i:02d}": blocks[i % 3] for i in range(40)} | {"own": own}
    copies = {t: x.copy() for t, x in tasks.items()}
    checked = []
    real = Router._checked
    monkeypatch.setattr(Router, "_checked", lambda self, task, x: checked.append(task) or real(self, task, x))
    shared, separate = (Router(dim=5, k=6, exact_max=exact_max, nprobe=64) for _ in range(2))
    calls = []
    for r, src in ((shared, tasks), (separate, copies)):
        checked.clear()
        r.load(source_of(src), {t: 9 for t in src})
        assert len(r) == 41 * 9 and r.stats()["distinct_vectors"] == 4 * 9
        calls.append(len(checked))
    assert shared.kind == ("exact" if exact_max > 100 else "approximate")
    assert calls[0] <= 2 * 4 and calls[1] >= 41  # at most once per object and pass; copies every time
    queries = np.concatenate([*blocks, own, g.normal(size=(12, 5)).astype(np.float32) * 4])
    assert shared.counts(queries) == separate.counts(queries)
    assert shared.counts(queries) == naive_counts({t: tasks[t] for t in shared._tid}, queries, 6)


@pytest.mark.parametrize("given", ["float32", "float16 tensor"])
def test_ivf_ranks_float16_query_embeddings_as_exact_search_does(given):
    """Switch files store query embeddings as float16; the IVF index ranks its candidates on them
    at their own scale, so near ties come out as a float32 scan of the unit rows orders them, whether
    they come as float32 values or as the float16 tensor a file read gives (kept as they are)."""
    g = np.random.default_rng(11)
    base = g.normal(size=16)
    x = (40 * base + 0.5 * g.normal(size=(60, 16))).astype(np.float16).astype(np.float32)  # near ties
    if given == "float16 tensor":
        x = torch.from_numpy(x).half()
    tasks = {f"t{i:02d}": x[i:i + 1] for i in range(60)}
    exact = Router(dim=16, k=5, metric="cosine", exact_max=10_000)
    ivf = Router(dim=16, k=5, metric="cosine", exact_max=30, nprobe=64)  # every list: only the ranking differs
    for r in (exact, ivf):
        r.load(source_of(tasks), {t: 1 for t in tasks})
    assert (exact.kind, ivf.kind) == ("exact", "approximate") and list(exact._tid) == list(ivf._tid)
    queries = (base + 0.003 * g.normal(size=(200, 16))).astype(np.float32)
    assert ivf.counts(queries) == exact.counts(queries)


@pytest.mark.parametrize("exact_max", [10_000, 30])
def test_the_same_vectors_as_float16_and_as_float32_route_as_every_example_would(exact_max):
    """Rows that come as float16 are keyed by those bytes, so the same vectors from a float32 source
    are held twice; routing still equals the naive search over every example."""
    g = np.random.default_rng(12)
    shared = g.normal(size=(6, 5)).astype(np.float16)
    tasks = {}
    for i in range(16):
        own = g.normal(size=(3, 5)).astype(np.float16) + 2 * (i % 3)
        block = np.concatenate([shared, own])
        tasks[f"t{i:02d}"] = torch.from_numpy(block) if i % 2 else block.astype(np.float32)
    r = Router(dim=5, k=7, exact_max=exact_max, nprobe=64)
    r.load(source_of(tasks), {t: 9 for t in tasks})
    assert r.stats()["distinct_vectors"] == 2 * 6 + 16 * 3
    order = list(r._tid)
    as32 = {t: np.asarray(tasks[t], dtype=np.float32) for t in order}
    queries = np.concatenate([shared.astype(np.float32), g.normal(size=(20, 5)).astype(np.float32) * 2])
    assert r.counts(queries) == naive_counts(as32, queries, 7)


def test_recent_query_blocks_are_shared_only_when_every_byte_is_equal():
    from switchbank.format import Recent
    recent = Recent(size=2)
    a = bytes(8192)
    b = bytes(4096) + b"\x01" + bytes(4095)  # the same prefix, a different block
    key, hit = recent.get(a, torch.float16, (4, 1024))
    assert hit is None
    t = torch.zeros(4, 1024)
    recent.put(key, a, t)
    assert recent.get(bytes(a), torch.float16, (4, 1024))[1] is t
    assert recent.get(b, torch.float16, (4, 1024))[1] is None
    assert recent.get(a, torch.float16, (8, 512))[1] is None  # another shape
    for i in range(2):
        recent.put(("other", i), b, t)
    assert recent.get(a, torch.float16, (4, 1024))[1] is None and len(recent.blocks) == 2  # bounded


def test_identical_blocks_removed_and_added_again_route_as_every_example_would():
    """Switches replaced over and over with the same or new query blocks: routing stays the naive
    search over the tasks present, and the router keeps no record of blocks no task holds."""
    g = np.random.default_rng(8)
    block = g.normal(size=(5, 4)).astype(np.float32)
    r = Router(dim=4, k=5)
    present = {}
    for i in range(30):
        name = f"t{i % 3}"
        x = block if i % 2 else g.normal(size=(5, 4)).astype(np.float32)
        r.add(name, x)
        present.pop(name, None)
        present[name] = x  # a replaced task goes to the end, as the router re-adds it
    queries = g.normal(size=(10, 4)).astype(np.float32)
    assert r.counts(queries) == naive_counts(present, queries, 5)
    for name in list(present):
        r.remove(name)
    assert len(r) == 0 and r._ex.blocks == {} and r._ex.uid_of == {} and r._ex.more == {}
    assert all(t < 0 for t in r._ex.first_tid)
    r.add("again", block)
    assert r.counts(block) == [{"again": 5}] * 5


def test_the_ivf_module_loads_torch_before_faiss():
    """faiss loaded first made IVF builds 3x slower (two OpenMP runtimes); a fresh process that
    imports the IVF module first must still load torch first."""
    import subprocess
    import sys
    code = ("import sys, switchbank.ivf; m = list(sys.modules); "
            "print(m.index('torch') < m.index('faiss'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.strip() == "True"


def test_exact_limit_follows_the_scan_this_cpu_makes_fast(monkeypatch):
    import switchbank.routing as routing

    def probe_not_expected():
        raise AssertionError("timed the scan for a bank both limits hold")

    r = Router(dim=4)
    monkeypatch.setattr(routing, "bf16_fast", probe_not_expected)
    # a bank of many examples but few distinct vectors (switches sharing their example images)
    shared = np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32)
    r.load(lambda names: ((n, shared) for n in names or []), {f"s{i}": 50 for i in range(1000)})
    assert r.kind == "exact" and len(r) == 50_000 and not r.needs_rebuild()
    for fast, limit in ((True, routing.EXACT_MAX), (False, routing.EXACT_MAX_FLOAT32)):
        monkeypatch.setattr(routing, "bf16_fast", lambda fast=fast: fast)
        assert r.exact_limit() == limit
    assert Router(dim=4, exact_max=7).exact_limit() == 7  # a setting wins
    # the limit decides the index: a bank past the float32 limit gets an IVF index on a CPU
    # without fast bfloat16 products, and stays exact where they are fast, including when its
    # distinct vectors reach exactly the float32 limit (and the IVF's training sample) on the way
    x = np.random.default_rng(0).normal(size=(3 * routing.EXACT_MAX_FLOAT32, 4)).astype(np.float32)
    counts = {f"t{i:03d}": 500 for i in range(x.shape[0] // 500)}

    def source(names):
        for n in names or sorted(counts):
            i = int(n[1:])
            yield n, x[i * 500:(i + 1) * 500]

    for fast, kind in ((False, "approximate"), (True, "exact")):
        monkeypatch.setattr(routing, "bf16_fast", lambda fast=fast: fast)
        r = Router(dim=4)
        r.load(source, counts)
        assert r.kind == kind and len(r) == x.shape[0] and not r.needs_rebuild()


def test_a_first_load_in_the_background_routes_exactly_at_once_and_swaps_in_the_ivf_index(monkeypatch):
    """Loaded in the background (as a server starts), a bank past the fast scan's limit but within
    the exact index's capacity is served by an exact index as soon as it is read, and its IVF index,
    built on another thread at the caller's priority, is swapped in. A bank projected past the
    capacity, or a limit set explicitly, gets its IVF index before load returns."""
    import switchbank.routing as routing
    monkeypatch.setattr(routing, "bf16_fast", lambda: False)
    monkeypatch.setattr(routing, "EXACT_MAX", 4000)
    monkeypatch.setattr(routing, "EXACT_MAX_FLOAT32", 1000)
    monkeypatch.setattr(routing, "TRAIN", 600)
    data, centres = clusters(30, 100, 8, seed=5)  # 3,000 vectors: past the limit, within capacity
    queries = np.concatenate([centres + 0.2, centres - 0.1]).astype(np.float32)
    want = naive_counts(data, queries, 5)
    seen, release = [], threading.Event()

    def source(names):
        seen.append((threading.current_thread(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        if len(seen) > 1:  # the rebuild's pass waits until the exact index has been checked
            assert release.wait(30)
        yield from source_of(data)(names)

    r = Router(dim=8, k=5, nprobe=64)  # every list: the IVF index's routes equal exact search's
    r.load(source, {t: 100 for t in data}, background=True)
    assert r.kind == "exact" and len(r) == 3000 and r.stats()["rebuilding"]
    assert r.counts(queries) == want
    release.set()
    assert r.join(30)
    assert r.kind == "approximate" and r.rebuilds == 1 and len(r) == 3000 and not r.needs_rebuild()
    assert r.counts(queries) == want
    (first, nice), *rebuilds = seen  # the rebuild reads the bank twice: for its sample, for its lists
    assert first is threading.current_thread() and len(rebuilds) == 2
    assert all(t is not first and t_nice == nice for t, t_nice in rebuilds)
    # past the capacity (6,000 projected at the training sample), or with the limit set: IVF at once
    big, _ = clusters(60, 100, 8, seed=6)
    for r, bank in ((Router(dim=8, k=5), big), (Router(dim=8, k=5, exact_max=1000), data)):
        r.load(source_of(bank), {t: 100 for t in bank}, background=True)
        assert r.kind == "approximate" and not r.stats()["rebuilding"] and len(r) == 100 * len(bank)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_a_task_added_after_a_removal_on_a_bfloat16_scan_takes_the_freed_slots(monkeypatch, metric):
    import switchbank.knn as knn
    monkeypatch.setattr(knn, "bf16_fast", lambda: True)
    g = np.random.default_rng(4)

    def cluster():  # a task's examples near one another, far from other tasks'
        return torch.from_numpy((g.normal(size=16) + 0.01 * g.normal(size=(100, 16))).astype(np.float16))

    blocks = {f"t{i:02d}": cluster() for i in range(50)}
    r = Router(dim=16, k=5, metric=metric)
    r.load(lambda names: ((n, blocks[n]) for n in names or sorted(blocks)), {n: 100 for n in blocks})
    assert r.stats()["scan"] == "bfloat16"
    assert r.remove("t00")
    new = cluster()
    r.add("new", new)  # its rows go into the slots t00 left, scattered among the others
    got = r.weights(new[:8].float())
    assert all(w == {"new": 1} for w in got)
    assert all("t00" not in w for w in r.weights(blocks["t00"][:8].float()))


def test_fast_bfloat16_is_read_from_x86_features_not_timed(monkeypatch):
    import switchbank.knn as knn

    def timing_not_expected():
        raise AssertionError("timed the products on x86")

    monkeypatch.setattr(knn, "_bf16_timed", timing_not_expected)
    monkeypatch.setattr(knn.platform, "machine", lambda: "x86_64")
    for bf16, amx, fast in ((True, False, True), (False, True, True), (False, False, False)):
        monkeypatch.setattr(knn, "_BF16_FAST", None)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda bf16=bf16: bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        assert knn.bf16_fast() is fast
        assert knn.bf16_fast() is fast  # decided once
    # elsewhere, the timing decides, once
    calls = []
    monkeypatch.setattr(knn.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(knn, "_BF16_FAST", None)
    monkeypatch.setattr(knn, "_bf16_timed", lambda: calls.append(1) or True)
    assert knn.bf16_fast() and knn.bf16_fast() and calls == [1]


def test_the_default_nprobe_scans_about_9000_vectors_at_least_and_a_setting_overrides_it():
    from switchbank.ivf import ivf_nprobe
    assert ivf_nprobe(256, 1_000_000) == 16
    assert ivf_nprobe(256, 100_000) == 24  # 98.5% agreement at 16 there, 99.5% at 24 (bench.router_index)
    assert ivf_nprobe(100, 500) == 100  # never more lists than there are
    data, _ = clusters(30, 20, 8, seed=2)
    auto, set_ = Router(dim=8, k=5, exact_max=100), Router(dim=8, k=5, exact_max=100, nprobe=4)
    for r in (auto, set_):
        r.load(source_of(data), {t: 20 for t in data})
    assert auto.kind == set_.kind == "approximate"
    assert auto.stats()["nprobe"] == auto.stats()["nlist"] and set_.stats()["nprobe"] == 4


def test_an_ivf_index_is_sized_for_the_whole_bank_when_the_exact_pass_read_past_its_training_sample():
    """The first pass reads the bank into an exact index until it passes the limit; the IVF index
    built then has lists for the bank's projected distinct vectors, not for its training sample."""
    from switchbank.ivf import ivf_lists, ivf_nprobe
    x = np.random.default_rng(3).normal(size=(45_000, 4)).astype(np.float32)
    counts = {f"t{i:03d}": 100 for i in range(450)}

    def source(names):
        for n in names or sorted(counts):
            i = int(n[1:])
            yield n, x[i * 100:(i + 1) * 100]

    r = Router(dim=4, exact_max=25_000)
    r.load(source, counts)
    stats = r.stats()
    assert stats["kind"] == "approximate" and stats["distinct_vectors"] == 45_000
    assert stats["nlist"] == ivf_lists(45_000) and stats["nprobe"] == ivf_nprobe(ivf_lists(45_000), 45_000)


def test_a_new_domain_too_large_to_hold_apart_makes_the_ivf_rebuild_before_it_drifts(monkeypatch):
    """Tasks of a new domain, far from every list centre, are held apart while there is room; once
    half as many again have been turned away the index asks for a rebuild, long before its drift
    (judged only after a twentieth of the index) would, and the rebuilt index routes them as exact
    search does (nearly: these lists are few and small, two of 16 probed)."""
    from switchbank import ivf
    monkeypatch.setattr(ivf.IVF, "SIDE_MAX", 100)
    monkeypatch.setattr(ivf.IVF, "DRIFT_ROWS", 10**9)  # drift alone never fires here
    g = np.random.default_rng(4)

    def domain(centre, n, prefix):
        return {f"{prefix}{i}": (centre + 0.5 * g.normal(size=32) + 0.2 * g.normal(size=(50, 32))).astype(np.float32)
                for i in range(n)}

    a, b = 3 * g.normal(size=32), 3 * g.normal(size=32)
    data = domain(a, 60, "a")
    r = Router(dim=32, k=10, metric="cosine", exact_max=1500, nprobe=2)
    r.load(source_of(data), {t: 50 for t in data})
    held = r.stats()["held_apart"]
    assert r.kind == "approximate" and r.stats()["turned_away"] == 0 and not r.needs_rebuild()
    monkeypatch.setattr(ivf.IVF, "SIDE_MAX", held + 150)  # little room
    for t, v in domain(a, 40, "more").items():  # more of the same domain: no reason to rebuild
        data[t] = v
        r.add(t, v)
    assert r.stats()["turned_away"] < 50 and not r.needs_rebuild()
    held = r.stats()["held_apart"]
    monkeypatch.setattr(ivf.IVF, "SIDE_MAX", held + 150)  # room for three new tasks' rows
    new = domain(b, 10, "new")
    index = r._index
    for i, (t, v) in enumerate(new.items(), 1):
        assert (index._far(r.prepare(v))[0] > ivf.IVF.SIDE_FAR * index.typical()).all()  # all far
        data[t] = v
        r.add(t, v)
        away = max(0, 50 * i - 150)
        assert r.stats()["held_apart"] == held + min(150, 50 * i) and r.stats()["turned_away"] == away
        crowded = away >= max((held + 150) // 2, (2000 + 50 * i) // 10)  # half SIDE_MAX, a tenth of all added
        assert r.stats()["drift"] == 0 and r.needs_rebuild() == crowded, i
    assert r.needs_rebuild()
    assert r.rebuild(source_of(data), {t: 50 for t in data}, background=False)
    assert r.stats()["turned_away"] == 0 and not r.needs_rebuild()
    exact = Router(dim=32, k=10, metric="cosine")
    exact.load(source_of(data), {t: 50 for t in data})
    queries = np.concatenate([v[:10] for v in new.values()]) + 0.1 * g.normal(size=(100, 32)).astype(np.float32)
    agree = np.mean([x == y for x, y in zip(exact.counts(queries), r.counts(queries))])
    assert agree >= 0.95, agree


@pytest.mark.parametrize(("tasks", "kind"), [(450, "approximate"), (240, "exact")])
def test_the_first_pass_stops_at_the_training_sample_where_the_bank_will_not_fit(tasks, kind):
    """A bank projected past EARLY times the exact limit (45,000 vectors against 25,000) is read
    once up to the IVF's training sample, then once in full for the IVF; one that fits is read
    once, into the exact index."""
    from switchbank.routing import TRAIN
    x = np.random.default_rng(3).normal(size=(tasks * 100, 4)).astype(np.float32)
    counts = {f"t{i:03d}": 100 for i in range(tasks)}
    read = []

    def source(names):
        for n in names or sorted(counts):
            read.append(n)
            i = int(n[1:])
            yield n, x[i * 100:(i + 1) * 100]

    r = Router(dim=4, exact_max=25_000)
    r.load(source, counts)
    assert r.kind == kind and r.stats()["distinct_vectors"] == tasks * 100
    assert len(read) == (TRAIN // 100 + tasks if kind == "approximate" else tasks)


def test_a_background_rebuild_keeps_its_indexing_to_one_thread(monkeypatch):
    """The IVF index's adds run on a thread of their own; in a background rebuild that thread,
    like the rebuild's, leaves the work to faiss on one thread (ivf.one_thread), where the first
    build's use torch's products."""
    import threading
    from switchbank import ivf
    seen = []
    add = ivf.IVF.add

    def recording(self, *args, **kw):
        seen.append((threading.current_thread().name, ivf.alone()))
        return add(self, *args, **kw)

    monkeypatch.setattr(ivf.IVF, "add", recording)
    data, _ = clusters(30, 20, 8, seed=2)
    r = Router(dim=8, k=5, exact_max=100, nprobe=4)
    r.load(source_of(data), {t: 20 for t in data})
    assert seen and all(name == "switchbank-router-index" and not a for name, a in seen)
    seen.clear()
    for i in range(40):
        r.add(f"x{i}", data["t1"] + 100 + i)
    assert all(not a for _, a in seen)  # uploads: on the caller's thread
    seen.clear()
    everything = {**data, **{f"x{i}": data["t1"] + 100 + i for i in range(40)}}
    assert r.needs_rebuild() and r.rebuild(source_of(everything), {t: 20 for t in everything})
    rebuilder = r._rebuilding
    if rebuilder is not None:  # unless it has finished already
        rebuilder.join()
    assert r.rebuilds == 1
    assert seen and all(name == "switchbank-router-index" and a for name, a in seen)


def test_an_exact_limit_below_sixteen_vectors_still_builds_an_ivf_index():
    """An IVF index gets no more lists than it has training rows: with a limit of 5 and 12 vectors
    the build used to fail in k-means (fewer rows than centres)."""
    g = np.random.default_rng(0)
    data = {f"t{i}": g.normal(size=(4, 8)).astype(np.float32) for i in range(3)}
    r, exact = Router(dim=8, k=3, exact_max=5), Router(dim=8, k=3)
    for router in (r, exact):
        router.load(source_of(data), {t: 4 for t in data})
    assert r.kind == "approximate" and r.stats()["nlist"] <= 12
    q = np.concatenate(list(data.values())) + 0.01
    assert r.counts(q) == exact.counts(q)  # every list probed


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_the_router_holds_rows_of_every_form_and_leaves_the_callers_alone(metric):
    """float32 arrays and tensors, strided, float64, float16 and bfloat16 rows are held as unit rows
    (cosine) or as given (l2), and the caller's rows are not changed (the cosine metric scales its
    own copy in place)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    forms = {"numpy": base.numpy().copy(), "tensor": base.clone(), "strided": base.T.contiguous().T,
             "float64": base.double().numpy(), "float16": base.half(), "bfloat16": base.bfloat16(),
             "float16 numpy, reversed": base.half().numpy()[::-1]}
    for name, rows in forms.items():
        before = rows.clone() if isinstance(rows, torch.Tensor) else rows.copy()
        want = before.float() if isinstance(rows, torch.Tensor) else torch.from_numpy(np.array(before, dtype=np.float32))
        if metric == "cosine":
            want = torch.nn.functional.normalize(want, dim=1)
        r = Router(dim=8, k=1, metric=metric)
        r.add("t", rows)
        held = r._index.vectors()
        assert held.flags.c_contiguous, name
        np.testing.assert_allclose(held, want.numpy(), rtol=1e-6, atol=1e-6, err_msg=name)
        same = torch.equal(rows, before) if isinstance(rows, torch.Tensor) else np.array_equal(rows, before)
        assert same, name


@pytest.mark.parametrize("exact_max", [10_000, 30])
def test_float16_rows_left_for_the_index_to_scale_route_as_rows_scaled_at_once(exact_max, monkeypatch):
    """For the cosine metric, float16 rows (a file's) reach the index unscaled and are made unit
    rows there (examples.Rows), alone or in one IVF batch with rows that came as float32: the routes
    are those of the same rows scaled as they were read, and for exact search those of the same
    values given as float32."""
    g = np.random.default_rng(13)
    values = {f"t{i:02d}": (g.normal(size=(5, 6)) + 3 * (i % 4)).astype(np.float16) for i in range(24)}
    forms = {t: (torch.from_numpy(v) if i % 3 == 0 else v if i % 3 == 1 else v.astype(np.float32))
             for i, (t, v) in enumerate(values.items())}
    queries = np.concatenate([v.astype(np.float32) for v in values.values()] + [g.normal(size=(30, 6)).astype(np.float32) * 3])

    def routes():
        r = Router(dim=6, k=7, metric="cosine", exact_max=exact_max, nprobe=64)
        r.load(source_of(forms), {t: 5 for t in forms})
        assert r.kind == ("exact" if exact_max > 1000 else "approximate") and r.stats()["distinct_vectors"] == 24 * 5
        r.add("late", torch.from_numpy(values["t00"]))  # after the build: the same rows, another task
        return r.counts(queries)

    left = []  # whether each read left x out
    read = Router._rows

    def spy(self, e):
        rows = read(self, e)
        left.append(rows.x is None)
        return rows

    monkeypatch.setattr(Router, "_rows", spy)
    got = routes()
    assert sum(left) >= 16 + 1 and not all(left)  # the float16 tasks' (and the late one's), not the others'
    # every row scaled as it is read
    monkeypatch.setattr(Router, "_rows", lambda self, e: read(self, e).made())
    assert got == routes()
    assert any(row.get("late") for row in got)
    if exact_max > 1000:
        ref = Router(dim=6, k=7, metric="cosine")
        ref.load(source_of({t: v.astype(np.float32) for t, v in values.items()}), {t: 5 for t in values})
        ref.add("late", values["t00"].astype(np.float32))
        assert got == ref.counts(queries)


def test_the_indexing_thread_makes_rows_in_one_buffer_with_the_norms_of_each_task_alone():
    """Float16 rows for the cosine metric reach the IVF index's thread with neither unit rows nor
    norms (examples.Rows); it makes both a batch at a time, in one buffer that every batch reuses,
    and they equal what each task's rows give alone, to the bit."""
    from switchbank.knn import unit_rows
    from switchbank.routing import _Batched

    g = np.random.default_rng(21)
    blocks = [(3 * g.normal(size=(int(g.integers(5, 20)), 16))).astype(np.float16) for _ in range(100)]
    seen = []

    class Index:
        def add(self, ids, x, norms, half):
            buffer = batched._unit
            seen.append((ids.copy(), x.copy(), norms.copy(), half.copy(), id(buffer), np.shares_memory(x, buffer.numpy())))

    r = Router(dim=16, metric="cosine")
    batched = _Batched(Index(), size=200)
    at = 0
    for block in blocks:
        rows = r._checked("t", block)
        assert rows.x is None and rows.norms is None  # left to the index
        batched.add(np.arange(at, at + len(block)), *rows)
        at += len(block)
    batched.close()
    assert len(seen) >= 5 and len({s[4] for s in seen}) == 1 and all(s[5] for s in seen)  # one buffer for all
    ids = np.concatenate([s[0] for s in seen])
    assert np.array_equal(ids, np.arange(at))
    x, norms = np.concatenate([s[1] for s in seen]), np.concatenate([s[2] for s in seen])
    alone = [unit_rows(None, None, b) for b in blocks]
    assert np.array_equal(x, np.concatenate([a[0] for a in alone]))
    assert np.array_equal(norms, np.concatenate([a[1] for a in alone]))
    want = torch.nn.functional.normalize(torch.from_numpy(np.concatenate(blocks)).float(), dim=1)
    np.testing.assert_allclose(x, want.numpy(), rtol=1e-6, atol=1e-7)
