"""Nearest-neighbour indexes over unique vectors, keyed by integer ids (the router's backends).

- ``Exact``: every vector in one float32 table; a search is one matrix product and a top-k
  (faiss's flat index does not use BLAS for fewer than 20 queries, which made it several times
  slower than a plain product for a micro-batch), on a bfloat16 copy where that is faster, with
  every vector the bfloat16 error could misplace scored again in float32. The float32 product
  runs the table through oneDNN's matmul with the queries as its weight (:func:`scores`).
- ``IVF``: candidates from an inverted-file index with 8-bit scalar quantisation (faiss
  IndexIVFScalarQuantizer, about a byte per dimension per vector), scanning ``nprobe`` of
  ``nlist`` lists (by default at least 16, and about 9,000 vectors at least: :func:`ivf_nprobe`),
  then the candidates ranked by exact distances on the full vectors, kept as float16 at the scale
  a switch file gives them, so quantisation never reorders neighbours; the vectors farthest from
  every list centre are also held apart and scanned exactly in every search.
Both return distances in ascending order (Euclidean squared up to a per-query constant, or minus the
inner product for unit vectors).
"""

from __future__ import annotations

import math
import platform
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

# torch before faiss: each wheel bundles its own libgomp, and with faiss's loaded first, building an
# IVF index of 100,000 vectors took 3x as long on the machine measured (4.1 s against 11.7 s)
import faiss  # noqa: E402

from .allocator import plain_pages  # noqa: E402
from .mixed_ops import linear  # noqa: E402  (oneDNN's matmul where torch has it)


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


