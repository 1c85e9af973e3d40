"""The switch file: safetensors tensors plus one JSON metadata entry. Documented in docs/format.md.

Reading checks everything before anything is used: header bounds (truncation), that it is a
switchbank file of a known version, the content hash over metadata and tensor bytes (corruption
and tampering), and that the bit buffers agree with the tensor index.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import CorruptSwitch
from .packing import compact_to_dense, dense_to_compact, pack_bits, packed_len, rice_decode, rice_encode, rice_len
from .types import Head, Switch, TensorEntry

FORMAT = "switchbank-switch"
VERSION = 1
META_KEY = "switchbank"
MAX_HEADER = 64 << 20


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
        tensors["head.weight"] = sw.head.weight.detach().cpu().to(torch.float32).contiguous()
        if sw.head.bias is not None:
            tensors["head.bias"] = sw.head.bias.detach().cpu().to(torch.float32).contiguous()
        meta["classes"] = list(sw.head.classes)
        meta["head_normalize"] = bool(sw.head.normalize)
    if sw.queries is not None:
        tensors["queries"] = sw.queries.detach().cpu().to(torch.float32).contiguous()
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


def _read_header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise CorruptSwitch(f"file is {len(data)} bytes: too short to be a switch file (truncated?)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or 8 + n > len(data):
        raise CorruptSwitch("header runs past the end of the file: truncated or not a safetensors file")
    try:
        header = json.loads(data[8:8 + n])
    except ValueError as exc:
        raise CorruptSwitch(f"header is not valid JSON: not a safetensors switch file ({exc})") from None
    if not isinstance(header, dict):
        raise CorruptSwitch("header is not a JSON object: not a safetensors file")
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    if 8 + n + max(ends, default=0) != len(data):
        raise CorruptSwitch(
            f"file is {len(data)} bytes but its header describes {8 + n + max(ends, default=0)}: truncated or padded"
        )
    return header


def read_meta(data: bytes) -> dict[str, Any]:
    """The switch metadata, checked for format and version (no tensor is decoded)."""
    header = _read_header(data)
    raw = (header.get("__metadata__") or {}).get(META_KEY)
    if raw is None:
        raise CorruptSwitch("safetensors file without switchbank metadata: not a switch file")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise CorruptSwitch("switchbank metadata is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptSwitch(f"metadata does not declare format {FORMAT!r}: not a switch file")
    if meta.get("version") != VERSION:
        raise CorruptSwitch(f"switch format version {meta.get('version')!r} is not supported (this build reads {VERSION})")
    return meta


def from_bytes(data: bytes) -> Switch:
    """Parse and fully verify a switch file's bytes."""
    meta = read_meta(data)
    try:
        tensors = st_load(data)
    except Exception as exc:
        raise CorruptSwitch(f"tensor data is unreadable: {exc}") from None
    if meta.get("content_hash") != content_hash(meta, tensors):
        raise CorruptSwitch("content hash mismatch: the file was corrupted or modified after it was written")
    try:
        return _assemble(meta, tensors)
    except CorruptSwitch:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CorruptSwitch(f"inconsistent switch file: {exc}") from None


def _assemble(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Switch:
    for key, dtype in (("mask", torch.uint8), ("sign", torch.uint8), ("scale", torch.float32)):
        if key not in tensors or tensors[key].dtype != dtype or tensors[key].dim() != 1:
            raise CorruptSwitch(f"tensor {key!r} is missing or not a 1-D {dtype}")
    mask, sign, scale = tensors["mask"].numpy(), tensors["sign"].numpy(), tensors["scale"]
    index = meta["tensors"]
    if len(index) != scale.numel():
        raise CorruptSwitch(f"{len(index)} tensors indexed but {scale.numel()} scales stored")
    entries, masks, poss, mo, so, dense_off = [], [], [], 0, 0, 0
    for i, row in enumerate(index):
        name, shape, kept, *rice = row
        e = TensorEntry(str(name), tuple(int(d) for d in shape), int(kept), float(scale[i]), dense_off)
        if not 0 <= e.kept <= e.numel or any(d < 0 for d in e.shape) or len(rice) not in (0, 2):
            raise CorruptSwitch(f"tensor {e.name!r}: bad index entry")
        mn = rice_len(e.kept, int(rice[0]), int(rice[1])) if rice else e.nbytes
        sn = packed_len(e.kept)
        if mo + mn > mask.size or so + sn > sign.size:
            raise CorruptSwitch(f"tensor {e.name!r}: bits run past the end of the mask/sign buffers")
        try:
            m = mask[mo:mo + mn]
            if rice:
                m = pack_bits(rice_decode(m, e.numel, e.kept, int(rice[0]), int(rice[1])))
            poss.append(compact_to_dense(m, sign[so:so + sn], e.numel, e.kept))
        except ValueError as exc:
            raise CorruptSwitch(f"tensor {e.name!r}: {exc}") from None
        masks.append(m)
        entries.append(e)
        mo, so, dense_off = mo + mn, so + sn, dense_off + e.nbytes
    if mo != mask.size or so != sign.size:
        raise CorruptSwitch("mask/sign buffers are longer than the tensor index says")
    head = None
    if "head.weight" in tensors:
        head = Head(tensors["head.weight"], tensors.get("head.bias"), list(meta["classes"]), bool(meta["head_normalize"]))
    queries = tensors.get("queries")
    if queries is not None and (queries.dim() != 2 or not meta.get("router_fingerprint")):
        raise CorruptSwitch("query embeddings must be [n, dim] and carry the router fingerprint")
    return Switch(
        name=str(meta["name"]),
        alpha=float(meta["alpha"]),
        backbone_fingerprint=str(meta["backbone_fingerprint"]),
        entries=entries,
        mask=torch.from_numpy(np.concatenate(masks) if masks else np.zeros(0, np.uint8)),
        pos=torch.from_numpy(np.concatenate(poss) if poss else np.zeros(0, np.uint8)),
        payload_bytes=_payload(tensors),
        dense={k[len("dense."):]: v for k, v in tensors.items() if k.startswith("dense.")},
        head=head,
        queries=queries,
        router_fingerprint=meta.get("router_fingerprint"),
        arch=meta.get("arch"),
        buffers_differing=list(meta.get("buffers_differing") or []),
        content_hash=str(meta["content_hash"]),
    )


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


def describe(sw: Switch, file_bytes: int | None = None) -> dict[str, Any]:
    """The figures ``switchbank inspect`` and the API report for a switch."""
    n = sw.n_params
    kept = sum(e.kept for e in sw.entries)
    if not sw.payload_bytes:
        to_bytes(sw)  # measures the on-disk encoding
    payload = sw.payload_bytes
    out: dict[str, Any] = {
        "name": sw.name,
        "format_version": VERSION,
        "alpha": sw.alpha,
        "arch": sw.arch,
        "parameters": n,
        "tensors": len(sw.entries),
        "kept_fraction": kept / n if n else 0.0,
        "switch_bytes": payload,
        "bits_per_param": 8 * payload / n if n else 0.0,
        "resident_bits_per_param": 8 * sw.resident_bytes() / n if n else 0.0,
        "classes": list(sw.head.classes) if sw.head else None,
        "queries": int(sw.queries.shape[0]) if sw.queries is not None else 0,
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
