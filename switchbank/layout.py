"""Reading what a switch file declares, and checking all of it before anything is decoded: the
safetensors header (bounds, the header cap), the switchbank metadata (format, version, every field's
type and range) and the tensor table (dtypes, shapes, byte ranges, and the bit buffers' sizes
against the tensor index). Documented in docs/format.md.
"""

from __future__ import annotations

import json
import math
import struct
import threading
from dataclasses import dataclass
from itertools import accumulate, chain
from operator import add, le
from typing import Any

import numpy as np
import torch

from .errors import CorruptSwitch
from .packing import rice_len

FORMAT = "switchbank-switch"
VERSION = 2
READS = (1, 2)
META_KEY = "switchbank"
MAX_HEADER = 64 << 20
MAX_NUMEL = 1 << 31  # elements in one switched tensor (the largest towers have about 10^8)
MAX_TEXT = 256  # characters in a name, class name, architecture or fingerprint
QUERY_DTYPE = {1: torch.float32, 2: torch.float16}


def _header(data) -> tuple[dict[str, Any], int]:
    """The safetensors header of ``data`` (bytes, or the first bytes of a file) and its length."""
    if len(data) < 8:
        raise CorruptSwitch(f"file is {len(data)} bytes: too short to be a switch file (truncated?)")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if n > MAX_HEADER:
        raise CorruptSwitch(f"header declares {n:,} bytes; switch headers are limited to {MAX_HEADER:,} bytes")
    if 8 + n > len(data):
        raise CorruptSwitch("header runs past the end of the file: truncated or not a safetensors file")
    try:
        header = json.loads(bytes(data[8:8 + n]))
    except (ValueError, RecursionError) as exc:
        raise CorruptSwitch(f"header is not valid JSON: not a safetensors switch file ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise CorruptSwitch("header is not a JSON object: not a safetensors file")
    return header, n


def _meta(header: dict[str, Any]) -> dict[str, Any]:
    raw = (header.get("__metadata__") or {}).get(META_KEY) if isinstance(header.get("__metadata__"), dict) else None
    if raw is None:
        raise CorruptSwitch("safetensors file without switchbank metadata: not a switch file")
    try:
        meta = json.loads(raw) if isinstance(raw, str) else None
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        raise CorruptSwitch("switchbank metadata is not a JSON object")
    if meta.get("format") != FORMAT:
        raise CorruptSwitch(f"metadata does not declare format {FORMAT!r}: not a switch file")
    if meta.get("version") not in READS:
        raise CorruptSwitch(f"switch format version {meta.get('version')!r} is not supported (this build reads "
                            f"{', '.join(map(str, READS))})")
    return meta


def _text(meta, key: str, optional: bool = False) -> None:
    v = meta.get(key)
    if v is None and optional:
        return
    if not isinstance(v, str) or not v or len(v) > MAX_TEXT:
        raise CorruptSwitch(f"metadata field {key!r} must be a non-empty string of at most {MAX_TEXT} characters")


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_meta(meta: dict[str, Any]) -> Index:
    """Every metadata field's type and range; CorruptSwitch naming the first bad field. Returns
    the shared part of its tensor index (:class:`Index`)."""
    _text(meta, "name")
    alpha = meta.get("alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or not 0 <= alpha < 1:
        raise CorruptSwitch("metadata field 'alpha' must be a number in [0, 1)")
    _text(meta, "arch", optional=True)
    _text(meta, "backbone_fingerprint")
    _text(meta, "router_fingerprint", optional=True)
    _text(meta, "content_hash")
    rows = meta.get("tensors")
    if not isinstance(rows, list):
        raise CorruptSwitch("metadata field 'tensors' must be a list")
    index = _rows_index(rows)
    if index is None:
        names: set = set()
        for i, row in enumerate(rows):
            _check_row(i, row, names)
        index = _rows_index(rows)
        if index is None:  # the two sets of checks disagree, which they must not
            raise CorruptSwitch("metadata field 'tensors' is malformed")
    classes = meta.get("classes")
    if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) and len(c) <= MAX_TEXT
                                                                          for c in classes)):
        raise CorruptSwitch(f"metadata field 'classes' must be a list of strings of at most {MAX_TEXT} characters")
    if meta.get("head_normalize") not in (None, True, False):
        raise CorruptSwitch("metadata field 'head_normalize' must be true, false or null")
    buffers = meta.get("buffers_differing")
    if buffers is not None and (not isinstance(buffers, list) or not all(isinstance(b, str) for b in buffers)):
        raise CorruptSwitch("metadata field 'buffers_differing' must be a list of strings")
    return index