def unit_rows(x: np.ndarray | None, norms: np.ndarray | None, half: np.ndarray | None,
              out: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(x, norms) as an index takes them: as given, or where a caller left both out (routing.Rows:
    float16 rows for the cosine metric; no caller gives norms without x), the float16 rows' norms
    and the unit rows x = half / norms, as the router would have made them, into the first rows of
    ``out`` (float32) where given. The norms are float32 sums of the float16 values, row by row: the
    same bits whether a block holds one task's rows or a batch of many."""
    if x is not None:
        return x, norms
    h = torch.from_numpy(np.ascontiguousarray(half))
    t = h.float() if out is None else out[:h.shape[0]].copy_(h)
    scale = torch.linalg.vector_norm(t, dim=1).clamp_min_(1e-12)
    return t.div_(scale.unsqueeze(1)).numpy(), scale.numpy()


def take_slots(slot: dict[int, int], free: list[int], used: int, fresh: list[int]) -> int:
    """Give each id of ``fresh`` a slot in ``slot``: a freed one, else the next never handed out;
    returns how many slots have now been handed out."""
    for i in fresh:
        if free:
            slot[i] = free.pop()
        else:
            slot[i] = used
            used += 1
    return used


def kmeans(x: torch.Tensor, k: int, niter: int, spherical: bool, seed: int = 1234) -> torch.Tensor:
    """k centres for rows ``x`` by Lloyd's iterations, as faiss's Clustering makes them (k of the
    rows drawn at random to start; an emptied centre takes a copy of the largest cluster's, moved
    apart; unit centres for ``spherical``), on torch's matrix products: faiss's own BLAS took
    3.7 s for 256 centres over 20,000 1280-d rows, where this takes 0.6-0.8 s (Intel AVX-512
    machine, 2 threads). Its centres fit rows as closely as faiss's do (tests/unit/test_knn.py)."""
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


def scores(table: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q @ table.T [queries, rows], in float32, computed as oneDNN's matmul of the table (as its
    input) and the queries (as its weight) where torch has it. For a micro-batch of queries this
    orientation reads the table once at close to memory speed: 16 queries against 100,000 1280-d
    rows took 44 ms against 130 ms for ``q @ table.T`` (MKL) on the AVX2 machine measured, and
    10 ms against 31 ms at 20,000 rows."""
    return linear(table, q, None).T


def bf16_scores(low: torch.Tensor, ql: torch.Tensor) -> torch.Tensor:
    """ql @ low.T [queries, rows] for bfloat16 tensors (rounded to bfloat16), with the table as the
    product's input and the queries as its weight, as :func:`scores` does: 15-18 ms against 20-22 ms
    for ``ql @ low.T`` over 100,000 1280-d rows and 16 queries (AVX512-BF16 machine)."""
    return F.linear(low, ql).T


_BF16_FAST: bool | None = None


def bf16_fast() -> bool:
    """Whether a bfloat16 matrix product is fast here: at least 1.5x the float32 scan
    (:func:`scores`). On x86 that is read from the CPU's features, since oneDNN's bfloat16 products
    are fast exactly where it has bfloat16 dot-product instructions (AVX512-BF16 or AMX: 2-3x the
    float32 scan on the AMD machine measured, where on an AVX2 CPU they are slower than float32).
    Elsewhere it is timed once per process. A timing is not used where the features tell: on a
    busy machine it sometimes said no, and a bank of 1,000 switches then started on an IVF index
    instead of its exact one (8.7 s to ready against 5.2 s, and approximate routing)."""
    global _BF16_FAST
    if _BF16_FAST is None:
        features = _bf16_instructions()
        _BF16_FAST = features if features is not None else _bf16_timed()
    return _BF16_FAST


def _bf16_instructions() -> bool | None:
    """Whether an x86 CPU has bfloat16 dot-product instructions; None off x86, or where this torch
    cannot tell."""
    if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i686", "i386"):
        return None
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes
        return None


def _bf16_timed() -> bool:
    try:
        q, v = torch.full((16, 1024), 0.5), torch.full((8192, 1024), 0.25)
        ql, vl = q.to(torch.bfloat16), v.to(torch.bfloat16)
        return _best(lambda: bf16_scores(vl, ql)) * 1.5 <= _best(lambda: scores(v, q))
    except RuntimeError:  # a build without bfloat16 products
        return False


def _best(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _slack(q: torch.Tensor, ql: torch.Tensor, err: torch.Tensor, c: float) -> torch.Tensor:
    """Per query, a bound on how far a bfloat16-scan distance can be from the float32 one, for any
    vector of the table (``err`` holds |v - bf16(v)| and |bf16(v)| per slot).

    With q' = bf16(q) and v' = bf16(v): |q.v - q'.v'| <= |q| |v - v'| + |q - q'| |v'|. oneDNN
    accumulates q'.v' in float32 (n terms: at most gamma_n |q'| |v'| off) and rounds the result to
    bfloat16 once (at most 2^-8 of it: the largest error measured on a million products was
    0.996 of that); the float32 score is itself within gamma_n |q| |v| of q.v. A quarter more
    is allowed on top, and a relative 2^-22 for the distances' own arithmetic.
    """
    n = q.shape[1]
    gamma = n * 2.0 ** -24 / (1 - n * 2.0 ** -24)
    back = ql.float()
    qn, qln = torch.linalg.vector_norm(q, dim=1), torch.linalg.vector_norm(back, dim=1)
    rq = torch.linalg.vector_norm(q - back, dim=1)
    rv, nv = err.max(0).values.tolist() if err.numel() else (0.0, 0.0)
    dot = qn * rv + rq * nv + (gamma + 2.0 ** -8 * (1 + gamma)) * qln * nv + gamma * qn * (nv + rv)
    return 1.25 * c * dot + 2.0 ** -22 * ((nv + rv) ** 2 + c * qn * (nv + rv) + 1)


class Exact:
    """Every vector, each searched for every query.

    Vectors live in slots of one growing table (a removed vector's slot is reused), so adding or
    removing one never copies the others. Where the scan will be bfloat16, rows that come with the
    float16 rows they were made from (``half``, from a switch file of format version 2: x = half /
    norm) are kept as those and their norms, and read back as x to the bit: half the bytes of
    float32 rows (100,000 1280-d vectors: 256 against 512 MB). Rows without that form (older files,
    switches made in memory) are kept aside in float32; past ``WIDE`` of them the whole table turns
    float32, as it does if the scan turns out float32. A table that starts small holds float32
    rows (the float32 scan reads them as they are) and keeps the float16 forms beside them; when it
    grows past ``SMALL``, the add that crosses turns it compact and makes the bfloat16 copy, so a
    bank grown by uploads holds what one loaded at start-up holds, and no search pays for the switch.

    Past ``SMALL`` vectors, on a CPU whose bfloat16 products are fast (:func:`bf16_fast`), the scan
    runs on a bfloat16 copy of the table: half the bytes, and 2-3x faster than the float32 scan on
    the machine measured. The ``SHORTLIST`` best of that scan are scored in float32; then a bound on
    the bfloat16 error (:func:`_slack`) picks every other vector that could still be among the m
    nearest, and those are scored in float32 too. So the answer is that of a float32 scan, and the
    extra scoring is only as large as the near ties are many. (Those float32 scores sum the same
    products in another order than :func:`scores` does, so two vectors within float32 rounding of
    each other may swap: 1 of 977 held-out images on a bank of 100,000 vectors, whose 10th and 11th
    nearest were 1e-7 apart.)

    The tables of rows are on ordinary pages (allocator.plain_pages): they are written once and
    scanned in order, and on huge pages their first writes took 4-5x as long while the server
    started. So is the IVF index's ranking table (see IVF).
    """

    kind = "exact"
    SMALL = 4096  # below this many vectors a float32 scan is as fast as anything
    # rows converted per step: 100,000 1280-d rows took 0.18-0.25 s to lower to bfloat16 in steps
    # of 4,096 and 0.05-0.06 s in steps of 1,024, whose temporaries (5 MB) stay in cache
    BLOCK = 1024
    SHORTLIST = 64  # vectors scored in float32 per query before the bound is checked
    WIDE = 4096  # rows without a float16 form kept aside at most (20 MB at 1280-d)

    def __init__(self, dim: int, ip: bool, capacity: int = 0, scan: str = "auto"):
        if scan not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"scan must be auto, float32 or bfloat16, got {scan!r}")
        self.dim, self.ip, self.scan = dim, ip, scan
        # float16 rows and their scales (x = half / scale) where the scan will be bfloat16, else
        # float32 rows (a table that starts small keeps them until the router rebuilds it)
        compact = scan == "bfloat16" or (scan == "auto" and capacity > self.SMALL and bf16_fast())
        self.half = plain_pages((capacity, dim), torch.float16) if compact else None
        self.scale = torch.empty(capacity) if compact else None
        self.full = None if compact else plain_pages((capacity, dim), torch.float32)
        self.wide: dict[int, torch.Tensor] = {}  # slot -> float32 row, where a row had no float16 form
        # |v|^2 for Euclidean, 0 for unit vectors by angle; +inf for a free slot, which then never ranks
        self.bias = torch.full((capacity,), float("inf"))
        self.ids = np.full(capacity, -1, dtype=np.int64)
        self.slot: dict[int, int] = {}
        self.free: list[int] = []
        self.used = 0  # slots ever handed out: [0, used) is scanned
        self.low: torch.Tensor | None = None  # bfloat16 copy of the rows, once a scan uses it
        self.err: torch.Tensor | None = None  # per slot: |v - low|, |low|
        # slot -> (float16 row, scale) of float32 rows that came with that form, while a small table
        # may still turn compact (see add)
        self._aside: dict[int, tuple[torch.Tensor, float]] = {}

    # --- storage -----------------------------------------------------------------------------
    def _grow(self, need: int) -> None:
        cap = self.bias.shape[0]
        if need <= cap:
            return
        cap = max(need, 2 * cap, 64)

        def grown(old, new):
            new[:self.used] = old[:self.used]
            return new

        if self.full is not None:
            self.full = grown(self.full, plain_pages((cap, self.dim), torch.float32))
        else:
            self.half = grown(self.half, plain_pages((cap, self.dim), torch.float16))
            self.scale = grown(self.scale, torch.empty(cap))
        self.bias = grown(self.bias, torch.full((cap,), float("inf")))
        self.ids = grown(self.ids, np.full(cap, -1, dtype=np.int64))
        if self.low is not None:
            self.low = grown(self.low, plain_pages((cap, self.dim), torch.bfloat16))
            self.err = grown(self.err, torch.zeros((cap, 2)))

    def _rows(self, at: slice | torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 rows at ``at`` (a slice, or slot numbers) as they were added (into ``out``
        where given)."""
        pick = (lambda t: t[at]) if isinstance(at, slice) else (lambda t: t.index_select(0, at))
        if self.full is not None:
            return pick(self.full) if out is None else out.copy_(pick(self.full))
        half = pick(self.half)
        rows = (half.float() if out is None else out.copy_(half)).div_(pick(self.scale).unsqueeze(1))
        if self.wide:  # whichever is shorter: the rows aside, or the slots asked for
            if isinstance(at, slice) and len(self.wide) < at.stop - at.start:
                for slot, row in self.wide.items():
                    if at.start <= slot < at.stop:
                        rows[slot - at.start] = row
            else:
                asked = range(at.start, at.stop) if isinstance(at, slice) else at.tolist()
                for i, slot in enumerate(asked):
                    row = self.wide.get(slot)
                    if row is not None:
                        rows[i] = row
        return rows

    def _to_float32(self) -> None:
        """Keep float32 rows from now on."""
        if self.full is not None:
            return
        full = plain_pages((self.bias.shape[0], self.dim), torch.float32)
        for start in range(0, self.used, self.BLOCK):
            at = slice(start, min(start + self.BLOCK, self.used))
            full[at] = self._rows(at)
        self.full, self.half, self.scale, self.wide = full, None, None, {}

    def _lower(self, at: slice | torch.Tensor) -> None:
        """The bfloat16 rows at ``at`` (a slice, or slot numbers) and their error terms; a long
        slice in pieces, so that its temporaries stay in cache."""
        if isinstance(at, slice) and at.stop - at.start > self.BLOCK:
            for start in range(at.start, at.stop, self.BLOCK):
                self._lower(slice(start, min(start + self.BLOCK, at.stop)))
            return
        v = self._rows(at)
        # a slice converts as it copies; slot numbers index_put, which takes no other dtype
        self.low[at] = v if isinstance(at, slice) else v.to(torch.bfloat16)
        back = self.low[at].float()
        self.err[at, 1] = torch.linalg.vector_norm(back, dim=1)
        self.err[at, 0] = torch.linalg.vector_norm(back.sub_(v), dim=1)

    def add(self, ids: np.ndarray, x: np.ndarray, norms: np.ndarray | None = None, half: np.ndarray | None = None) -> None:
        """Add rows ``x`` under ``ids``; ``half``: the float16 rows x was made from, x = half / norms
        (or x = half, without ``norms``), which are then kept instead of x (``x`` may be left out
        where they are given)."""
        ids = np.asarray(ids, dtype=np.int64)
        if not ids.size:
            return
        x, norms = unit_rows(x, norms, half)
        listed = ids.tolist()
        fresh = [i for i in listed if i not in self.slot]
        self._grow(self.used + max(0, len(fresh) - len(self.free)))
        first = self.used
        self.used = take_slots(self.slot, self.free, self.used, fresh)
        if len(fresh) == len(listed) == self.used - first:  # new slots in a row: the common case
            at = slice(first, self.used)
            slots = range(first, self.used)
        else:
            slots = [self.slot[i] for i in listed]
            at = torch.tensor(slots, dtype=torch.int64)
        rows = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if self.full is None and half is not None:
            self.half[at] = torch.from_numpy(np.ascontiguousarray(half, dtype=np.float16))
            self.scale[at] = 1.0 if norms is None else torch.from_numpy(np.ascontiguousarray(norms, dtype=np.float32))
            if self.wide:
                for slot in slots:
                    self.wide.pop(slot, None)
        elif self.full is None and len(self.wide) + len(slots) <= self.WIDE:
            own = rows.clone()  # the caller's array may be shared
            self.half[at], self.scale[at] = 0.0, 1.0
            self.wide.update(zip(slots, own))
        else:
            self._to_float32()
            self.full[at] = rows
            if half is not None and self.low is None and self.scan == "auto" and bf16_fast():
                h = torch.from_numpy(np.array(half, dtype=np.float16))
                sc = [1.0] * len(slots) if norms is None else np.asarray(norms, dtype=np.float32).tolist()
                self._aside.update(zip(slots, zip(h, sc)))
            else:
                for slot in slots:
                    self._aside.pop(slot, None)
        self.bias[at] = 0.0 if self.ip else (rows * rows).sum(1)
        self.ids[at if isinstance(at, slice) else at.numpy()] = ids
        if self.low is not None:
            self._lower(at)
        elif self._aside and self.used > self.SMALL:
            self._compact()

    def _compact(self) -> None:
        """Turn a float32 table that has grown past ``SMALL`` compact (the rows that came without a
        float16 form kept aside, if they are few enough) and make its bfloat16 copy."""
        aside, self._aside = self._aside, {}
        live = np.flatnonzero(self.ids[:self.used] >= 0).tolist()
        bare = [s for s in live if s not in aside]
        if len(bare) > self.WIDE:
            return  # stays float32, as a table with many such rows does
        cap, n = self.bias.shape[0], self.used
        half, scale = plain_pages((cap, self.dim), torch.float16), torch.empty(cap)
        half[:n], scale[:n] = 0.0, 1.0  # free and bare slots: finite rows, never ranked (bias) or read
        slots = torch.tensor(list(aside), dtype=torch.int64)
        half[slots] = torch.stack([h for h, _ in aside.values()])
        scale[slots] = torch.tensor([sc for _, sc in aside.values()])
        self.wide = {s: self.full[s].clone() for s in bare}
        self.half, self.scale, self.full = half, scale, None
        self._use_bf16()

    def remove(self, ids) -> None:
        for i in ids:
            s = self.slot.pop(int(i), None)
            if s is not None:
                self.wide.pop(s, None)
                self._aside.pop(s, None)
                self.bias[s] = float("inf")
                self.ids[s] = -1
                self.free.append(s)

    def vectors(self, limit: int | None = None) -> np.ndarray:
        """The vectors held (a copy), in slot order; the first ``limit`` of them if given. On
        ordinary pages (allocator.plain_pages), and read as one slice where the slots have no
        gaps (an index being built): the IVF's training sample, 20,000 1280-d rows, took 0.09-0.22 s
        on fresh huge pages here, against 0.03-0.04 s."""
        held = np.flatnonzero(self.ids[:self.used] >= 0)[:limit]
        n = held.size
        at = slice(0, n) if n and held[-1] == n - 1 else torch.from_numpy(held)
        return self._rows(at, plain_pages((n, self.dim), torch.float32)).numpy()

    @property
    def ntotal(self) -> int:
        return len(self.slot)

    def nbytes(self) -> int:
        # slots never handed out are allocated but never written, so never resident
        rows = self.dim * 4 if self.full is not None else self.dim * 2 + 4
        per = rows + 4 + 8 + (self.dim * 2 + 8 if self.low is not None else 0)
        return self.used * per + len(self.wide) * self.dim * 4 + len(self._aside) * (self.dim * 2 + 4)

    # --- search ------------------------------------------------------------------------------
    @property
    def scanning(self) -> str:
        """The scan in use: bfloat16 (checked in float32) or float32."""
        return "bfloat16" if self.low is not None else "float32"

    def ready(self) -> None:
        """Choose the scan now (and make its bfloat16 copy), not on the first search."""
        self._use_bf16()

    def _use_bf16(self) -> bool:
        if self.scan == "float32" or (self.scan == "auto" and (self.used <= self.SMALL or not bf16_fast())):
            self._to_float32()
            return False
        if self.low is None:
            self.low = plain_pages((self.bias.shape[0], self.dim), torch.bfloat16)
            self.err = torch.zeros((self.bias.shape[0], 2))
            if self.used:
                self._lower(slice(0, self.used))
        return True

    def search(self, x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        n, c = self.used, 1.0 if self.ip else 2.0
        m = min(m, len(self.slot))
        if m <= 0:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        bias = self.bias[:n]
        if not self._use_bf16():
            dist = torch.sub(bias, scores(self.full[:n], q), alpha=c)
            d, pos = torch.topk(dist, m, dim=1, largest=False, sorted=True)
            return d.numpy(), self.ids[pos.numpy()]
        ql = q.to(torch.bfloat16)
        approx = torch.sub(bias, bf16_scores(self.low[:n], ql), alpha=c)  # one pass, in float32
        short = torch.topk(approx, min(n, max(self.SHORTLIST, m)), dim=1, largest=False).indices
        exact = self._exact(q, short, c)
        kth = torch.topk(exact, m, dim=1, largest=False, sorted=True).values[:, -1]
        # every other vector whose float32 distance could be at most the m-th found so far
        maybe = approx <= (kth + _slack(q, ql, self.err[:n], c)).unsqueeze(1)
        maybe.scatter_(1, short, False)
        rows, slots = maybe.nonzero(as_tuple=True)
        if rows.numel():  # near ties beyond the shortlist: score them too, padded per query
            width = int(torch.bincount(rows, minlength=q.shape[0]).max())
            first = torch.searchsorted(rows, torch.arange(q.shape[0]))
            col = torch.arange(rows.numel()) - first[rows]
            # ragged, so one dot product per pair rather than _exact's batched product (which is
            # twice as fast per vector on the shortlist's rectangle, measured)
            dots = torch.linalg.vecdot(self._rows(slots), q.index_select(0, rows))
            more = torch.full((q.shape[0], width), float("inf"))
            more[rows, col] = self.bias[slots] - c * dots
            pad = torch.zeros((q.shape[0], width), dtype=torch.int64)
            pad[rows, col] = slots
            short, exact = torch.cat([short, pad], 1), torch.cat([exact, more], 1)
        d, p = torch.topk(exact, m, dim=1, largest=False, sorted=True)
        return d.numpy(), self.ids[torch.gather(short, 1, p).numpy()]

    def _exact(self, q: torch.Tensor, slots: torch.Tensor, c: float) -> torch.Tensor:
        """Float32 distances of each query row to its ``slots`` [B, M] (a batched product: equal to
        the float32 scan's to within float32 rounding)."""
        vecs = self._rows(slots.reshape(-1)).view(*slots.shape, self.dim)
        dots = torch.bmm(vecs, q.unsqueeze(2)).squeeze(2)
        return self.bias[slots] - c * dots


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
        made here, on the indexing thread, see routing.Rows)."""
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
