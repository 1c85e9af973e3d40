"""A router's query examples: each task's rows as the index takes them, and the distinct vectors
that examples share (several switches built from the same images hold one vector once), with the
owners each vector has, so that a search over distinct vectors still counts every example."""

from __future__ import annotations

import os
import threading
from array import array
from itertools import repeat
from typing import NamedTuple

import numpy as np

from .knn import unit_rows


class Rows(NamedTuple):
    """A task's examples as the index holds them, and (cosine metric) each one's norm before it was
    scaled to unit length, from which the IVF index keeps them exactly as a float16 file gave them.

    Rows that came as float16 for the cosine metric leave ``x`` and ``norms`` out (None): the index
    makes both from them (knn.unit_rows), the IVF index on its own thread, a batch at a time.
    Reading a bank of 10,000 distinct switches, making x on the reading thread, switch by switch,
    and joining it into batches for the IVF was about a quarter of that thread's time under a
    profiler; the norms alone, a parallel region per switch beside the indexing thread's, took
    2.5-3.1 s of it."""

    x: np.ndarray | None
    norms: np.ndarray | None
    half: np.ndarray | None = None  # the rows as they came, where they came as float16 (a file's)

    @property
    def shape(self) -> tuple:
        return (self.x if self.x is not None else self.half).shape

    def unit(self) -> np.ndarray:
        """x, made where it was left out."""
        return unit_rows(*self)[0]

    def made(self) -> Rows:
        """These rows with x and norms made where they were left out."""
        return self._replace(**dict(zip(("x", "norms"), unit_rows(*self))))


class Keyed(NamedTuple):
    """The keys of a task's examples: the whole block's, and each row's."""

    block: tuple
    rows: list[int]


