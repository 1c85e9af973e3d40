"""The router's approximate index for big banks: candidates from an inverted-file index with 8-bit
scalar quantisation (faiss IndexIVFScalarQuantizer, about a byte per dimension per vector),
scanning ``nprobe`` of ``nlist`` lists (by default at least 16, and about 9,000 vectors at least:
:func:`ivf_nprobe`), then the candidates ranked by exact distances on the full vectors, kept as
float16 at the scale a switch file gives them, so quantisation never reorders neighbours; the
vectors farthest from every list centre are also held apart and scanned exactly in every search.
Distances come in ascending order, as knn.Exact's do.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
import torch.nn.functional as F

# torch before faiss: each wheel bundles its own libgomp, and with faiss's loaded first, building an
# IVF index of 100,000 vectors took 3x as long on the machine measured (4.1 s against 11.7 s)
import faiss  # noqa: E402

from .allocator import plain_pages  # noqa: E402
from .knn import scores, unit_rows  # noqa: E402


def ivf_lists(n: int) -> int:
    """Inverted lists for ``n`` vectors: about sqrt(n), between 16 and 256. Coarser lists, searched
    at the same share of the vectors, routed more like exact search on the bank measured (10,000
    distinct switches, a million vectors: 256 lists at nprobe 16 agreed on 96.5% of the held-out
    images where 512 at nprobe 32 agreed on 94.2%, in the same time), and assigning vectors to them
    is most of the index's build."""
    return int(min(256, max(16, math.sqrt(max(n, 1)))))


NPROBE = 16  # lists an IVF index searches per query at least, by default
MIN_SCAN = 9_000  # vectors a query scans at least, by default


def ivf_nprobe(nlist: int, n: int) -> int:
    """Lists to search per query by default for ``n`` vectors in ``nlist`` lists: 16, or more where
    the lists are small, so that a query scans about MIN_SCAN vectors at least. On the distinct
    banks measured (AVX2 machine), nprobe 16 gave exact search's weights on 99.5% of the held-out
    images at a million vectors but 98.5% at 100,000, where its lists hold ten times fewer; 24
    lists (9,400 vectors) gave 99.5% there too, for 29 ms per batch of 16 against 22 ms."""
    return int(min(nlist, max(NPROBE, math.ceil(nlist * MIN_SCAN / max(n, 1)))))


_background = threading.local()


def one_thread() -> None:
    """Have faiss run the calling thread's work on that thread alone (OpenMP's thread count is
    each thread's own): a background rebuild then leaves the other cores to the requests. Such a
    thread also leaves k-means and list assignment to faiss rather than torch (:class:`IVF`), whose
    thread count is the process's rather than a thread's own."""
    faiss.omp_set_num_threads(1)
    _background.alone = True


def alone() -> bool:
    """Whether the calling thread has called :func:`one_thread`."""
    return getattr(_background, "alone", False)


def kmeans(x: torch.Tensor, k: int, niter: int, spherical: bool, seed: int = 1234) -> torch.Tensor:
    """k centres for rows ``x`` by Lloyd's iterations, as faiss's Clustering makes them (k of the
    rows drawn at random to start; an emptied centre takes a copy of the largest cluster's, moved
    apart; unit centres for ``spherical``), on torch's matrix products: faiss's own BLAS took
    3.7 s for 256 centres over 20,000 1280-d rows, where this takes 0.6-0.8 s (Intel AVX-512
    machine, 2 threads). Its centres fit rows as closely as faiss's do (tests/unit/test_ivf.py)."""
    g = torch.Generator().manual_seed(seed)
    c = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    nudge = torch.where(torch.arange(x.shape[1]) % 2 == 0, 1.0, -1.0) / 1024
    for _ in range(niter):
        lists = nearest_centres(x, c, not spherical)[1]
        size = torch.bincount(lists, minlength=k)
        c = torch.zeros_like(c).index_add_(0, lists, x).div_(size.clamp_min(1).unsqueeze(1).to(x.dtype))
        for j in torch.nonzero(size == 0).flatten().tolist():
            big = int(torch.argmax(size))
            # the two halves of the largest cluster, each around a copy of its centre nudged apart
            c[j], c[big] = c[big] * (1 + nudge), c[big] * (1 - nudge)
            size[j] = size[big] // 2
            size[big] -= size[j]
        if spherical:
            c = F.normalize(c, dim=1)
    return c


