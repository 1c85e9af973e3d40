"""The router's exact nearest-neighbour index over unique vectors, keyed by integer ids, and what
its other indexes share (ivf.py, knn_device.py).

``Exact`` holds every vector in one table; a search is one matrix product and a top-k (faiss's
flat index does not use BLAS for fewer than 20 queries, which made it several times slower than a
plain product for a micro-batch), on a bfloat16 copy where that is faster, with every vector the
bfloat16 error could misplace scored again in float32. The float32 product runs the table through
oneDNN's matmul with the queries as its weight (:func:`scores`). Distances come in ascending order
(Euclidean squared up to a per-query constant, or minus the inner product for unit vectors).
"""

from __future__ import annotations

import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from .allocator import plain_pages
from .onednn import linear  # oneDNN's matmul where torch has it


def unit_rows(x: np.ndarray | None, norms: np.ndarray | None, half: np.ndarray | None,
              out: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(x, norms) as an index takes them: as given, or where a caller left both out (examples.Rows:
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
    started. So is the IVF index's ranking table (see ivf.IVF).
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
