"""Plain data types shared by the library: a switch in memory, its head, and cache keys."""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import repeat
from math import isfinite
from pathlib import Path
from typing import NamedTuple

import torch

from .errors import InvalidInput
from .packing import packed_len


class TensorEntry(NamedTuple):
    """One switched tensor: where its bits lie in the switch's buffers, and its scale (lambda).

    A named tuple rather than a frozen dataclass: a bank of thousands of switches creates a few
    hundred per switch at start-up, and a tuple is made in less than half the time."""

    name: str
    shape: tuple[int, ...]
    kept: int
    scale: float
    offset: int  # byte offset of this tensor's bits in the dense mask/pos buffers

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return packed_len(self.numel)


class Entries(Sequence):
    """A switch's tensor entries (TensorEntry, in file order) held as columns: the names, shapes and
    offsets shared by every switch of one layout (layout.Index), and this switch's kept counts and
    scales as arrays. A bank of thousands of switches holds every switch's entries: for about 150
    tensors, tuples take about 18 KB a switch, these columns under 3 KB."""

    __slots__ = ("index", "kept", "scale")

    def __init__(self, index, kept, scale):
        """``index``: a layout.Index; ``kept`` and ``scale`` one per tensor."""
        self.index = index
        self.kept = array("q", kept)
        self.scale = array("d", scale)
        if not len(self.kept) == len(self.scale) == len(index.names):
            raise InvalidInput("a switch needs one kept count and one scale per tensor")

    def __len__(self) -> int:
        return len(self.kept)

    def __iter__(self):
        i = self.index
        # tuple.__new__ builds each named tuple in C, as TensorEntry(...) would through a Python-level __new__
        return map(tuple.__new__, repeat(TensorEntry), zip(i.names, i.shapes, self.kept, self.scale, i.offsets))

    def __getitem__(self, k):
        if isinstance(k, slice):
            return list(self)[k]
        i = self.index
        return TensorEntry(i.names[k], i.shapes[k], self.kept[k], self.scale[k], i.offsets[k])

    def get(self, name: str) -> TensorEntry | None:
        """The entry of tensor ``name``, or None."""
        k = self.index.positions.get(name)
        return None if k is None else self[k]

    def __eq__(self, other) -> bool:
        return isinstance(other, (list, tuple, Entries)) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]


@dataclass
class Head:
    """A linear classification head on the image embedding: logits = W @ f + b.

    ``normalize`` L2-normalises the embedding first (as CLIP zero-shot heads expect). A switch
    listed from a bank file holds its head without ``weight`` and ``bias`` (``listed``): heads.py
    reads them when a request needs them, so a bank's heads take memory only while they are used.
    """

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    classes: list[str]
    normalize: bool = True
    dim: int = 0  # the embedding width it takes; read from ``weight`` where there is one

    def __post_init__(self) -> None:
        if self.weight is None:
            if self.bias is not None or self.dim < 1:
                raise InvalidInput("a head listed without its weight needs its width and no bias")
            return
        if self.weight.dim() != 2:
            raise InvalidInput(f"head weight must be 2-D [classes, dim], got shape {tuple(self.weight.shape)}")
        if len(self.classes) != self.weight.shape[0]:
            raise InvalidInput(f"head has {self.weight.shape[0]} rows but {len(self.classes)} class names")
        if self.bias is not None and tuple(self.bias.shape) != (self.weight.shape[0],):
            raise InvalidInput(f"head bias shape {tuple(self.bias.shape)} != ({self.weight.shape[0]},)")
        self.dim = int(self.weight.shape[1])

    @property
    def listed(self) -> bool:
        """Whether this is a listing only, its weights left in the switch's file."""
        return self.weight is None

    def listing(self) -> Head:
        """This head without its weights."""
        return Head(None, None, self.classes, self.normalize, self.dim)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.bias) if t is not None)