@dataclass(frozen=True, eq=False)
class Index:
    """What the tensor indexes of one backbone's switches share: the tensors' names and shapes,
    checked once, and what follows from them. Each file's own kept counts and Rice parameters are
    checked per file."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    numel: np.ndarray  # int64, per tensor
    offsets: tuple[int, ...]  # each tensor's byte offset in the dense bit planes
    bitmaps: int  # bytes of every mask as a bitmap
    positions: dict[str, int]  # each tensor's position, by name
    shape_of: dict[str, tuple[int, ...]]  # each tensor's shape, by name


def _index(names: tuple, shapes: tuple) -> Index:
    numel = list(map(math.prod, shapes))
    offsets = (0, *accumulate((n + 7) // 8 for n in numel))
    return Index(names, shapes, np.array(numel, dtype=np.int64), offsets[:-1], offsets[-1],
                 {n: i for i, n in enumerate(names)}, dict(zip(names, shapes)))


_EMPTY = _index((), ())
# (names, shapes) -> Index, for the few backbones a process meets; a bank's switch files all share one
_INDEXES: dict[tuple, Index] = {}
_INDEXES_MAX = 16
_INDEXES_LOCK = threading.Lock()


def _shared(names: tuple, shapes: tuple) -> Index | None:
    """The Index of a tensor index's names and shapes (its first two columns), checked by the
    rules of :func:`_check_row`, or None for any doubt. Checked once per backbone: listing a bank's
    switch files at start-up spent a fifth of its time checking and deriving the same ones again."""
    # types first, so that a key equal to a cached one means the same rows (1 == 1.0 == True)
    if set(map(type, names)) != {str} or set(map(type, shapes)) != {list}:
        return None
    dims = list(chain.from_iterable(shapes))
    if set(map(type, dims)) != {int}:
        return None
    key = (names, tuple(map(tuple, shapes)))
    hit = _INDEXES.get(key)
    if hit is not None:
        return hit
    if len(set(names)) != len(names) or min(map(len, names)) < 1 or max(map(len, names)) > 1024:
        return None
    if min(map(len, shapes)) < 1 or max(map(len, shapes)) > 8 or min(dims) < 0:
        return None
    if max(map(math.prod, key[1])) > MAX_NUMEL:
        return None
    index = _index(*key)
    with _INDEXES_LOCK:
        if len(_INDEXES) >= _INDEXES_MAX:
            _INDEXES.pop(next(iter(_INDEXES)))
        _INDEXES[key] = index
    return index


def _rows_ok(rows: list) -> bool:
    """Whether every tensor row is well formed, by the same rules as :func:`_check_row`."""
    return _rows_index(rows) is not None


def _rows_index(rows: list) -> Index | None:
    """The rows' Index if every tensor row is well formed, by the same rules as :func:`_check_row`,
    checked a column at a time in C-level passes (a bank reads thousands of switches of hundreds of
    rows at start-up). None for any doubt; the row-by-row checks then name the first bad row."""
    if not rows:
        return _EMPTY
    if set(map(type, rows)) != {list}:
        return None
    widths = set(map(len, rows))
    if not widths <= {3, 5}:
        return None
    names, shapes, kept = list(zip(*rows))[:3]  # zip stops at the shortest row
    index = _shared(names, shapes)
    if index is None:
        return None
    if set(map(type, kept)) != {int} or min(kept) < 0 or max(kept) > MAX_NUMEL:
        return None
    if (np.array(kept, dtype=np.int64) > index.numel).any():
        return None
    if 5 in widths:  # the Rice-coded rows' parameters
        _, shapes, kept, k, unary = zip(*(row for row in rows if len(row) == 5))
        if set(map(type, k)) != {int} or set(map(type, unary)) != {int} or min(k) < 0 or max(k) >= 32:
            return None
        if min(unary) < 0 or not all(map(le, unary, map(add, map(math.prod, shapes), kept))):
            return None
    return index


def _check_row(i: int, row, names: set) -> None:
    where = f"metadata field 'tensors'[{i}]"
    if not isinstance(row, list) or len(row) not in (3, 5):
        raise CorruptSwitch(f"{where} must be [name, shape, kept] or [name, shape, kept, k, unary_bits]")
    name, shape, kept, *rice = row
    if not isinstance(name, str) or not name or len(name) > 1024 or name in names:
        raise CorruptSwitch(f"{where}: tensor name must be a unique non-empty string")
    names.add(name)
    if not isinstance(shape, list) or not shape or len(shape) > 8 or not all(_int(d) and 0 <= d for d in shape):
        raise CorruptSwitch(f"{where} ({name!r}): shape must be a list of 1 to 8 non-negative integers")
    numel = math.prod(shape)
    if numel > MAX_NUMEL:
        raise CorruptSwitch(f"{where} ({name!r}): {numel:,} elements; a switched tensor holds at most {MAX_NUMEL:,}")
    if not _int(kept) or not 0 <= kept <= numel:
        raise CorruptSwitch(f"{where} ({name!r}): kept must be an integer between 0 and {numel}")
    if rice and not (_int(rice[0]) and 0 <= rice[0] < 32 and _int(rice[1]) and 0 <= rice[1] <= numel + kept):
        raise CorruptSwitch(f"{where} ({name!r}): bad Rice code parameters")


_DTYPES = {"U8": torch.uint8, "F32": torch.float32, "F16": torch.float16}


def _table(header: dict[str, Any], meta: dict[str, Any], size: int | None,
           index: Index | None = None) -> dict[str, tuple[torch.dtype, tuple, tuple]]:
    """The tensor table from the header, checked against the metadata (``index``: the shared part
    of its tensor index, from :func:`check_meta`): key -> (dtype, shape, (start, end)) with offsets
    from the start of the data section."""
    table = {}
    for key, v in header.items():
        if key == "__metadata__":
            continue
        ok = (isinstance(v, dict) and v.get("dtype") in _DTYPES and isinstance(v.get("shape"), list)
              and all(_int(d) and d >= 0 for d in v["shape"]) and isinstance(v.get("data_offsets"), list)
              and len(v["data_offsets"]) == 2 and all(_int(o) and o >= 0 for o in v["data_offsets"]))
        if not ok:
            raise CorruptSwitch(f"tensor {key[:64]!r}: malformed entry in the safetensors header")
        dtype, shape, (start, end) = _DTYPES[v["dtype"]], tuple(v["shape"]), v["data_offsets"]
        if end - start != math.prod(shape) * dtype.itemsize:
            raise CorruptSwitch(f"tensor {key[:64]!r}: its byte range does not match its shape")
        table[key] = (dtype, shape, (start, end))
    if size is not None and max((e for _, _, (_, e) in table.values()), default=0) != size:
        raise CorruptSwitch(f"tensor data is {size:,} bytes but the header describes "
                            f"{max((e for _, _, (_, e) in table.values()), default=0):,}: truncated or padded")
    rows = meta["tensors"]
    mask_len, sign_len = _bit_lengths(rows, index or check_meta(meta))
    want = {"mask": (torch.uint8, (mask_len,)), "sign": (torch.uint8, (sign_len,)), "scale": (torch.float32, (len(rows),))}
    for key, (dtype, shape) in want.items():
        got = table.get(key)
        if got is None or got[:2] != (dtype, shape):
            raise CorruptSwitch(f"tensor {key!r} must be {dtype} of shape {list(shape)} to match the tensor index, "
                                f"found {'nothing' if got is None else f'{got[0]} of shape {list(got[1])}'}")
    classes = meta.get("classes")
    head = table.get("head.weight")
    if head is not None:
        if head[0] != torch.float32 or len(head[1]) != 2 or head[1][0] < 1 or head[1][1] < 1:
            raise CorruptSwitch("tensor 'head.weight' must be float32 [classes, dim]")
        if not isinstance(classes, list) or len(classes) != head[1][0]:
            raise CorruptSwitch(f"metadata field 'classes' must name the head's {head[1][0]} classes")
        if meta.get("head_normalize") is None:
            raise CorruptSwitch("metadata field 'head_normalize' must be true or false for a head")
        bias = table.get("head.bias")
        if bias is not None and bias[:2] != (torch.float32, (head[1][0],)):
            raise CorruptSwitch(f"tensor 'head.bias' must be float32 [{head[1][0]}]")
    elif "head.bias" in table:
        raise CorruptSwitch("tensor 'head.bias' without 'head.weight'")
    queries = table.get("queries")
    if queries is not None:
        qdtype = QUERY_DTYPE[meta["version"]]
        if queries[0] != qdtype or len(queries[1]) != 2 or queries[1][0] < 1 or queries[1][1] < 1:
            raise CorruptSwitch(f"tensor 'queries' must be {qdtype} [n, dim] with n >= 1")
        if not meta.get("router_fingerprint"):
            raise CorruptSwitch("query embeddings need metadata field 'router_fingerprint'")
    for key, (dtype, shape, _) in table.items():
        if key.startswith("dense."):
            if dtype != torch.float32 or shape:
                raise CorruptSwitch(f"tensor {key[:64]!r} must be a 0-dim float32")
        elif key not in ("mask", "sign", "scale", "head.weight", "head.bias", "queries"):
            raise CorruptSwitch(f"unexpected tensor {key[:64]!r} in a switch file")
    return table


def _bit_lengths(rows: list, index: Index) -> tuple[int, int]:
    """The sizes of the mask and sign buffers that checked rows declare."""
    kept = np.array([r[2] for r in rows], dtype=np.int64)
    mask_len = index.bitmaps
    for r in [r for r in rows if len(r) == 5]:  # Rice-coded: their own length instead of the bitmap's
        mask_len += rice_len(r[2], r[3], r[4]) - (math.prod(r[1]) + 7) // 8
    return mask_len, int(((kept + 7) // 8).sum())


@dataclass(frozen=True)
class Layout:
    """What a switch file declares, checked, before anything is decoded: its metadata and its
    tensor table (key -> (dtype, shape, byte range in the data section))."""

    meta: dict[str, Any]
    table: dict[str, tuple]
    data_start: int  # byte offset of the data section in the file
    index: Index | None = None  # the shared part of its tensor index

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Switched tensor name -> shape, from the index."""
        return {r[0]: tuple(r[1]) for r in self.meta["tensors"]}

    def dim(self, key: str, axis: int) -> int | None:
        entry = self.table.get(key)
        return None if entry is None else entry[1][axis]


def read_layout(data) -> Layout:
    """The checked layout of a switch file's bytes."""
    header, n = _header(data)
    meta = _meta(header)
    index = check_meta(meta)
    return Layout(meta, _table(header, meta, len(data) - 8 - n, index), 8 + n, index)
