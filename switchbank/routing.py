"""The Auto-Switch router: k nearest neighbours over every switch's query embeddings.

For an input embedding x, w_t = |N_K(x) ∩ Q_t| / K: the share of its K nearest query examples
(Euclidean, or by angle with ``metric="cosine"``) that belong to task t. Each request is routed on
its own; weights come back as integer counts over K so that equal routes compare equal exactly.

Two indexes, chosen by the number of query vectors:
- up to ``exact_max`` vectors, exact search as one matrix product and a top-k (faiss's flat index
  does not use BLAS for fewer than 20 queries, which made it several times slower than a plain
  product for a micro-batch);
- above, an inverted-file index with 8-bit scalar quantisation (faiss IndexIVFScalarQuantizer):
  about a byte per dimension per vector, and a search that scans ``nprobe`` of ``nlist`` lists.
  Its lists are trained on a sample; tasks are added and removed incrementally, and when the index
  has grown or shrunk by half since it was trained, a rebuild runs in the background (``rebuild``,
  from the caller's source of embeddings) while the old index keeps answering. Its parameters were
  chosen by measurement (bench/scale.py): routing equal to exact search on at least 99% of inputs.
Ties in distance go to the earlier-added example, so routing is deterministic.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable
from fractions import Fraction

import faiss
import numpy as np
import torch

from .errors import Incompatible, InvalidInput

log = logging.getLogger(__name__)
METRICS = ("l2", "cosine")
EXACT_MAX = 20_000  # vectors; exact search of a micro-batch stays well under a millisecond per 1,000
# source(tasks) yields (task, embeddings) for the given tasks, or for every task when tasks is None
Source = Callable[[list[str] | None], Iterable[tuple[str, np.ndarray]]]


def ivf_lists(n: int) -> int:
    """Inverted lists for ``n`` vectors: about 2 sqrt(n), at least 16, at most 1024 (assigning
    a million 1280-d vectors to 1024 lists is most of a 10,000-switch start-up on two cores)."""
    return int(min(1024, max(16, 2 * math.sqrt(max(n, 1)))))


class _Exact:
    """All vectors in one float32 matrix, in insertion order."""

    kind = "exact"

    def __init__(self, dim: int, ip: bool):
        self.dim, self.ip = dim, ip
        self.parts: dict[int, np.ndarray] = {}  # task id -> vectors, in insertion order
        self._matrix: tuple[torch.Tensor, np.ndarray, torch.Tensor] | None = None

    def add(self, tid: int, x: np.ndarray) -> None:
        self.parts[tid] = x
        self._matrix = None

    def remove(self, tid: int) -> None:
        if self.parts.pop(tid, None) is not None:
            self._matrix = None

    @property
    def ntotal(self) -> int:
        return sum(p.shape[0] for p in self.parts.values())

    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts.values())

    def search(self, x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """(distance, owner task id, position) of the m nearest vectors per row, sorted."""
        if self._matrix is None:
            mat = np.concatenate(list(self.parts.values())) if self.parts else np.zeros((0, self.dim), np.float32)
            owners = np.concatenate([np.full(p.shape[0], t, np.int64) for t, p in self.parts.items()]) \
                if self.parts else np.zeros(0, np.int64)
            t = torch.from_numpy(mat)
            self._matrix = (t, owners, (t * t).sum(1))
        mat, owners, sq = self._matrix
        q = torch.from_numpy(x)
        dots = q @ mat.T
        # ranking only needs |x|^2 - 2 x.q (Euclidean) or -x.q (angle, on unit vectors)
        dist = -dots if self.ip else sq.unsqueeze(0) - 2 * dots
        d, pos = torch.topk(dist, m, dim=1, largest=False, sorted=True)
        return d.numpy(), owners[pos.numpy()], pos.numpy()


class _IVF:
    """faiss IVF with 8-bit scalar quantisation; vector ids are global insertion positions."""

    kind = "approximate"

    def __init__(self, dim: int, ip: bool, nlist: int, nprobe: int, train: np.ndarray):
        metric = faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2
        self.quantizer = faiss.IndexFlatIP(dim) if ip else faiss.IndexFlatL2(dim)
        self.index = faiss.IndexIVFScalarQuantizer(self.quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, metric)
        self.index.cp.niter = 10
        self.index.train(np.ascontiguousarray(train, dtype=np.float32))
        self.index.nprobe = min(nprobe, nlist)
        self.ip, self.dim, self.nlist = ip, dim, nlist
        self.trained_on = int(train.shape[0])
        self.built_on = 0  # vectors when it was built; a rebuild is due once that has halved or doubled
        self.owner = np.zeros(0, np.int64)  # global id -> task id (-1 once removed)
        self.ids: dict[int, np.ndarray] = {}
        self.next_id = 0

    def add(self, tid: int, x: np.ndarray) -> None:
        ids = np.arange(self.next_id, self.next_id + x.shape[0], dtype=np.int64)
        self.next_id += x.shape[0]
        if self.next_id > self.owner.size:
            grown = np.full(max(self.next_id, 2 * self.owner.size), -1, np.int64)
            grown[:self.owner.size] = self.owner
            self.owner = grown
        self.owner[ids] = tid
        self.index.add_with_ids(x, ids)
        self.ids[tid] = ids

    def remove(self, tid: int) -> None:
        ids = self.ids.pop(tid, None)
        if ids is not None:
            self.index.remove_ids(faiss.IDSelectorBatch(ids))
            self.owner[ids] = -1

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def nbytes(self) -> int:
        return int(self.index.ntotal) * (self.index.code_size + 8) + self.nlist * self.dim * 4 + self.owner.nbytes

    def search(self, x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d, ids = self.index.search(x, m)
        if self.ip:
            d = -d
        valid = ids >= 0
        owners = np.where(valid, self.owner[np.where(valid, ids, 0)], -1)
        d = np.where(valid, d, np.inf)
        return d, owners, ids


class Router:
    """k-NN routing over task query embeddings; tasks come and go without a rebuild."""

    def __init__(self, dim: int, k: int = 10, metric: str = "l2", *, exact_max: int = EXACT_MAX, nprobe: int = 32):
        if k < 1:
            raise InvalidInput(f"K must be at least 1, got {k}")
        if metric not in METRICS:
            raise InvalidInput(f"router metric must be one of {METRICS}, got {metric!r}")
        self.dim, self.k, self.metric = int(dim), int(k), metric
        self.exact_max, self.nprobe = int(exact_max), int(nprobe)
        self._index: _Exact | _IVF = _Exact(self.dim, metric == "cosine")
        self._tid: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._next_tid = 0
        self._lock = threading.Lock()
        self._journal: list[tuple[str, str, np.ndarray | None]] | None = None  # changes during a rebuild
        self._rebuilding: threading.Thread | None = None
        self.rebuilds = 0

    # --- the task set ------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        with self._lock:
            return sorted(self._tid)

    def __len__(self) -> int:
        return self._index.ntotal

    @property
    def kind(self) -> str:
        return self._index.kind

    def prepare(self, embeddings: torch.Tensor | np.ndarray) -> np.ndarray:
        """float32 rows as the index holds them (unit length for the cosine metric)."""
        if isinstance(embeddings, torch.Tensor):
            embeddings = embeddings.detach().to("cpu", torch.float32).numpy()
        x = np.array(embeddings, dtype=np.float32, copy=True, order="C")
        if self.metric == "cosine" and x.ndim == 2 and x.shape[0]:
            x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x

    def _checked(self, task: str, embeddings) -> np.ndarray:
        x = self.prepare(embeddings)
        if x.ndim != 2 or x.shape[1] != self.dim or x.shape[0] == 0:
            raise Incompatible(f"task {task!r}: query embeddings of shape {x.shape} do not fit a {self.dim}-d router")
        if not np.isfinite(x).all():
            raise InvalidInput(f"task {task!r}: query embeddings contain NaN or infinity")
        return x

    def add(self, task: str, embeddings: torch.Tensor | np.ndarray) -> None:
        """Add (or replace) a task's query embeddings."""
        x = self._checked(task, embeddings)
        with self._lock:
            self._remove_locked(task)
            tid = self._next_tid
            self._next_tid += 1
            self._tid[task], self._names[tid] = tid, task
            self._index.add(tid, x)
            if self._journal is not None:
                self._journal.append(("add", task, x))

    def remove(self, task: str) -> bool:
        with self._lock:
            if self._journal is not None:
                self._journal.append(("remove", task, None))
            return self._remove_locked(task)

    def _remove_locked(self, task: str) -> bool:
        tid = self._tid.pop(task, None)
        if tid is None:
            return False
        self._index.remove(tid)
        del self._names[tid]
        return True

    # --- routing -----------------------------------------------------------------------------
    def counts(self, embeddings: torch.Tensor | np.ndarray) -> list[dict[str, int]]:
        """Per row, how many of its K nearest query examples each task owns (they sum to K,
        or to the index size if smaller). Ties in distance go to the earlier-added example."""
        x = self.prepare(embeddings)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise Incompatible(f"embeddings of shape {x.shape} do not fit a {self.dim}-d router")
        with self._lock:
            total = self._index.ntotal
            if total == 0:
                return [{} for _ in range(x.shape[0])]
            k = min(self.k, total)
            # a margin beyond K, then order by (distance, position): equal distances must not
            # depend on the order a search happens to return them in
            dist, owners, pos = self._index.search(x, min(total, 2 * k))
            names = self._names
            out = []
            for drow, orow, prow in zip(dist, owners, pos):
                order = sorted((float(d), int(p), int(o)) for d, o, p in zip(drow, orow, prow) if o >= 0)[:k]
                row: dict[str, int] = {}
                for _, _, o in order:
                    t = names[o]
                    row[t] = row.get(t, 0) + 1
                out.append(row)
            return out

    def weights(self, embeddings: torch.Tensor | np.ndarray) -> list[dict[str, Fraction]]:
        """Auto-Switch weights per row: counts / K as exact fractions."""
        return [{t: Fraction(c, sum(row.values())) for t, c in row.items()} for row in self.counts(embeddings)]

    # --- building and rebuilding -------------------------------------------------------------
    def load(self, source: Source, counts: dict[str, int]) -> None:
        """Replace every task with those of ``source``, choosing the index by the number of vectors
        (``counts``: task -> rows). Embeddings are streamed: an exact index reads every task once;
        an IVF index reads a sample of tasks to train on, then every task once, so a caller can read
        them from files instead of holding them all."""
        index, tids, names = self._build(source, counts)
        with self._lock:
            self._index, self._tid, self._names = index, tids, names
            self._next_tid = max(names, default=-1) + 1

    def _build(self, source: Source, counts: dict[str, int]):
        total = sum(counts.values())
        ip = self.metric == "cosine"
        if total <= self.exact_max:
            index = _Exact(self.dim, ip)
        else:
            nlist = ivf_lists(total)
            # train on whole tasks picked at random, about 40 rows per list (faiss's minimum is 39)
            tasks = sorted(counts)
            order = np.random.default_rng(0).permutation(len(tasks))
            picked, rows = [], 0
            for i in order:
                if rows >= 40 * nlist:
                    break
                picked.append(tasks[i])
                rows += counts[tasks[i]]
            train = np.concatenate([self._checked(t, e) for t, e in source(picked)])
            nlist = min(nlist, max(1, train.shape[0] // 39))
            index = _IVF(self.dim, ip, nlist, self.nprobe, train)
        tids, names = {}, {}
        for tid, (task, emb) in enumerate(source(None)):
            index.add(tid, self._checked(task, emb))
            tids[task], names[tid] = tid, task
        if isinstance(index, _IVF):
            index.built_on = index.ntotal
        log.info("router: %s index over %d vectors of %d tasks", index.kind, index.ntotal, len(tids))
        return index, tids, names

    def needs_rebuild(self) -> bool:
        n = self._index.ntotal
        if isinstance(self._index, _Exact):
            return n > self.exact_max
        built = self._index.built_on
        return n < self.exact_max // 2 or n > 2 * built or n < built // 2

    def rebuild(self, source: Source, counts: dict[str, int], background: bool = True) -> bool:
        """Rebuild the index from ``source`` if it has drifted; changes made meanwhile are replayed
        onto the new index. Returns whether a rebuild started (or ran)."""
        with self._lock:
            if self._rebuilding is not None or not self.needs_rebuild():
                return False
            self._journal = []

        def work():
            try:
                index, tids, names = self._build(source, counts)
                with self._lock:
                    for op, task, x in self._journal or ():
                        tid = tids.pop(task, None)
                        if tid is not None:
                            index.remove(tid)
                            del names[tid]
                        if op == "add":
                            tid = max(names, default=-1) + 1
                            index.add(tid, x)
                            tids[task], names[tid] = tid, task
                    self._index, self._tid, self._names = index, tids, names
                    self._next_tid = max(names, default=-1) + 1
                    self.rebuilds += 1
            except Exception:
                log.exception("router rebuild failed; the current index keeps serving")
            finally:
                with self._lock:
                    self._journal, self._rebuilding = None, None

        if not background:
            with self._lock:
                self._rebuilding = threading.current_thread()
            work()
            return True
        t = threading.Thread(target=work, name="switchbank-router-rebuild", daemon=True)
        with self._lock:
            self._rebuilding = t
        t.start()
        return True

    def stats(self) -> dict:
        idx = self._index
        out = {"kind": idx.kind, "vectors": idx.ntotal, "tasks": len(self._tid), "bytes": idx.nbytes(),
               "metric": self.metric, "k": self.k, "rebuilds": self.rebuilds, "rebuilding": self._rebuilding is not None}
        if isinstance(idx, _IVF):
            out.update(nlist=idx.nlist, nprobe=idx.index.nprobe, trained_on=idx.trained_on, built_on=idx.built_on)
        return out
