"""The Auto-Switch router: k nearest neighbours over every switch's query embeddings.

For an input embedding x, w_t = |N_K(x) ∩ Q_t| / K: the share of its K nearest query examples
(Euclidean, or by angle with ``metric="cosine"``) that belong to task t. Each request is routed on
its own; weights come back as integer counts over K so that equal routes compare equal exactly.
Ties in distance go to the earlier-added example, so routing is deterministic.

Query embeddings come from the pretrained encoder, so switches built from the same example images
(per-customer fine-tunes of one task, say) share identical query vectors. The index holds each
distinct vector once and keeps the list of examples (task, position) it stands for (examples.py); a
neighbour search over distinct vectors, expanded into examples, is exactly the search over all
examples.

The index is exact (knn.py) up to a limit of distinct vectors and an IVF index (ivf.py) with exact
re-ranking above, chosen when the index is built; by default the limit follows the scan this CPU
makes fast (EXACT_MAX with a fast bfloat16 product, EXACT_MAX_FLOAT32 without). A router given an
accelerator (the backbone's) holds the exact index there instead (knn_device.py), up to what its
budget of device bytes holds; past that, the IVF index on the CPU. Tasks are added
and removed incrementally; when the index has grown or shrunk by half since it was built, crossed
the limit, or (IVF) holds added vectors far from the ones its lists were trained on (ivf.IVF.drift,
ivf.IVF.crowded), ``rebuild`` builds a new one in the background from the caller's source of
embeddings while the old one keeps answering, then replays the changes made meanwhile. A server's
first load does not wait for an IVF index where an exact one can hold the bank: it answers exactly
at once, and the IVF index is built in the background and swapped in (``Router.load``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable
from fractions import Fraction

import numpy as np
import torch

from .allocator import release_freed_memory
from .errors import Incompatible, InvalidInput
from .examples import Examples, Keyed, Rows
from .format import all_finite
from .ivf import IVF, alone, ivf_lists, ivf_nprobe, one_thread
from .knn import Exact, bf16_fast, unit_rows
from .knn_device import DeviceExact
from .priority import lower_this_thread

log = logging.getLogger(__name__)
METRICS = ("l2", "cosine")
# Distinct vectors searched exactly, by default. Where a bfloat16 product is fast (knn.bf16_fast),
# a batch of 16 takes 18-24 ms over 100,000 1280-d vectors (bfloat16 scan checked in float32), where
# the IVF index takes 9-11 ms but gives the exact answer's weights on only 97% of the demo's held-out
# images (bench.router_index); at 200,000 the exact index holds 1-1.5 GB (four bytes a dimension, six
# for switch files older than format version 2) and scans in about two demo-tower forwards. Where it
# is not (AVX2 without AVX512-BF16), a batch of 16 over the float32 scan (knn.scores) took 9.3 ms
# at 20,000 vectors, 16 ms at 40,000, 29 ms at 70,000 and 45 ms at 100,000, against the IVF index's
# 21-25 ms at every one of those sizes (which it holds by scanning about 9,000 vectors a query,
# ivf.ivf_nprobe), with 99.4-99.8% of the exact weights from 40,000 on; so the limit is 60,000.
EXACT_MAX = 200_000
EXACT_MAX_FLOAT32 = 60_000
# Device memory for the exact index's float32 rows where the router has an accelerator: 2 GiB holds
# 419,000 1280-d vectors (4,190 distinct switches of 100 examples), a million 512-d ones
DEVICE_BYTES = 2 << 30
TRAIN = 20_000  # vectors an IVF index is trained on
# The first pass over a bank stops at TRAIN vectors where the distinct vectors it projects for the
# whole bank (from the share of examples read, in random task order) reach EARLY times the exact
# limit; else it reads on to the limit. A projection that far off would need the unread tasks to
# share their examples far more than the read ones do; if it was, the bank gets an IVF index it
# could have done without (needs_rebuild turns one back into an exact index below half the limit).
# At 2 rather than 1.25, a bank of 1,000 distinct switches (100,000 vectors, limit 60,000) was read
# to 60,000 vectors, and those read twice.
EARLY = 1.25
# source(tasks) yields (task, embeddings) for the given tasks, or for every task when tasks is None
Source = Callable[[list[str] | None], Iterable[tuple[str, np.ndarray]]]


class _Batched:
    """Adds to an IVF index in batches of about ``size`` vectors, on a thread of its own.

    An IVF index assigns the vectors of one call to its lists in one matrix product (a call per
    switch's hundred vectors took 25% longer: 60,000 random 1280-d vectors, 512 lists, against
    batches of 5,000). faiss releases the GIL while it assigns and encodes, so the next switches'
    embeddings are read and keyed meanwhile; one batch waits at most, so memory stays bounded.
    ``close`` waits for the last batch and raises what the indexing raised, if anything.

    Rows left for the index to make (Rows) are made in one float32 buffer that every batch reuses:
    a new one per batch (42 MB and more) was mapped afresh each time, and the kernel's zeroing of
    its pages took an eighth of the CPU time of reading a bank of 10,000 distinct switches (perf).
    """

    def __init__(self, index: IVF, size: int = 8192):
        self.index, self.size = index, size
        self.parts: list[tuple] = []
        self.held = 0
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._unit: torch.Tensor | None = None  # the worker's buffer for rows it makes (see above)
        # a background rebuild's builder keeps its faiss work to one thread: so does its indexer (the
        # count is each thread's own; the lower priority is inherited)
        self._alone = alone()
        self._worker = threading.Thread(target=self._work, name="switchbank-router-index", daemon=True)
        self._worker.start()

    def _work(self) -> None:
        if self._alone:
            one_thread()
        while (batch := self._queue.get()) is not None:
            if self._error is None:  # after a failure, only drain: the builder learns at close
                try:
                    self.index.add(*self._made(*batch))
                except BaseException as exc:  # close re-raises it on the builder's thread
                    self._error = exc
        self._unit = None

    def _made(self, ids: np.ndarray, x: np.ndarray | None, norms: np.ndarray | None, half: np.ndarray | None):
        """The batch with x made in the worker's buffer where it was left out."""
        if x is None and half is not None:
            n, dim = half.shape
            if self._unit is None or self._unit.shape[0] < n or self._unit.shape[1] != dim:
                self._unit = torch.empty((max(n, self.size + self.size // 8), dim))
            x, norms = unit_rows(None, norms, half, out=self._unit)
        return ids, x, norms, half

    def add(self, ids: np.ndarray, *rows) -> None:
        """Add rows under ``ids``: (x, norms, half) as IVF.add takes them."""
        self.parts.append((ids, *rows))
        self.held += len(ids)
        if self.held >= self.size:
            self._send()

    def _send(self) -> None:
        if self.held:
            parts = self.parts
            if any(p[1] is None for p in parts) and not all(p[1] is None for p in parts):
                # rows left for the index to make (Rows), beside rows that came whole: made here
                parts = [(p[0], *Rows(*p[1:]).made()) if p[1] is None else p for p in parts]
            # a part that some block lacks (rows that did not come as float16, say) is left out
            self._queue.put(tuple(None if any(p is None for p in part) else np.concatenate(part)
                                  for part in zip(*parts)))
        self.parts, self.held = [], 0

    def close(self, send: bool = True) -> None:
        """Index what is held (unless ``send`` is false: the build failed) and wait for the worker."""
        if self._worker.is_alive():
            if send:
                self._send()
            self._queue.put(None)
            self._worker.join()
        self.parts, self.held = [], 0
        if send and self._error is not None:
            raise self._error


class Router:
    """k-NN routing over task query embeddings; tasks come and go without a rebuild."""

    REPLAY_LOCKED = 8  # changes made during a rebuild that are replayed under the lock, with the swap

    def __init__(self, dim: int, k: int = 10, metric: str = "l2", *, exact_max: int | None = None,
                 nprobe: int | None = None, device: torch.device | str | None = None,
                 device_bytes: int = DEVICE_BYTES):
        """``nprobe``: lists the IVF index searches per query; by default it follows the index's size
        (ivf.ivf_nprobe). ``device``: where the exact index is held and scanned (knn_device), up to
        ``device_bytes`` of float32 rows; None (or no bytes): on the CPU."""
        if k < 1:
            raise InvalidInput(f"K must be at least 1, got {k}")
        if metric not in METRICS:
            raise InvalidInput(f"router metric must be one of {METRICS}, got {metric!r}")
        self.dim, self.k, self.metric = int(dim), int(k), metric
        self._exact_max = None if exact_max is None else int(exact_max)
        self.nprobe = None if nprobe is None else int(nprobe)
        self.device = None if device is None or device_bytes <= 0 else torch.device(device)
        self.device_bytes = int(device_bytes)
        self._index: Exact | DeviceExact | IVF = self._exact(0)
        self._ex = Examples()
        self._tid: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._lock = threading.Lock()
        self._journal: list[tuple[str, str, Rows | None]] | None = None  # changes during a rebuild
        self._rebuilding: threading.Thread | None = None
        self.rebuilds = 0

    # --- the task set ------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        with self._lock:
            return sorted(self._tid)

    def __len__(self) -> int:
        """Query examples (not distinct vectors)."""
        return self._ex.count

    @property
    def kind(self) -> str:
        return self._index.kind

    def exact_limit(self) -> int:
        """Distinct vectors searched exactly: the setting, or by default what the device bytes hold
        where the router has an accelerator, else EXACT_MAX where a bfloat16 scan is fast and
        EXACT_MAX_FLOAT32 where not (knn.bf16_fast)."""
        known = self._known_limit()
        if known is not None:
            return known
        return EXACT_MAX if bf16_fast() else EXACT_MAX_FLOAT32

    def _known_limit(self) -> int | None:
        """The exact limit where no timing enters it: the setting, or what the device bytes hold."""
        if self._exact_max is not None:
            return self._exact_max
        return self.device_bytes // (4 * self.dim) if self.device is not None else None

    def _exact_floor(self) -> int:
        """The least the exact limit can be, known without timing anything: an index of at most
        this many vectors is exact whatever the timing says."""
        known = self._known_limit()
        return known if known is not None else EXACT_MAX_FLOAT32

    def _exact(self, capacity: int) -> Exact | DeviceExact:
        """An empty exact index: on the router's device where it has one and can allocate there."""
        if self.device is not None:
            try:
                return DeviceExact(self.dim, self.metric == "cosine", self.device, capacity)
            except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is one
                log.warning("router: cannot hold its index on %s (%s); searching on the CPU", self.device, exc)
                self.device = None
        return Exact(self.dim, self.metric == "cosine", capacity=capacity)

    def prepare(self, embeddings: torch.Tensor | np.ndarray) -> np.ndarray:
        """float32 rows as the index holds them (unit length for the cosine metric)."""
        return self._rows(embeddings).unit()

    def _rows(self, embeddings) -> Rows:
        half = None
        if isinstance(embeddings, np.ndarray) and embeddings.dtype == np.float16:
            embeddings = torch.from_numpy(np.ascontiguousarray(embeddings))
        if isinstance(embeddings, torch.Tensor):
            t = embeddings.detach().cpu()
            if t.dtype == torch.float16:
                t = t.contiguous()
                half = t.numpy()
                if self.metric == "cosine" and t.dim() == 2 and t.shape[0]:
                    return Rows(None, None, half)  # made by the index (see Rows)
            # torch converts float16 35x faster than numpy does (6 against 209 us for 100 1280-d rows)
            own = t.dtype != torch.float32  # a converted copy, which the router may keep as it is
            t = t.float().contiguous()
        else:
            x = np.asarray(embeddings)
            own = x.dtype != np.float32 or not x.flags.c_contiguous
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if not own:  # the caller's array: the router keeps a copy
            t = t.clone(memory_format=torch.contiguous_format)
        if self.metric == "cosine" and t.dim() == 2 and t.shape[0]:
            # on torch and in place: 0.07-0.08 s for the 100,000 1280-d float16 rows of 1,000
            # switches, against 0.18-0.22 s for numpy's norm and division and their temporaries
            norms = torch.linalg.vector_norm(t, dim=1).clamp_min_(1e-12)
            return Rows(t.div_(norms.unsqueeze(1)).numpy(), norms.numpy(), half)
        return Rows(t.numpy(), None, half)

    def _checked(self, task: str, embeddings) -> Rows:
        rows = self._rows(embeddings)
        shape = rows.shape
        if len(shape) != 2 or shape[1] != self.dim or shape[0] == 0:
            raise Incompatible(f"task {task!r}: query embeddings of shape {shape} do not fit a {self.dim}-d router")
        # a row with NaN or infinity has a norm that is not finite, so for the cosine metric the norms
        # tell; float16 rows tell by their exponent bits; the rows themselves are checked only where
        # neither can (no norms, or one overflowed)
        if rows.half is not None:
            finite = all_finite(rows.half)
        else:
            finite = (rows.norms is not None and all_finite(rows.norms)) or all_finite(rows.x)
        if not finite:
            raise InvalidInput(f"task {task!r}: query embeddings contain NaN or infinity")
        return rows

    @staticmethod
    def _insert(state, task: str, rows: Rows, keyed: Keyed | None = None) -> None:
        index, ex, tids, names = state
        tid, new, at = ex.add(keyed or Examples.keys(rows))
        if new.size == rows.shape[0]:  # every row (in order, as add returns them): no copy to take
            index.add(new, *rows)
        elif new.size:
            index.add(new, *(None if part is None else part[at] for part in rows))
        tids[task], names[tid] = tid, task

    @staticmethod
    def _delete(state, task: str) -> bool:
        index, ex, tids, names = state
        tid = tids.pop(task, None)
        if tid is None:
            return False
        index.remove(ex.remove(tid))
        del names[tid]
        return True

    def _state(self):
        return self._index, self._ex, self._tid, self._names

    def add(self, task: str, embeddings: torch.Tensor | np.ndarray) -> None:
        """Add (or replace) a task's query embeddings."""
        rows = self._checked(task, embeddings)
        with self._lock:
            self._delete(self._state(), task)
            self._insert(self._state(), task, rows)
            if self._journal is not None:
                self._journal.append(("add", task, rows))

    def remove(self, task: str) -> bool:
        with self._lock:
            if self._journal is not None:
                self._journal.append(("remove", task, None))
            return self._delete(self._state(), task)

    # --- routing -----------------------------------------------------------------------------
    def counts(self, embeddings: torch.Tensor | np.ndarray) -> list[dict[str, int]]:
        """Per row, how many of its K nearest query examples each task owns (they sum to K,
        or to the number of examples if smaller). Ties in distance go to the earlier-added example."""
        x = self.prepare(embeddings)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise Incompatible(f"embeddings of shape {x.shape} do not fit a {self.dim}-d router")
        with self._lock:
            distinct = self._index.ntotal
            if distinct == 0:
                return [{} for _ in range(x.shape[0])]
            k = min(self.k, self._ex.count)
            # a margin beyond K distinct vectors: equal distances must not depend on the order a
            # search happens to return them in
            dist, uids = self._index.search(x, min(distinct, 2 * k))
            out = []
            for drow, urow in zip(dist, uids):
                row: dict[str, int] = {}
                for tid in self._ex.nearest(drow, urow, k):
                    t = self._names[tid]
                    row[t] = row.get(t, 0) + 1
                out.append(row)
            return out

    def weights(self, embeddings: torch.Tensor | np.ndarray) -> list[dict[str, Fraction]]:
        """Auto-Switch weights per row: counts / K as exact fractions."""
        return [{t: Fraction(c, sum(row.values())) for t, c in row.items()} for row in self.counts(embeddings)]

    # --- building and rebuilding -------------------------------------------------------------
    def load(self, source: Source, counts: dict[str, int], background: bool = False) -> None:
        """Replace every task with those of ``source``, which yields (task, embeddings) for the
        tasks in ``counts`` (task -> rows). Embeddings are streamed, so a caller can read them from
        files: one pass when the distinct vectors fit the exact index, two when they do not.

        With ``background``, a bank past the exact limit but within the exact index's capacity
        (EXACT_MAX; a limit set explicitly is the capacity too, so the IVF index is then built
        before this returns) is served at once by an exact index, and its IVF index is built
        in the background from ``source`` and swapped in when done (:meth:`join` waits for it). A
        server is then ready before the IVF is trained, and routes exactly meanwhile: at 1,000
        distinct switches on a CPU without fast bfloat16 products, a server was ready in 4.3-4.5 s
        from start, against 5.5-5.8 s for the IVF's two passes and training first."""
        state = self._build(source, counts, first=background)
        with self._lock:
            self._index, self._ex, self._tid, self._names = state
        release_freed_memory()  # the build's temporaries: 250 MB at 3,006 distinct switches, in 12 ms
        if background and self.needs_rebuild():
            self.rebuild(source, counts, gentle=False)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for a background rebuild, if one runs; returns whether none runs any more."""
        with self._lock:
            t = self._rebuilding
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
            return not t.is_alive()
        return t is None

    def _build(self, source: Source, counts: dict[str, int], first: bool = False):
        """A new index's state from ``source``. ``first``: an exact index may hold the bank up to
        its capacity rather than to the limit of a fast scan (see :meth:`load`)."""
        ip = self.metric == "cosine"
        # in random task order, so that the first vectors are a fair sample to train an IVF on
        names = sorted(counts)
        order = [names[i] for i in np.random.default_rng(0).permutation(len(names))]
        examples = sum(counts.values())
        floor = self._exact_floor()
        known = self._known_limit()
        cap = known if known is not None else EXACT_MAX
        state = (self._exact(min(examples, cap + 1)), Examples(), {}, {})
        for task, rows, keyed in self._prepared(source(order)):
            self._insert(state, task, rows, keyed)
            n = state[0].ntotal
            if n <= floor and n < TRAIN:  # neither check below can fire: no need to time the scan
                continue
            limit = cap if first else self.exact_limit()
            # past the IVF's training sample, stop early where the bank is on course for EARLY times
            # the exact index's limit: every vector read so far is read again for the IVF
            if n > limit or (n >= TRAIN and n * examples > EARLY * limit * state[1].count):
                break
        else:
            state[0].ready()
            log.info("router: exact index (%s scan), %d distinct vectors of %d examples, %d tasks",
                     state[0].scanning, state[0].ntotal, state[1].count, len(state[2]))
            return state
        train = state[0].vectors(TRAIN)
        # the bank's distinct vectors, projected from the share of its examples read so far
        seen = state[0].ntotal
        distinct = max(seen, int(examples * seen / max(1, state[1].count)))
        # no more lists than training rows (a tiny exact limit): k-means needs a row per centre
        nlist = min(ivf_lists(distinct), max(16, train.shape[0] // 39), train.shape[0])
        nprobe = ivf_nprobe(nlist, distinct) if self.nprobe is None else self.nprobe
        ivf = IVF(self.dim, ip, nlist, nprobe, train, capacity=distinct + distinct // 8)
        batched = _Batched(ivf)
        state = (batched, Examples(), {}, {})
        try:
            for task, rows, keyed in self._prepared(source(order)):
                self._insert(state, task, rows, keyed)
        except BaseException:
            batched.close(send=False)
            raise
        batched.close()
        state = (ivf, *state[1:])
        ivf.built_on, ivf.tracking = ivf.ntotal, True
        log.info("router: IVF index (%d lists, nprobe %d), %d distinct vectors of %d examples, %d tasks",
                 nlist, state[0].index.nprobe, state[0].ntotal, state[1].count, len(state[2]))
        return state

    def _prepared(self, pairs: Iterable[tuple[str, np.ndarray]], size: int = 32):
        """(task, rows as indexed, their keys) for a source's (task, embeddings). A source
        that yields one object for tasks sharing their examples (SwitchSet does, for bytes equal
        to a block it read lately) has it checked, normalised and keyed once: reading a bank of 10,000
        switches built from six example sets spent 6 s doing that again for every switch."""
        recent: dict[int, tuple] = {}  # id(embeddings) -> (embeddings, Rows, Keyed); holding it keeps the id
        for task, emb in pairs:
            hit = recent.get(id(emb))
            if hit is None or hit[0] is not emb:
                rows = self._checked(task, emb)
                if len(recent) >= size:
                    recent.pop(next(iter(recent)))
                hit = recent[id(emb)] = (emb, rows, Examples.keys(rows))
            yield task, hit[1], hit[2]

    def needs_rebuild(self) -> bool:
        n = self._index.ntotal
        if isinstance(self._index, (Exact, DeviceExact)):
            return n > self._exact_floor() and n > self.exact_limit()
        built = self._index.built_on
        return (n < self.exact_limit() // 2 or n > 2 * built or n < built // 2
                or self._index.drift() > self._index.DRIFT or self._index.crowded())

    def rebuild(self, source: Source, counts: dict[str, int] | Callable[[], dict[str, int]],
                background: bool = True, gentle: bool = True) -> bool:
        """Rebuild the index from ``source`` if it has drifted; changes made meanwhile are replayed
        onto the new index. ``counts`` (or a function that makes them, called only if a rebuild
        starts): every task's number of examples. Returns whether a rebuild started (or ran).

        A ``gentle`` rebuild in the background runs on one thread at a lower priority, leaving the
        cores to requests. The one that finishes a start-up (:meth:`load`) is not: the exact index
        that answers meanwhile scans every vector, 1.3-1.5 times the IVF's k-NN time at 1,000
        distinct switches, and on 2 cores a gentle build took about 10 s to replace it, against
        2.3-3.4 s."""
        with self._lock:
            if self._rebuilding is not None or not self.needs_rebuild():
                return False
            self._journal = []
        if callable(counts):
            counts = counts()

        def replay(state, changes):
            for op, task, rows in changes:
                self._delete(state, task)
                if op == "add":
                    self._insert(state, task, rows)

        def work():
            try:
                state = self._build(source, counts)
                # Changes made meanwhile are replayed onto the new index, which no one else sees
                # yet, outside the lock that searches take, until few are left; those and the swap
                # happen under it. (A rebuild at 3,000 distinct switches takes seconds, uploads
                # meanwhile can be hundreds, and adding one switch's 100 vectors to the IVF index
                # took 1.6 ms and more: searches would wait that long for the swap.)
                while True:
                    with self._lock:
                        changes, self._journal = self._journal, []
                        if len(changes) <= self.REPLAY_LOCKED:
                            replay(state, changes)
                            self._index, self._ex, self._tid, self._names = state
                            self.rebuilds += 1
                            break
                    replay(state, changes)
            except Exception:
                log.exception("router rebuild failed; the current index keeps serving")
            finally:
                with self._lock:
                    self._journal, self._rebuilding = None, None
            release_freed_memory()

        with self._lock:
            self._rebuilding = threading.current_thread()
        if not background:
            work()
            return True

        def in_background():
            if gentle:
                lower_this_thread()
                one_thread()
            work()

        t = threading.Thread(target=in_background, name="switchbank-router-rebuild", daemon=True)
        with self._lock:
            self._rebuilding = t
        t.start()
        return True

    def stats(self) -> dict:
        idx = self._index
        out = {"kind": idx.kind, "examples": self._ex.count, "distinct_vectors": idx.ntotal, "tasks": len(self._tid),
               "bytes": idx.nbytes(), "metric": self.metric, "k": self.k, "rebuilds": self.rebuilds,
               "rebuilding": self._rebuilding is not None}
        if isinstance(idx, (Exact, DeviceExact)):
            out.update(scan=idx.scanning)
        if isinstance(idx, IVF):
            out.update(nlist=idx.nlist, nprobe=idx.index.nprobe, candidates=idx.candidates,
                       trained_on=idx.trained_on, built_on=idx.built_on, added_since_built=idx.added_rows,
                       drift=round(idx.drift(), 3), held_apart=int(idx.side_ids.size), turned_away=idx.turned_away)
        return out