class Examples:
    """Query examples and the distinct vectors they share.

    A bank of 10,000 distinct switches holds a million vectors, so what a vector needs beyond its
    key's dict entry is kept in arrays indexed by its uid: its key, and its first owner (the
    example at the earliest position, with its task); only vectors that several examples share
    keep their other owners, in arrays of their own. As Python lists of tuples that took about 300
    bytes a distinct vector, and 90 bytes an example beyond the first of a shared one.
    """

    # A row's key is a 64-bit hash of its bytes keyed per process: the sum of its 8-byte words,
    # each times a random odd number, modulo 2**64, computed for a block of rows at once. Two
    # different rows get one key with odds of about 2**-64 over the draw of the numbers, which no
    # upload can aim at without them (an admin who wanted to share another switch's examples could
    # upload them outright). Python's hash of each row's bytes (SipHash) took 92 us for a switch's
    # 100 1280-d float16 rows, this 35 us.
    _multipliers = np.zeros(0, np.uint64)
    _drawing = threading.Lock()

    def __init__(self):
        self.blocks: dict[tuple, array] = {}  # a task's whole block of vectors -> their uids
        self.block_of: dict[int, tuple] = {}  # task id -> its block
        self.uid_of: dict[int, int] = {}  # a vector's key -> its uid
        self.key_of = array("q")  # uid -> its vector's key (meaningful while the uid has owners)
        # uid -> its first owner's position and task id (-1: no owner any more)
        self.first_pos, self.first_tid = array("q"), array("q")
        # uid -> its other owners' positions and task ids, by position
        self.more: dict[int, tuple[array, array]] = {}
        self.rows: dict[int, array] = {}  # task id -> its uids (shared with blocks: never changed)
        self.next_pos = self.next_tid = 0
        self.count = 0

    @staticmethod
    def block(x: np.ndarray) -> Keyed:
        """The keys of a task's examples, row by row and as a whole block (the row keys hashed
        together: hashing the block's bytes as well took as long again)."""
        rows = Examples.row_keys(x)
        return Keyed((x.shape, x.dtype.str, hash(tuple(rows))), rows)

    @classmethod
    def row_keys(cls, x: np.ndarray) -> list[int]:
        """Each row's key (see above), as a signed 64-bit integer."""
        raw = np.ascontiguousarray(x).reshape(x.shape[0], int(np.prod(x.shape[1:]))).view(np.uint8)
        if raw.shape[1] % 8:  # whole words: zeros after the last byte
            raw = np.concatenate([raw, np.zeros((raw.shape[0], 8 - raw.shape[1] % 8), np.uint8)], axis=1)
        words = raw.view(np.uint64)
        n = words.shape[1]
        mult = cls._multipliers
        if mult.size < n:  # drawn once per process, longer when a longer row comes
            with cls._drawing:  # one draw: rows keyed by two threads at once must get the same keys
                if cls._multipliers.size < n:
                    more = np.frombuffer(os.urandom(8 * (n - cls._multipliers.size)), np.uint64) | np.uint64(1)
                    cls._multipliers = np.concatenate([cls._multipliers, more])
                mult = cls._multipliers
        return (words * mult[:n]).sum(axis=1, dtype=np.uint64).view(np.int64).tolist()

    @staticmethod
    def keys(rows: Rows) -> Keyed:
        """The keys of rows as the router holds them: from their float16 bytes where they came so
        (equal float16 rows make equal rows, and there are half as many bytes to hash: 73 against
        126 us for a switch's 100 1280-d rows). The same vectors from a float32 source get other
        keys and are indexed twice, which changes no route: a search expands every distinct
        vector it finds into the examples it stands for."""
        return Examples.block(rows.half if rows.half is not None else rows.x)

    def _own(self, uid: int, pos: int, tid: int) -> None:
        """One more owner of ``uid``, at a later position than its others."""
        if self.first_tid[uid] < 0:
            self.first_pos[uid], self.first_tid[uid] = pos, tid
        else:
            more = self.more.get(uid)
            if more is None:
                more = self.more[uid] = (array("q"), array("q"))
            more[0].append(pos)
            more[1].append(tid)

    def add(self, keyed: Keyed) -> tuple[int, np.ndarray, np.ndarray]:
        """Record a task's examples under their keys (:meth:`keys`); returns (its task id, new
        uids, their rows to index)."""
        tid = self.next_tid
        self.next_tid += 1
        block, keys = keyed
        self.block_of[tid] = block
        known = self.blocks.get(block)
        first, n = self.next_pos, len(keys)
        self.next_pos += n
        self.count += n
        if known is not None and all(self.first_tid[u] >= 0 for u in known):
            # the same examples as another task (switches built from one example set): no row to look up
            for pos, uid in enumerate(known, first):
                self._own(uid, pos, tid)
            self.rows[tid] = known
            return tid, np.zeros(0, np.int64), np.zeros(0, np.int64)
        uid_of = self.uid_of
        uids, new, new_rows = array("q"), [], []
        for r, (pos, key) in enumerate(zip(range(first, first + n), keys)):
            uid = uid_of.get(key)
            if uid is None:
                uid = uid_of[key] = len(self.key_of)
                self.key_of.append(key)
                self.first_pos.append(pos)
                self.first_tid.append(tid)
                new.append(uid)
                new_rows.append(r)
            else:
                self._own(uid, pos, tid)
            uids.append(uid)
        self.rows[tid] = uids
        self.blocks[block] = uids
        return tid, np.asarray(new, np.int64), np.asarray(new_rows, np.int64)

    def remove(self, tid: int) -> list[int]:
        """Forget a task's examples; returns the uids no example stands for any more."""
        dead = []
        for uid in self.rows.pop(tid, ()):
            more = self.more.get(uid)  # never empty: emptied, it goes
            if self.first_tid[uid] == tid:
                if more is not None:
                    self.first_pos[uid], self.first_tid[uid] = more[0].pop(0), more[1].pop(0)
                else:
                    self.first_tid[uid] = -1
            elif more is not None:
                i = more[1].index(tid)
                del more[0][i], more[1][i]
            if more is not None and not more[1]:
                del self.more[uid]
            self.count -= 1
            if self.first_tid[uid] < 0:
                dead.append(uid)
        for uid in dead:
            self.uid_of.pop(self.key_of[uid], None)
        block = self.block_of.pop(tid, None)
        if dead and block is not None:
            self.blocks.pop(block, None)  # its vectors are no longer all indexed
        return dead

    def nearest(self, dist: np.ndarray, uids: np.ndarray, k: int) -> list[int]:
        """Task ids of the k nearest examples, from distinct vectors in ascending distance."""
        examples = []
        first_pos, first_tid, more = self.first_pos, self.first_tid, self.more
        for d, u in zip(dist.tolist(), uids.tolist()):
            if u >= 0:
                examples.append((d, first_pos[u], first_tid[u]))
                others = more.get(u)
                if others is not None:
                    examples.extend(zip(repeat(d), others[0][:k - 1], others[1][:k - 1]))
        examples.sort()
        return [tid for _, _, tid in examples[:k]]
