"""The Auto-Switch router: k nearest neighbours over every switch's query embeddings (faiss).

For an input embedding x, w_t = |N_K(x) ∩ Q_t| / K: the share of its K nearest query examples
(Euclidean) that belong to task t. Each request is routed on its own; weights come back as integer
counts over K so that equal routes compare equal exactly.
"""

from __future__ import annotations

import threading
from fractions import Fraction

import faiss
import numpy as np
import torch

from .errors import Incompatible, InvalidInput


METRICS = ("l2", "cosine")


class Router:
    """A faiss flat L2 index whose vectors carry ids, so tasks come and go without a rebuild.

    ``metric="l2"`` is the paper's Euclidean distance on raw embeddings; ``"cosine"`` L2-normalises
    queries and inputs first (ranking by angle), which routes better when embedding norms differ
    a lot between tasks.
    """

    def __init__(self, dim: int, k: int = 10, metric: str = "l2"):
        if k < 1:
            raise InvalidInput(f"K must be at least 1, got {k}")
        if metric not in METRICS:
            raise InvalidInput(f"router metric must be one of {METRICS}, got {metric!r}")
        self.dim, self.k, self.metric = int(dim), int(k), metric
        self._index = faiss.IndexIDMap2(faiss.IndexFlatL2(self.dim))
        self._ids: dict[str, np.ndarray] = {}
        self._owner: dict[int, str] = {}
        self._next_id = 0
        self._lock = threading.Lock()

    @property
    def tasks(self) -> list[str]:
        with self._lock:
            return sorted(self._ids)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def _prepare(self, embeddings: torch.Tensor | np.ndarray) -> np.ndarray:
        if isinstance(embeddings, torch.Tensor):
            embeddings = embeddings.detach().to("cpu", torch.float32).numpy()
        x = np.array(embeddings, dtype=np.float32, copy=True, order="C")
        if self.metric == "cosine" and x.ndim == 2 and x.shape[0]:
            x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x

    def add(self, task: str, embeddings: torch.Tensor | np.ndarray) -> None:
        """Add (or replace) a task's query embeddings."""
        x = self._prepare(embeddings)
        if x.ndim != 2 or x.shape[1] != self.dim or x.shape[0] == 0:
            raise Incompatible(f"task {task!r}: query embeddings of shape {x.shape} do not fit a {self.dim}-d router")
        if not np.isfinite(x).all():
            raise InvalidInput(f"task {task!r}: query embeddings contain NaN or infinity")
        with self._lock:
            self._remove_locked(task)
            ids = np.arange(self._next_id, self._next_id + x.shape[0], dtype=np.int64)
            self._next_id += x.shape[0]
            self._index.add_with_ids(x, ids)
            self._ids[task] = ids
            self._owner.update((int(i), task) for i in ids)

    def remove(self, task: str) -> bool:
        with self._lock:
            return self._remove_locked(task)

    def _remove_locked(self, task: str) -> bool:
        ids = self._ids.pop(task, None)
        if ids is None:
            return False
        self._index.remove_ids(ids)
        for i in ids:
            del self._owner[int(i)]
        return True

    def counts(self, embeddings: torch.Tensor | np.ndarray) -> list[dict[str, int]]:
        """Per row, how many of its K nearest query examples each task owns (they sum to K,
        or to the index size if smaller). Ties in distance go to the earlier-added example."""
        x = self._prepare(embeddings)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise Incompatible(f"embeddings of shape {x.shape} do not fit a {self.dim}-d router")
        with self._lock:
            total = int(self._index.ntotal)
            if total == 0:
                return [{} for _ in range(x.shape[0])]
            k = min(self.k, total)
            # Ask for a margin beyond K and order by (distance, id) ourselves: faiss does not
            # promise an order among equal distances, and routing must be deterministic.
            dist, ids = self._index.search(x, min(total, 2 * k))
            owner = self._owner
            out = []
            for drow, irow in zip(dist, ids):
                order = sorted((float(d), int(i)) for d, i in zip(drow, irow) if i >= 0)[:k]
                row: dict[str, int] = {}
                for _, i in order:
                    t = owner[i]
                    row[t] = row.get(t, 0) + 1
                out.append(row)
            return out

    def weights(self, embeddings: torch.Tensor | np.ndarray) -> list[dict[str, Fraction]]:
        """Auto-Switch weights per row: counts / K as exact fractions."""
        return [{t: Fraction(c, sum(row.values())) for t, c in row.items()} for row in self.counts(embeddings)]
