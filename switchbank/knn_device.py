"""An exact nearest-neighbour index scanned on the backbone's accelerator.

On the CPUs measured, the router's exact scan of 1,000 distinct switches (100,000 1280-d vectors)
takes 20-30 ms a batch of 16 and the IVF index 80-135 ms at 10,000 (knn.py, ivf.py): on a CPU that
is a fraction of the forward it routes, but on a GPU, where that forward takes milliseconds, it
would be the larger part of a request. A GPU reads the same table in one matrix product at its
memory speed (512 MB of float32 rows in about 0.15 ms at an H100's 3.35 TB/s: arithmetic, not a
measurement), and gives the exact answer. So where the backbone runs on an accelerator, the router
keeps its distinct vectors there, up to a budget of bytes (routing.Router's ``device_bytes``), in
this index; past the budget it uses the CPU's indexes as before. Should the device run out of
memory as the table grows (cached towers share it), the index moves to the CPU (knn.Exact) with
every vector it holds, and goes on answering from there.

The scan is float32, as knn.Exact's reference scan is. It stays float32 only while the process
keeps torch's default matrix-product precision ("highest"): TF32 products, if a caller turns them
on, would round the rows to 10-bit mantissas and could reorder near neighbours.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .knn import Exact, take_slots, unit_rows

log = logging.getLogger(__name__)

FIRST_ROWS = 4096  # rows the table starts with; it doubles as it fills, so it holds at most twice the vectors
MOVE_ROWS = 8192  # rows copied to the CPU at a time when the index moves there: little device memory


class DeviceExact:
    """Every vector in one float32 table on ``device``; a search is one matrix product and a top-k
    there. Vectors live in slots, as in knn.Exact (a removed vector's slot is reused, adding or
    removing one copies no other); the ids of the slots stay on the CPU. Once the index has moved
    to the CPU (see the module), every call goes to the CPU's exact index (``cpu``)."""

    kind = "exact"

    def __init__(self, dim: int, ip: bool, device: torch.device | str, capacity: int = 0):
        """``capacity``: vectors expected; the table starts with at most FIRST_ROWS of them, since a
        bank of copies holds far fewer distinct vectors than examples."""
        self.dim, self.ip, self.device = dim, ip, torch.device(device)
        cap = min(max(capacity, 1), FIRST_ROWS)
        # bias: |v|^2 for Euclidean, 0 for unit vectors by angle; +inf for a free slot, which never ranks
        self.rows, self.bias = self._table(cap)
        self.ids = np.full(cap, -1, dtype=np.int64)
        self.slot: dict[int, int] = {}
        self.free: list[int] = []
        self.used = 0  # slots ever handed out: [0, used) is scanned
        self.cpu: Exact | None = None  # where the index went when the device had no more room

    def _table(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.empty((rows, self.dim), device=self.device),
                torch.full((rows,), float("inf"), device=self.device))

    @property
    def scanning(self) -> str:
        if self.cpu is not None:
            return f"{self.cpu.scanning} (moved from {self.device})"
        return f"float32 on {self.device}"

    def ready(self) -> None:
        """Nothing to choose on the device: the scan is float32 there from the first vector."""
        if self.cpu is not None:
            self.cpu.ready()

    def _grow(self, need: int) -> bool:
        """Room for ``need`` slots; False where the device had none and the index moved to the CPU."""
        cap = self.bias.shape[0]
        if need <= cap:
            return True
        cap = max(need, 2 * cap)
        try:
            rows, bias = self._table(cap)
        except RuntimeError as exc:  # out of memory (torch.OutOfMemoryError is a RuntimeError)
            self._move(exc)
            return False
        rows[:self.used] = self.rows[:self.used]
        bias[:self.used] = self.bias[:self.used]
        ids = np.full(cap, -1, dtype=np.int64)
        ids[:self.used] = self.ids[:self.used]
        self.rows, self.bias, self.ids = rows, bias, ids
        return True

    def _move(self, exc: Exception) -> None:
        """Move every vector held to an exact index on the CPU, a block of rows at a time."""
        log.warning("router: its index no longer fits on %s (%s); it moves to the CPU", self.device, exc)
        held = np.flatnonzero(self.ids[:self.used] >= 0)
        cpu = Exact(self.dim, self.ip, capacity=held.size)
        for s in range(0, held.size, MOVE_ROWS):
            at = held[s:s + MOVE_ROWS]
            cpu.add(self.ids[at], self.rows.index_select(0, torch.from_numpy(at).to(self.device)).cpu().numpy())
        self.rows = self.bias = None
        self.cpu = cpu

    def add(self, ids: np.ndarray, x: np.ndarray | None, norms: np.ndarray | None = None,
            half: np.ndarray | None = None) -> None:
        """Add rows ``x`` under ``ids`` (made from ``half`` and ``norms`` where ``x`` is left out,
        as knn.unit_rows makes them)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.cpu is not None:
            return self.cpu.add(ids, x, norms, half)
        if not ids.size:
            return
        x, _ = unit_rows(x, norms, half)
        listed = ids.tolist()
        fresh = [i for i in listed if i not in self.slot]
        if not self._grow(self.used + max(0, len(fresh) - len(self.free))):
            return self.cpu.add(ids, x)
        self.used = take_slots(self.slot, self.free, self.used, fresh)
        slots = torch.tensor([self.slot[i] for i in listed], dtype=torch.int64)
        rows = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        at = slots.to(self.device)
        self.rows.index_copy_(0, at, rows)
        self.bias.index_copy_(0, at, torch.zeros(len(listed), device=self.device) if self.ip else (rows * rows).sum(1))
        self.ids[slots.numpy()] = ids

    def remove(self, ids) -> None:
        if self.cpu is not None:
            return self.cpu.remove(ids)
        gone = []
        for i in ids:
            s = self.slot.pop(int(i), None)
            if s is not None:
                self.ids[s] = -1
                self.free.append(s)
                gone.append(s)
        if gone:
            self.bias.index_fill_(0, torch.tensor(gone, dtype=torch.int64, device=self.device), float("inf"))

    def vectors(self, limit: int | None = None) -> np.ndarray:
        """The vectors held (a copy on the CPU), in slot order; the first ``limit`` of them if given."""
        if self.cpu is not None:
            return self.cpu.vectors(limit)
        held = np.flatnonzero(self.ids[:self.used] >= 0)[:limit]
        at = torch.from_numpy(held).to(self.device)
        return self.rows.index_select(0, at).cpu().numpy()

    @property
    def ntotal(self) -> int:
        return len(self.slot) if self.cpu is None else self.cpu.ntotal

    def nbytes(self) -> int:
        """Bytes of the table on the device (as allocated) and of the ids on the CPU."""
        if self.cpu is not None:
            return self.cpu.nbytes()
        cap = self.bias.shape[0]
        return cap * (self.dim * 4 + 4) + self.ids.nbytes

    def search(self, x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        if self.cpu is not None:
            return self.cpu.search(x, m)
        m = min(m, len(self.slot))
        if m <= 0:
            return np.zeros((x.shape[0], 0), np.float32), np.zeros((x.shape[0], 0), np.int64)
        q = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        n = self.used
        # bias - c q.v: Euclidean squared up to the per-query |q|^2 (c = 2), or minus the inner product
        dist = torch.addmm(self.bias[:n], q, self.rows[:n].T, alpha=-1.0 if self.ip else -2.0)
        d, pos = torch.topk(dist, m, dim=1, largest=False, sorted=True)
        return d.cpu().numpy(), self.ids[pos.cpu().numpy()]
