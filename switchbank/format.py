"""The switch file: safetensors tensors plus one JSON metadata entry. Documented in docs/format.md.

Every field of a file is treated as hostile until checked, and checked before anything is
allocated for it (layout.py: header bounds, format and version, every metadata field, the tensor
table against the tensor index). A caller can check the layout against its backbone at that point
too, before a byte is decoded. Then the content hash over metadata and tensor bytes (corruption
and tampering), then decoding, with every float (scales, head, query embeddings) required to be
finite. A switch can also be read without its bits (read_light), which load_bits reads later.

Version 2 stores query embeddings as float16 (half the bytes; routing reads them as float32).
Version 1 files (float32 queries) still load.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import CorruptSwitch, SwitchChanged
# the layout checks are part of this module's interface (read_layout, Layout, the constants)
from .layout import (FORMAT, MAX_HEADER, META_KEY, QUERY_DTYPE, READS, VERSION, Index, Layout, _header, _meta,  # noqa: F401
                     _table, check_meta, read_layout)
from .packing import dense_to_compact, expand_signs, packed_len, rice_encode, rice_len, rice_to_bitmap
from .types import Entries, Head, Switch


def _canonical(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def content_hash(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the metadata (without its own hash) and every tensor's dtype, shape and bytes."""
    h = hashlib.sha256(_canonical({k: v for k, v in meta.items() if k != "content_hash"}))
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"\0{key}:{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def _encode_mask(mask_bytes: np.ndarray, n: int, kept: int) -> tuple[np.ndarray, list]:
    """The cheaper of a bitmap and a Rice code for one tensor's mask, with its index fields."""
    if 0 < kept < n // 2:  # a Rice code can only win on masks less than half full
        mask = np.unpackbits(mask_bytes, count=n, bitorder="little").astype(bool)
        stream, k, unary_bits = rice_encode(mask)
        if stream.size < mask_bytes.size:
            return stream, [k, unary_bits]
    return mask_bytes, []


def _tensors_and_meta(sw: Switch) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    signs, masks, index = [], [], []
    all_mask = sw.mask.cpu().numpy()
    all_pos = sw.pos.cpu().numpy()
    for e in sw.entries:
        m = all_mask[e.offset:e.offset + e.nbytes]
        signs.append(dense_to_compact(m, all_pos[e.offset:e.offset + e.nbytes], e.numel))
        coded, extra = _encode_mask(m, e.numel, e.kept)
        masks.append(coded)
        index.append([e.name, list(e.shape), e.kept, *extra])
    tensors: dict[str, torch.Tensor] = {
        "mask": torch.from_numpy(np.concatenate(masks) if masks else np.zeros(0, np.uint8)),
        "sign": torch.from_numpy(np.concatenate(signs) if signs else np.zeros(0, np.uint8)),
        "scale": torch.tensor([e.scale for e in sw.entries], dtype=torch.float32),
    }
    for k, v in sw.dense.items():
        tensors[f"dense.{k}"] = v.detach().cpu().to(torch.float32).contiguous()
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "name": sw.name,
        "alpha": sw.alpha,
        "arch": sw.arch,
        "backbone_fingerprint": sw.backbone_fingerprint,
        "router_fingerprint": sw.router_fingerprint,
        "tensors": index,
        "buffers_differing": sw.buffers_differing,
        "classes": None,
        "head_normalize": None,
    }
    if sw.head is not None:
        if sw.head.listed:
            raise ValueError(f"switch {sw.name!r} holds a listing of its head; read it (read_head) to write the switch")
        tensors["head.weight"] = sw.head.weight.detach().cpu().to(torch.float32).contiguous()
        if sw.head.bias is not None:
            tensors["head.bias"] = sw.head.bias.detach().cpu().to(torch.float32).contiguous()
        meta["classes"] = list(sw.head.classes)
        meta["head_normalize"] = bool(sw.head.normalize)
    if sw.queries is not None:
        tensors["queries"] = sw.queries.detach().cpu().to(QUERY_DTYPE[VERSION]).contiguous()
    return tensors, meta


def _payload(tensors: dict[str, torch.Tensor]) -> int:
    return tensors["mask"].numel() + tensors["sign"].numel() + 4 * tensors["scale"].numel()


