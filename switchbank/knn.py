"""Nearest-neighbour indexes over unique vectors, keyed by integer ids (the router's backends).

- ``Exact``: every vector in one float32 matrix; a search is one matrix product and a top-k
  (faiss's flat index does not use BLAS for fewer than 20 queries, which made it several times
  slower than a plain product for a micro-batch).
- ``IVF``: candidates from an inverted-file index with 8-bit scalar quantisation (faiss
  IndexIVFScalarQuantizer, about a byte per dimension per vector), scanning ``nprobe`` of
  ``nlist`` lists, then the candidates ranked by exact distances on the full vectors, kept as
  float16, so quantisation never reorders neighbours.
Both return distances in ascending order (Euclidean squared up to a per-query constant, or minus the
inner product for unit vectors).
"""

from __future__ import annotations

import math

import numpy as np
import torch

# torch before faiss: each wheel bundles its own libgomp, and with faiss's loaded first, building an
# IVF index of 100,000 vectors took 3x as long on the machine measured (4.1 s against 11.7 s)
import faiss  # noqa: E402


def ivf_lists(n: int) -> int:
    """Inverted lists for ``n`` vectors: about 2 sqrt(n), between 16 and 1024 (assigning a million
    1280-d vectors to 1024 lists is most of a 10,000-switch index build on two cores)."""
    return int(min(1024, max(16, 2 * math.sqrt(max(n, 1)))))


class Exact:
    kind = "exact"

    def __init__(self, dim: int, ip: bool):
        self.dim, self.ip = dim, ip
        self.rows: dict[int, np.ndarray] = {}
        self._matrix: tuple[torch.Tensor, np.ndarray, torch.Tensor] | None = None

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        for i, row in zip(ids.tolist(), x):
            self.rows[i] = row
        self._matrix = None

    def remove(self, ids) -> None:
        for i in ids:
            self.rows.pop(int(i), None)
        self._matrix = None

    @property
    def ntotal(self) -> int:
        return len(self.rows)

    def nbytes(self) -> int:
        return len(self.rows) * self.dim * 4

    def search(self, x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        if self._matrix is None:
            ids = np.fromiter(self.rows, np.int64, len(self.rows))
            mat = torch.from_numpy(np.stack(list(self.rows.values())) if self.rows else np.zeros((0, self.dim), np.float32))
            self._matrix = (mat, ids, (mat * mat).sum(1))
        mat, ids, sq = self._matrix
        dots = torch.from_numpy(x) @ mat.T
        # ranking needs only |v|^2 - 2 v.q (Euclidean) or -v.q (angle, on unit vectors)
        dist = -dots if self.ip else sq.unsqueeze(0) - 2 * dots
        d, pos = torch.topk(dist, min(m, dist.shape[1]), dim=1, largest=False, sorted=True)
        return d.numpy(), ids[pos.numpy()]


class IVF:
    kind = "approximate"

    def __init__(self, dim: int, ip: bool, nlist: int, nprobe: int, train: np.ndarray, candidates: int = 64,
                 capacity: int = 0):
        metric = faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2
        self.quantizer = faiss.IndexFlatIP(dim) if ip else faiss.IndexFlatL2(dim)
        self.index = faiss.IndexIVFScalarQuantizer(self.quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, metric)
        self.index.cp.niter = 10
        self.index.train(np.ascontiguousarray(train, dtype=np.float32))
        self.index.nprobe = min(nprobe, nlist)
        self.dim, self.ip, self.nlist, self.candidates = dim, ip, nlist, candidates
        self.trained_on = int(train.shape[0])
        self.built_on = 0  # vectors when it was built: a rebuild is due once that has halved or doubled
        # by id, for the exact ranking; rows of ids never added are never read, so growing it
        # leaves them unwritten (zeroing a million rows was a tenth of a big bank's start-up)
        self.full = torch.empty((capacity, dim), dtype=torch.float16)

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        top = int(ids.max()) + 1 if ids.size else 0
        if top > self.full.shape[0]:
            grown = torch.empty((max(top, 2 * self.full.shape[0]), self.dim), dtype=torch.float16)
            grown[:self.full.shape[0]] = self.full
            self.full = grown
        self.full[torch.from_numpy(ids)] = torch.from_numpy(x).half()
        self.index.add_with_ids(x, ids)

    def remove(self, ids) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size:
            self.index.remove_ids(faiss.IDSelectorBatch(ids))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def nbytes(self) -> int:
        return int(self.index.ntotal) * (self.index.code_size + 8) + self.nlist * self.dim * 4 + self.full.numel() * 2

    def search(self, x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        _, ids = self.index.search(x, max(m, self.candidates))
        valid = torch.from_numpy(ids >= 0)
        flat = torch.from_numpy(np.where(ids >= 0, ids, 0).reshape(-1))
        vecs = self.full.index_select(0, flat).view(ids.shape[0], ids.shape[1], self.dim).float()
        dots = torch.bmm(vecs, torch.from_numpy(x).unsqueeze(2)).squeeze(2)
        dist = -dots if self.ip else (vecs * vecs).sum(2) - 2 * dots
        dist = torch.where(valid, dist, torch.tensor(float("inf")))
        d, order = torch.topk(dist, min(m, dist.shape[1]), dim=1, largest=False, sorted=True)
        return d.numpy(), np.take_along_axis(ids, order.numpy(), axis=1)