@dataclass
class Switch:
    """A task switch in its dense in-memory form (2 bits per switched parameter).

    ``mask`` and ``pos`` are uint8 buffers holding every tensor's bits back to back, each tensor
    starting on a byte boundary (see packing.py); both are None while a switch listed from a bank
    has not had its bits loaded (``source`` is then its file). ``dense`` holds the exact deltas of
    0-dim tensors.
    """

    name: str
    alpha: float
    backbone_fingerprint: str
    entries: list[TensorEntry] | Entries
    mask: torch.Tensor | None
    pos: torch.Tensor | None
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    head: Head | None = None
    queries: torch.Tensor | None = None
    router_fingerprint: str | None = None
    arch: str | None = None
    buffers_differing: list[str] = field(default_factory=list)
    content_hash: str = ""
    payload_bytes: int = 0  # on-disk bytes of mask, sign and scale; set when written or read
    format_version: int = 2
    query_count: int = 0  # rows of query embeddings, also once ``queries`` is dropped after indexing
    queries_at: tuple | None = None  # (offset, bytes, dtype, shape) of the queries in ``source``
    # ((offset, bytes) of the weight, of the bias or None, CRC-32 of both) of a listed head in ``source``
    head_at: tuple | None = None
    source: Path | None = None  # the file the bits are read from, for switches read lazily

    @property
    def loaded(self) -> bool:
        return self.mask is not None

    @property
    def n_params(self) -> int:
        return sum(e.numel for e in self.entries)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each switched tensor's shape, by name (for a listed switch, its layout's own dict)."""
        if isinstance(self.entries, Entries):
            return self.entries.index.shape_of
        return {e.name: e.shape for e in self.entries}

    def entry_map(self):
        """Entries by tensor name, a mapping with ``get`` (for a list of entries, a dict built
        once: entries never change after construction)."""
        if isinstance(self.entries, Entries):
            return self.entries
        cached = self.__dict__.get("_entry_map")
        if cached is None or len(cached) != len(self.entries):
            cached = self.__dict__["_entry_map"] = {e.name: e for e in self.entries}
        return cached

    def to(self, device: torch.device | str) -> Switch:
        """Move the bit buffers (what materialisation reads) to ``device``; returns self."""
        if self.mask is not None:
            self.mask = self.mask.to(device)
            self.pos = self.pos.to(device)
        self.dense = {k: v.to(device) for k, v in self.dense.items()}
        return self

    def resident_bytes(self) -> int:
        """Bytes the switch's bits and dense deltas occupy in memory."""
        if self.mask is None:
            return 0
        return (
            self.mask.numel() + self.pos.numel()
            + sum(v.numel() * v.element_size() for v in self.dense.values())
        )


@dataclass(frozen=True)
class Combination:
    """Canonical, hashable description of merged weights: the cache key.

    Terms are (switch name, content hash, weight) sorted by name with zero weights dropped, so the
    same mix always gives the same key, and a replaced switch (new content hash) a new one.
    """

    terms: tuple[tuple[str, str, Fraction], ...]

    @classmethod
    def of(cls, weights: dict[str, Fraction | float | int], hashes: dict[str, str]) -> Combination:
        terms = []
        for name in sorted(weights):
            w = weights[name]
            if not isinstance(w, Fraction):
                if not isfinite(float(w)):
                    raise InvalidInput(f"weight for {name!r} is not a finite number")
                w = Fraction(w)
            if w < 0:
                raise InvalidInput(f"weight for {name!r} is negative ({float(w)})")
            if w == 0:
                continue
            if name not in hashes:
                raise InvalidInput(f"unknown switch {name!r}")
            terms.append((name, hashes[name], w))
        return cls(tuple(terms))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t[0] for t in self.terms)

    def hashes(self) -> dict[str, str]:
        return {name: h for name, h, _ in self.terms}

    def weights(self) -> dict[str, float]:
        return {name: float(w) for name, _, w in self.terms}

    def top(self) -> str | None:
        """The switch with the largest weight (ties go to the first name in sorted order)."""
        if not self.terms:
            return None
        best = max(w for _, _, w in self.terms)
        return next(name for name, _, w in self.terms if w == best)