def to_bytes(sw: Switch) -> bytes:
    """Serialise a switch; sets ``sw.content_hash``."""
    tensors, meta = _tensors_and_meta(sw)
    meta["content_hash"] = content_hash(meta, tensors)
    sw.content_hash = meta["content_hash"]
    sw.payload_bytes = _payload(tensors)
    return st_save(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def write_switch(sw: Switch, path: str | Path) -> int:
    """Write a switch file; returns its size in bytes. (The bank adds atomicity on top.)"""
    data = to_bytes(sw)
    Path(path).write_bytes(data)
    return len(data)


def read_meta(data: bytes) -> dict[str, Any]:
    """The switch metadata, checked (no tensor is decoded)."""
    return read_layout(data).meta


def from_bytes(data: bytes, check: Callable[[Layout], None] | None = None) -> Switch:
    """Parse and fully verify a switch file's bytes. ``check(layout)`` runs before any decoding
    (a server checks names and shapes against its backbone there)."""
    layout = read_layout(data)
    if check is not None:
        check(layout)
    try:
        tensors = st_load(data)
    except Exception:
        raise CorruptSwitch("tensor data is unreadable") from None
    meta = layout.meta
    if meta["content_hash"] != content_hash(meta, tensors):
        raise CorruptSwitch("content hash mismatch: the file was corrupted or modified after it was written")
    sw = _light(meta, tensors, layout.index)
    sw.mask, sw.pos = decode_bits(meta, tensors["mask"].numpy(), tensors["sign"].numpy())
    return sw


def all_finite(a: np.ndarray) -> bool:
    """Whether every value of ``a`` is finite; float16 by its exponent bits (numpy's isfinite is
    slow on float16)."""
    if a.dtype == np.float16:
        return not a.size or int((a.view(np.uint16) & 0x7C00).max()) < 0x7C00
    return bool(np.isfinite(a).all())


def _finite(key: str, t: torch.Tensor) -> torch.Tensor:
    if not all_finite(t.numpy()):
        raise CorruptSwitch(f"tensor {key!r} contains NaN or infinite values")
    return t


def _light(meta: dict[str, Any], tensors: dict[str, torch.Tensor], index: Index) -> Switch:
    """A switch with everything but its bits: index, scales, head, queries, 0-dim deltas
    (``index``: the shared part of its tensor index, from check_meta)."""
    scale = _finite("scale", tensors["scale"])
    entries = Entries(index, [r[2] for r in meta["tensors"]], scale.tolist())
    head = None
    if "head.weight" in tensors:
        bias = tensors.get("head.bias")
        head = Head(_finite("head.weight", tensors["head.weight"]), None if bias is None else _finite("head.bias", bias),
                    list(meta["classes"]), bool(meta["head_normalize"]))
    queries = tensors.get("queries")
    if queries is not None:
        queries = _finite("queries", queries.to(torch.float32))
    payload = sum(tensors[k].numel() * tensors[k].element_size() for k in ("mask", "sign", "scale") if k in tensors)
    return Switch(
        name=meta["name"], alpha=float(meta["alpha"]), backbone_fingerprint=meta["backbone_fingerprint"],
        entries=entries, mask=None, pos=None, payload_bytes=payload,
        dense={k[len("dense."):]: _finite(k, v) for k, v in tensors.items() if k.startswith("dense.")},
        head=head, queries=queries, router_fingerprint=meta.get("router_fingerprint"), arch=meta.get("arch"),
        buffers_differing=list(meta.get("buffers_differing") or []), content_hash=meta["content_hash"],
        format_version=meta["version"], query_count=0 if queries is None else int(queries.shape[0]),
    )


def decode_bits(meta: dict[str, Any], mask: np.ndarray, sign: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense in-memory bit planes (mask, pos) from the file's mask and sign buffers."""
    rows = meta["tensors"]
    if any(len(r) == 5 for r in rows):  # Rice-coded masks are expanded to bitmaps first
        parts, mo = [], 0
        for name, shape, kept, *rice in rows:
            numel = math.prod(shape)
            mn = rice_len(kept, rice[0], rice[1]) if rice else packed_len(numel)
            m = mask[mo:mo + mn]
            if rice:
                try:
                    m = rice_to_bitmap(m, numel, kept, rice[0], rice[1])
                except ValueError as exc:
                    raise CorruptSwitch(f"tensor {name!r}: {exc}") from None
            parts.append(m)
            mo += mn
        mask = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    else:  # bitmaps only: the file's mask stream is already the dense plane
        mask = np.ascontiguousarray(mask)
    lens = np.array([packed_len(math.prod(r[1])) for r in rows], dtype=np.int64)
    kept = np.array([r[2] for r in rows], dtype=np.int64)
    try:
        pos = expand_signs(mask, np.ascontiguousarray(sign), lens, kept)
    except ValueError as exc:
        i = int(str(exc).split()[1].rstrip(":")) if str(exc).startswith("tensor ") else None
        where = f"tensor {rows[i][0]!r}" if i is not None else "a tensor"
        raise CorruptSwitch(f"{where}: {str(exc).split(': ', 1)[-1]}") from None
    return torch.from_numpy(mask.copy()), torch.from_numpy(pos)


def read_switch(path: str | Path) -> Switch:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorruptSwitch(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return from_bytes(data)
    except CorruptSwitch as exc:
        raise CorruptSwitch(f"{path}: {exc}") from None


def read_light(path: str | Path) -> Switch:
    """A switch without its bits (``mask`` and ``pos`` are None): the header, scales and 0-dim deltas
    are read and kept; the head is read and checked, and kept as a listing (types.Head.listed) that
    :func:`read_head` completes; the bit buffers and the query embeddings (see :func:`read_queries`)
    are not read.
    :func:`load_bits` reads and checks the rest, against the content hash, when it is first needed."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            first = f.read(8)
            if len(first) < 8:
                raise CorruptSwitch("file is too short to be a switch file (truncated?)")
            (n,) = struct.unpack("<Q", first)
            if n > MAX_HEADER:
                raise CorruptSwitch(f"header declares {n:,} bytes; switch headers are limited to {MAX_HEADER:,} bytes")
            head = first + f.read(n)
            header, _ = _header(head)
            meta = _meta(header)
            index = check_meta(meta)
            size = path.stat().st_size - 8 - n
            table = _table(header, meta, size, index)
            tensors = {}
            for key, (dtype, shape, (start, end)) in table.items():
                if key in ("mask", "sign", "queries"):
                    continue
                f.seek(8 + n + start)
                raw = f.read(end - start)
                if len(raw) != end - start:
                    raise CorruptSwitch("file is shorter than its header says (truncated?)")
                tensors[key] = torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape) if raw else \
                    torch.zeros(shape, dtype=dtype)
    except OSError as exc:
        raise CorruptSwitch(f"{path}: cannot read ({exc.strerror})") from None
    except CorruptSwitch as exc:
        raise CorruptSwitch(f"{path}: {exc}") from None
    sw = _light(meta, tensors, index)
    sw.source = path
    if sw.head is not None:  # checked; its bytes stay in the file until a request needs them
        spans, crc = [], 0
        for k in ("head.weight", "head.bias"):
            if k in table:
                start, end = table[k][2]
                spans.append((8 + n + start, end - start))
                crc = zlib.crc32(tensors[k].numpy().view(np.uint8), crc)
        sw.head_at = (spans[0], spans[1] if len(spans) > 1 else None, crc)
        sw.head = sw.head.listing()
    sw.payload_bytes = sum(end - start for key, (_, _, (start, end)) in table.items() if key in ("mask", "sign", "scale"))
    if "queries" in table:
        dtype, shape, (start, end) = table["queries"]
        sw.query_count = shape[0]
        sw.queries_at = (8 + n + start, end - start, dtype, shape)
    return sw


class Recent:
    """The last few query blocks read, so that switches built from the same examples (one example
    set shared by many fine-tunes) get one tensor: converted and checked once, and recognised by
    the router as the same object. Keyed by a prefix of the bytes, confirmed on all of them."""

    def __init__(self, size: int = 32):
        self.size, self.blocks = size, {}

    def get(self, raw: bytes | bytearray, dtype, shape):
        key = (dtype, shape, hash(bytes(memoryview(raw)[:4096])))
        hit = self.blocks.get(key)
        return key, (hit[1] if hit is not None and hit[0] == raw else None)

    def put(self, key, raw: bytes | bytearray, q: torch.Tensor) -> None:
        if len(self.blocks) >= self.size:
            self.blocks.pop(next(iter(self.blocks)))
        self.blocks[key] = (raw, q)


def read_queries(sw: Switch, recent: Recent | None = None) -> torch.Tensor:
    """The query embeddings of a switch read with :func:`read_light`, as the file stores them (float16
    from version 2 on, float32 before), straight from the byte range its header gave, and checked to
    be finite. With ``recent``, a block of the same bytes as one read lately is that block's tensor,
    which callers must not change."""
    if sw.queries is not None:
        return sw.queries
    if sw.source is None or sw.queries_at is None:
        raise CorruptSwitch(f"switch {sw.name!r} has no query embeddings")
    offset, size, dtype, shape = sw.queries_at
    try:
        with open(sw.source, "rb") as f:
            f.seek(offset)
            raw = bytearray(size)  # read into, so that torch can take the bytes without a copy
            got = f.readinto(raw)
    except OSError as exc:
        raise CorruptSwitch(f"{sw.source}: cannot read ({exc.strerror})") from None
    if got != size:
        raise CorruptSwitch(f"{sw.source}: file is shorter than its header says (truncated?)")
    key, q = recent.get(raw, dtype, shape) if recent is not None else (None, None)
    if q is None:
        q = _finite("queries", torch.frombuffer(raw, dtype=dtype).reshape(shape))  # never empty: layout._table
        if recent is not None:
            recent.put(key, raw, q)
    return q


def _as_listed(sw: Switch) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The metadata and tensors of a switch from :func:`read_light`, read again from its whole file
    and checked against the content hash it was listed with."""
    try:
        data = Path(sw.source).read_bytes()
    except FileNotFoundError:
        raise SwitchChanged(f"{sw.source}: the file was removed since it was listed") from None
    except OSError as exc:
        raise CorruptSwitch(f"{sw.source}: cannot read ({exc.strerror})") from None
    header, _ = _header(data)
    meta = _meta(header)
    # the metadata was checked when the switch was listed; the content hash, which covers it,
    # proves it is the same, so only the hash and the bits' own consistency are checked here
    if meta.get("content_hash") != sw.content_hash:
        raise SwitchChanged(f"{sw.source}: the file changed since it was listed (content hash differs)")
    try:
        tensors = st_load(data)
    except Exception:
        raise CorruptSwitch(f"{sw.source}: tensor data is unreadable") from None
    if content_hash(meta, tensors) != sw.content_hash:
        raise CorruptSwitch(f"{sw.source}: content hash mismatch: the file was corrupted after it was listed")
    return meta, tensors


def load_bits(sw: Switch) -> None:
    """Read and decode the bits of a switch from :func:`read_light`, checking the whole file against
    the content hash it was listed with."""
    meta, tensors = _as_listed(sw)
    sw.mask, sw.pos = decode_bits(meta, tensors["mask"].numpy(), tensors["sign"].numpy())


def read_head(sw: Switch) -> Head:
    """The head of a switch from :func:`read_light`, with its weights read again from the byte
    ranges it was listed with and found equal to them (CRC-32). Bytes that differ (a file written
    again in another layout) are taken from the whole file, checked against the content hash."""
    listed = sw.head
    if listed is None or not listed.listed:
        raise CorruptSwitch(f"switch {sw.name!r} has no head to read")
    weight_at, bias_at, crc = sw.head_at
    raw = []
    try:
        with open(sw.source, "rb") as f:
            for offset, size in [at for at in (weight_at, bias_at) if at is not None]:
                f.seek(offset)
                buf = bytearray(size)
                if f.readinto(buf) != size:
                    break
                raw.append(buf)
    except FileNotFoundError:
        raise SwitchChanged(f"{sw.source}: the file was removed since it was listed") from None
    except OSError as exc:
        raise CorruptSwitch(f"{sw.source}: cannot read ({exc.strerror})") from None
    got = 0
    for buf in raw:
        got = zlib.crc32(buf, got)
    if len(raw) == 1 + (bias_at is not None) and got == crc:
        weight = torch.frombuffer(raw[0], dtype=torch.float32).reshape(len(listed.classes), listed.dim)
        bias = torch.frombuffer(raw[1], dtype=torch.float32) if bias_at is not None else None
    else:
        _, tensors = _as_listed(sw)
        weight, bias = tensors["head.weight"], tensors.get("head.bias")
    return Head(_finite("head.weight", weight), None if bias is None else _finite("head.bias", bias),
                listed.classes, listed.normalize)


def describe(sw: Switch, file_bytes: int | None = None) -> dict[str, Any]:
    """The figures ``switchbank inspect`` and the API report for a switch."""
    n = sw.n_params
    kept = sum(e.kept for e in sw.entries)
    if not sw.payload_bytes:
        to_bytes(sw)  # measures the on-disk encoding
    payload = sw.payload_bytes
    out: dict[str, Any] = {
        "name": sw.name,
        "format_version": sw.format_version,
        "alpha": sw.alpha,
        "arch": sw.arch,
        "parameters": n,
        "tensors": len(sw.entries),
        "kept_fraction": kept / n if n else 0.0,
        "switch_bytes": payload,
        "bits_per_param": 8 * payload / n if n else 0.0,
        "resident_bits_per_param": 8 * sw.resident_bytes() / n if n else 0.0,
        "classes": list(sw.head.classes) if sw.head else None,
        "queries": int(sw.queries.shape[0]) if sw.queries is not None else sw.query_count,
        "backbone_fingerprint": sw.backbone_fingerprint,
        "router_fingerprint": sw.router_fingerprint,
        "buffers_differing": list(sw.buffers_differing),
        "full_precision_tensors": sorted(sw.dense),
        "content_hash": sw.content_hash,
    }
    if file_bytes is not None:
        out["file_bytes"] = file_bytes
        out["file_bits_per_param"] = 8 * file_bytes / n if n else 0.0
    return out