def nearest_centres(x: torch.Tensor, c: torch.Tensor, l2: bool, block: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``x``, its nearest centre of ``c``: (squared distance for ``l2``, else the
    largest inner product; the centre's index), a block of rows at a time."""
    best, at = torch.empty(x.shape[0]), torch.empty(x.shape[0], dtype=torch.int64)
    half_sq = 0.5 * (c * c).sum(1) if l2 else None
    for s in range(0, x.shape[0], block):
        dots = x[s:s + block] @ c.T
        if l2:  # |x - c|^2 = |x|^2 - 2 (x.c - |c|^2 / 2)
            v, i = dots.sub_(half_sq).max(1)
            v = (x[s:s + block] * x[s:s + block]).sum(1).sub_(2 * v)
        else:
            v, i = dots.max(1)
        best[s:s + block], at[s:s + block] = v, i
    return best, at


class IVF:
    """An IVF index with 8-bit scalar quantisation whose candidates are ranked exactly.

    Its lists are centred on a sample of the vectors it was built with, by :func:`kmeans`, and rows
    are assigned to them by :func:`nearest_centres`: both on torch's matrix products, which made
    building the index for a bank of 1,000 distinct switches 3.6-3.8 s against 6.6-7.6 s with
    faiss's own (Intel AVX-512 machine; faiss still trains the 8-bit quantiser on the lists'
    residuals, and a rebuild in the background leaves all of it to faiss, see :func:`one_thread`).

    Rows added later that lie far from every centre (switches of a new domain, say) crowd into the
    lists nearest to them, whose centres no longer describe them, and searches miss their
    neighbours: on a bank grown by uploads one task after another, from 2,006 to 3,006 distinct
    switches, the weights matched exact search on 73% of the held-out images, against 99% for an
    index built on the same bank. So the index tracks how far added rows lie from their centres
    (:meth:`drift`), and the router rebuilds it once they lie DRIFT times as far as the rows it was
    built with (rows like those measured 1.03-1.04 on that bank, uploaded in shuffled order).

    A rebuild does not help a bank that stays lopsided: hundreds of switches of four tasks and one
    each of two others gave lists centred on the four, with the two tasks' rows in lists whose
    centres are far from them and from their queries, which then probe other lists (17.6% of one
    task's held-out images routed as exact search routes them). So the rows farthest from every
    centre (SIDE_FAR times the typical distance or more, the farthest SIDE_MAX of them)
    are also held apart, and every search scans those exactly beside the lists it probes.
    """

    kind = "approximate"
    DRIFT = 1.5
    DRIFT_ROWS = 2_000  # rows added before drift is judged
    BASELINE_ROWS = 5_000  # rows beyond the training sample that set what "like the build" means
    SIDE_FAR = 2.5  # rows this many times as far from their nearest centre as is typical are held apart
    SIDE_MAX = 4_096  # rows held apart at most (the farthest): an exact scan of them per search

    def __init__(self, dim: int, ip: bool, nlist: int, nprobe: int, train: np.ndarray, candidates: int = 64,
                 capacity: int = 0):
        """``nprobe``: lists searched per query (``ivf_nprobe`` gives the default for a size)."""
        metric = faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2
        self.quantizer = faiss.IndexFlatIP(dim) if ip else faiss.IndexFlatL2(dim)
        self.index = faiss.IndexIVFScalarQuantizer(self.quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, metric)
        self.index.cp.niter = 10
        train = np.ascontiguousarray(train, dtype=np.float32)
        self.ip = ip
        fit_rows = train[:self.BASELINE_ROWS]
        if alone():
            self.index.train(train)
            self.centres = torch.from_numpy(self.quantizer.reconstruct_n(0, nlist))
            fit_far = self._far(fit_rows)[0]
        else:
            # faiss's train, given the centres, would assign the sample again with its own products
            # to fit the 8-bit quantiser to the residuals: the assignment is made here, and the
            # quantiser trained on those residuals as faiss trains it (0.14-0.16 s against
            # 0.30-0.34 s for 20,000 1280-d rows)
            rows = torch.from_numpy(train)
            self.centres = kmeans(rows, nlist, self.index.cp.niter, spherical=ip)
            self.quantizer.add(self.centres.numpy())
            best, lists = nearest_centres(rows, self.centres, not ip)
            if self.index.by_residual:
                # a block at a time, onto ordinary pages: a gather of the centres and a difference of
                # 20,000 1280-d rows, each on fresh huge pages, took 0.08-0.27 s here, this 0.02 s
                res = plain_pages(tuple(rows.shape), torch.float32)
                for s in range(0, rows.shape[0], 2048):
                    torch.sub(rows[s:s + 2048], self.centres.index_select(0, lists[s:s + 2048]), out=res[s:s + 2048])
                rows = res
            self.index.sq.train(rows.numpy())
            self.index.is_trained = True
            fit_far = self._as_far(best[:fit_rows.shape[0]].numpy())  # that assignment, not made again
        self.index.nprobe = min(nprobe, nlist)
        self.dim, self.nlist, self.candidates = dim, nlist, candidates
        self.trained_on = int(train.shape[0])
        self.built_on = 0  # vectors when it was built: a rebuild is due once that has halved or doubled
        # How far rows lie from their nearest list centre (see drift): the training rows' mean over
        # the first BASELINE_ROWS of them (a fallback, for an index built on its training sample
        # alone: the centres were fitted to them; read from the assignment that fitted the
        # quantiser, or on a rebuild's thread measured with faiss), the first BASELINE_ROWS rows
        # added beyond the training sample while the index is built, and the rows added once it
        # is (``tracking``).
        self.fit = float(fit_far.mean())
        self.tracking = False
        self.seen = 0
        self.baseline_far, self.baseline_rows = 0.0, 0
        self.added_far, self.added_rows = 0.0, 0
        # by id, for the exact ranking; rows of ids never added are never read, so growing them
        # leaves them unwritten (zeroing a million rows was a tenth of a big bank's start-up). On
        # ordinary pages (allocator.plain_pages), though the ranking reads a row here and there:
        # a million rows (2.56 GB) took 3.5 s to write afresh on huge pages against 0.6 s, and k-NN
        # on a bank of 10,000 distinct switches took as long either way (132-137 against 134-140 ms
        # a batch of 16; gathering 144,000 random rows alone was 14% slower on ordinary pages).
        self.full = plain_pages((capacity, dim), torch.float16)
        self.norm = torch.empty(capacity)
        self.top = 0  # rows of full and norm ever written: those below the highest id added
        # rows held apart (in their lists too): their ids and distances to their nearest centre
        self.side_ids, self.side_far = np.zeros(0, np.int64), np.zeros(0, np.float32)
        self.turned_away = 0  # rows added since the build as far as those, for which there was no room
        self._side_rows: tuple | None = None  # their float32 rows and squared norms, made when first searched

    def add(self, ids: np.ndarray, x: np.ndarray, norms: np.ndarray | None = None, half: np.ndarray | None = None) -> None:
        """Add rows ``x`` under ``ids``. With ``norms`` (unit rows ``x`` scaled down from rows of
        those norms), the rows are kept for the ranking at their own scale, x * norm: rows that a
        switch file stored as float16 are then kept exactly, and ranked as a float32 scan of ``x``
        would rank them (keeping x itself as float16 changed the routing weights of 3% of the
        held-out images at 10,000 distinct switches). ``half``: those float16 rows themselves, where
        x came from them (x = half / norm); then they are kept as they are, in one copy: at a
        million rows this call spent 1.6-2.1 s besides faiss's add, against 3.0-3.3 s scaling
        and rounding them a block at a time. ``x`` may be left out where ``half`` is given (it is then
        made here, on the indexing thread, see examples.Rows)."""
        if not ids.size:
            return
        x, norms = unit_rows(x, norms, half)
        top = int(ids.max()) + 1
        self.top = max(self.top, top)
        if top > self.full.shape[0]:
            cap = max(top, 2 * self.full.shape[0])
            grown, norm = plain_pages((cap, self.dim), torch.float16), torch.empty(cap)
            grown[:self.full.shape[0]], norm[:self.norm.shape[0]] = self.full, self.norm
            self.full, self.norm = grown, norm
        scale = None if norms is None else torch.from_numpy(np.ascontiguousarray(norms, dtype=np.float32))
        # ids in a row (a build adds them so) are copied into place rather than scattered
        in_row = bool((np.diff(ids) == 1).all())
        if half is not None:  # kept as they came: one copy, no temporaries
            at = slice(int(ids[0]), int(ids[0]) + ids.size) if in_row else torch.from_numpy(ids)
            self.full[at] = torch.from_numpy(np.ascontiguousarray(half))
            self.norm[at] = 1.0 if scale is None else scale
        else:
            # Scaled in float32 (torch's product straight into float16 is not vectorised) a block at
            # a time, so that no temporary is large enough for malloc to map afresh: a million rows
            # took 6-7 s as one float16 product and scatter, measured.
            rows = torch.from_numpy(x)
            for s in range(0, ids.size, 1024):
                part = rows[s:s + 1024] if scale is None else rows[s:s + 1024] * scale[s:s + 1024].unsqueeze(1)
                at = slice(int(ids[s]), int(ids[s]) + part.shape[0]) if in_row else torch.from_numpy(ids[s:s + 1024])
                self.full[at] = part.half()
                self.norm[at] = 1.0 if scale is None else scale[s:s + 1024]
        x = np.ascontiguousarray(x, dtype=np.float32)
        far, lists = self._far(x)
        ids64 = np.ascontiguousarray(ids, dtype=np.int64)
        self.index.add_core(ids64.size, faiss.swig_ptr(x), faiss.swig_ptr(ids64), faiss.swig_ptr(lists))
        if self.tracking:
            self.added_far += float(far.sum())
            self.added_rows += int(ids.size)
        elif self.baseline_rows < self.BASELINE_ROWS and self.seen + ids.size > self.trained_on:
            # a build adds the training sample first, in the order it was drawn
            start = max(0, self.trained_on - self.seen)
            part = far[start:start + self.BASELINE_ROWS - self.baseline_rows]
            self.baseline_far += float(part.sum())
            self.baseline_rows += part.shape[0]
        self.seen += int(ids.size)
        self._hold_apart(ids64, far)

    def _far(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's distance to its nearest list centre (1 - inner product for unit rows), and
        that centre's list, which the row is added to (the assignment made here once, for both)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if alone():
            d, lists = self.quantizer.search(x, 1)
            d, lists = d[:, 0], lists[:, 0]
        else:  # torch's products: 0.4 s for 100,000 rows and 256 centres against faiss's 2.1 s
            d, lists = (t.numpy() for t in nearest_centres(torch.from_numpy(x), self.centres, not self.ip))
        return self._as_far(d), np.ascontiguousarray(lists, dtype=np.int64)

    def _as_far(self, d: np.ndarray) -> np.ndarray:
        """Distances from a nearest-centre search (the largest inner product for unit rows)."""
        return 1.0 - d if self.ip else d

    def _hold_apart(self, ids: np.ndarray, far: np.ndarray) -> None:
        """Hold apart the new rows farthest from their centres, up to SIDE_MAX with those held
        already. They stay in their lists as well: a displaced row needs no moving, and adding a
        batch needs no copy of it without them (searches drop the rows found both ways)."""
        apart = far > self.SIDE_FAR * self.typical()
        if not apart.any():
            return
        side_ids = np.concatenate([self.side_ids, ids[apart]])
        side_far = np.concatenate([self.side_far, far[apart].astype(np.float32)])
        if side_ids.size > self.SIDE_MAX:
            if self.tracking:
                self.turned_away += side_ids.size - self.SIDE_MAX
            keep = np.argpartition(-side_far, self.SIDE_MAX - 1)[:self.SIDE_MAX]
            side_ids, side_far = side_ids[keep], side_far[keep]
        self.side_ids, self.side_far, self._side_rows = side_ids, side_far, None

    def crowded(self) -> bool:
        """Whether rows far from every centre have come since the build in numbers the rows held
        apart cannot take (half SIDE_MAX more, and a tenth of the rows added): a new domain's,
        which lists trained on a sample that holds them would describe. Drift says so too, but only
        once a twentieth of the index has been added: at 2,006 switches, a hundred of a new task.
        (Of the rows of the banks measured, 0.2-1% lie that far from their centres.)"""
        return self.turned_away >= max(self.SIDE_MAX // 2, self.added_rows // 10)

    def drift(self) -> float:
        """How much farther from their list centres the rows added since the build lie than the
        rows it was built with (about 1 for rows like those); 0 until DRIFT_ROWS of them, and a
        twentieth of the index, have been added. The rows it was built with are measured beyond the
        training sample, which lies nearer its centres than other rows do: with few training rows
        (a small bank's IVF), ten times nearer."""
        if self.added_rows < max(self.DRIFT_ROWS, self.built_on // 20):
            return 0.0
        return self.added_far / self.added_rows / max(self.typical(), 1e-12)

    def typical(self) -> float:
        """How far the rows it was built with lie from their centres: measured beyond the training
        sample once the build has added such rows, else on the training rows (see drift)."""
        return self.baseline_far / self.baseline_rows if self.baseline_rows else self.fit

    def remove(self, ids) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size:
            held = np.isin(self.side_ids, ids)
            if held.any():
                self.side_ids, self.side_far = self.side_ids[~held], self.side_far[~held]
                self._side_rows = None
            self.index.remove_ids(faiss.IDSelectorBatch(ids))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def nbytes(self) -> int:
        # rows never written are allocated but not resident
        return (int(self.index.ntotal) * (self.index.code_size + 8) + self.nlist * self.dim * 4
                + self.top * (self.dim * 2 + 4) + self.side_ids.size * (self.dim * 4 + 12))

    def _as_added(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 rows of ``ids`` as they were added, to float32 rounding (the kept float16 rows
        divided by their norms)."""
        return self.full.index_select(0, ids).float().div_(self.norm.index_select(0, ids).unsqueeze(1))

    def _side_nearest(self, x: np.ndarray, m: int) -> tuple[torch.Tensor, np.ndarray]:
        """The ``m`` rows held apart nearest each query, by an exact scan: (distances, ids)."""
        if self._side_rows is None:
            rows = self._as_added(torch.from_numpy(self.side_ids))
            self._side_rows = (rows, (rows * rows).sum(1))
        rows, sq = self._side_rows
        dots = scores(rows, torch.from_numpy(x))
        dist = -dots if self.ip else sq - 2 * dots
        d, at = torch.topk(dist, min(m, rows.shape[0]), dim=1, largest=False, sorted=False)
        return d, self.side_ids[at.numpy()]

    def search(self, x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        _, ids = self.index.search(x, max(m, self.candidates))
        valid = torch.from_numpy(ids >= 0)
        flat = torch.from_numpy(np.where(ids >= 0, ids, 0).reshape(-1))
        vecs = self._as_added(flat).view(ids.shape[0], ids.shape[1], self.dim)
        dots = torch.bmm(vecs, torch.from_numpy(x).unsqueeze(2)).squeeze(2)
        dist = -dots if self.ip else (vecs * vecs).sum(2) - 2 * dots
        dist = torch.where(valid, dist, torch.tensor(float("inf")))
        if self.side_ids.size:  # the rows held apart, each row once: those the lists gave are dropped
            side_d, side = self._side_nearest(x, m)
            dup = (side[:, :, None] == ids[:, None, :]).any(2)
            side_d[torch.from_numpy(dup)], side[dup] = float("inf"), -1
            dist, ids = torch.cat([dist, side_d], 1), np.concatenate([ids, side], axis=1)
        d, order = torch.topk(dist, min(m, dist.shape[1]), dim=1, largest=False, sorted=True)
        return d.numpy(), np.take_along_axis(ids, order.numpy(), axis=1)
