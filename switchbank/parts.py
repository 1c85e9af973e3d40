"""Activations kept apart per group between the operations of a mixed forward (see mixed.py).

In a convolution tower every parameterised operation runs per group of rows, and what comes between
two of them (a norm folded into the convolution before it, its activation, a residual add) does not
need the rows together. Joining each operation's per-group outputs into one batch only for the next
operation to slice it again copied the tower's largest activations twice per block: on the demo
tower, a batch of 16 in about 8 groups spent about 15 ms of 110 in those copies and concatenations.
So a mixed convolution may hand on a :class:`Parts`, one tensor per group in the batch's order:
mixed convolutions and norms take it as it is, ``+`` adds it part by part, and everything else gets
the joined batch (:func:`whole`; the mixed tower joins before any other module runs).
"""

from __future__ import annotations

import torch


class Parts:
    """One tensor per group of rows, in order: together, a batch."""

    __slots__ = ("pieces",)

    def __init__(self, pieces):
        self.pieces = list(pieces)

    def join(self) -> torch.Tensor:
        out = torch.cat(self.pieces)
        first = self.pieces[0]
        if first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def map(self, fn) -> Parts:
        return Parts(fn(p) for p in self.pieces)

    def same_rows(self, other: Parts) -> bool:
        return len(other.pieces) == len(self.pieces) and all(
            a.shape[0] == b.shape[0] for a, b in zip(self.pieces, other.pieces))

    def __add__(self, other):
        if isinstance(other, Parts) and self.same_rows(other):
            return Parts(a + b for a, b in zip(self.pieces, other.pieces))
        return self.join() + whole(other)

    def __radd__(self, other):
        return whole(other) + self.join()


def whole(x):
    """``x`` as one tensor (a Parts joined, anything else as it is)."""
    return x.join() if isinstance(x, Parts) else x


def pieces_of(x, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The per-group tensors of ``x``: its parts, or its rows sliced by ``spans``."""
    return x.pieces if isinstance(x, Parts) else [x[s:e] for s, e in spans]


def per_piece(ts: list[tuple], n: int) -> list[tuple]:
    """Per group tensors (``ts`` has one entry when every group has the same)."""
    return ts if len(ts) == n else ts * n
