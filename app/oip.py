"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API) wire format: inference requests
and responses, in JSON or with the binary tensor data extension.

A request body is a JSON object, or (binary extension) a JSON object of ``Inference-Header-Content-
Length`` bytes followed by the raw bytes of the inputs that declare ``binary_data_size``, in order.
BYTES elements are strings in JSON (or ``{"b64": ...}`` objects, as Triton accepts), and in binary
each element is a 4-byte little-endian length followed by its bytes. Every size is checked against
the body before anything is allocated for it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import BadRequest

HEADER = "inference-header-content-length"
DTYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "UINT8": np.uint8, "INT32": np.int32,
          "INT64": np.int64}


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    value: Any  # numpy array, or a list of bytes for BYTES
    parameters: dict


def _json(raw: bytes, what: str) -> dict:
    try:
        out = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest(f"{what} is not valid JSON", 400) from None
    if not isinstance(out, dict):
        raise BadRequest(f"{what} must be a JSON object", 400)
    return out


def parse_request(body: bytes, header_length: str | None, max_elements: int) -> tuple[dict, list[Tensor]]:
    """(request object, its input tensors) from an infer request body."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise BadRequest(f"{HEADER} must be a byte count within the body", 400)
        n = int(header_length)
        req, binary = _json(body[:n], "the inference header"), memoryview(body)[n:]
    else:
        req, binary = _json(body, "the request body"), memoryview(b"")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("'inputs' must be a non-empty list of tensors", 400)
    tensors, offset = [], 0
    for i, spec in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(spec, dict):
            raise BadRequest(f"{where} must be an object", 400)
        name, dtype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
        params = spec.get("parameters") or {}
        if not isinstance(name, str) or not isinstance(params, dict):
            raise BadRequest(f"{where} needs a 'name' string (and 'parameters' must be an object)", 400)
        if dtype != "BYTES" and dtype not in DTYPES:
            raise BadRequest(f"{where} ({name}): datatype {dtype!r} is not supported", 400)
        if (not isinstance(shape, list) or not 1 <= len(shape) <= 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise BadRequest(f"{where} ({name}): shape must be a list of 1 to 8 non-negative integers", 400)
        count = math.prod(shape)
        if count > max_elements:
            raise BadRequest(f"{where} ({name}): {count:,} elements; at most {max_elements:,} are accepted", 413)
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                raise BadRequest(f"{where} ({name}): binary_data_size runs past the end of the body", 400)
            raw = binary[offset:offset + size]
            offset += size
            value = _from_binary(raw, dtype, count, f"{where} ({name})")
        else:
            if "data" not in spec:
                raise BadRequest(f"{where} ({name}) has neither 'data' nor parameters.binary_data_size", 400)
            value = _from_json(spec["data"], dtype, count, f"{where} ({name})")
        tensors.append(Tensor(name, dtype, list(shape), value, params))
    if offset != len(binary):
        raise BadRequest(f"the body holds {len(binary) - offset} bytes of binary data that no input claims", 400)
    return req, tensors


def _from_binary(raw: memoryview, dtype: str, count: int, where: str):
    if dtype == "BYTES":
        out, pos = [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise BadRequest(f"{where}: a BYTES element's length is cut off", 400)
            (n,) = struct.unpack_from("<I", raw, pos)
            if pos + 4 + n > len(raw):
                raise BadRequest(f"{where}: a BYTES element runs past its data", 400)
            out.append(bytes(raw[pos + 4:pos + 4 + n]))
            pos += 4 + n
        if len(out) != count:
            raise BadRequest(f"{where}: {len(out)} BYTES elements for a shape of {count}", 400)
        return out
    np_dtype = np.dtype(DTYPES[dtype]).newbyteorder("<")
    if len(raw) != count * np_dtype.itemsize:
        raise BadRequest(f"{where}: {len(raw)} bytes for {count} {dtype} elements", 400)
    return np.frombuffer(raw, dtype=np_dtype).astype(DTYPES[dtype])


def _flatten(data, limit: int, where: str) -> list:
    out, stack = [], [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
            if len(out) > limit:
                raise BadRequest(f"{where}: more data elements than its shape holds", 400)
    return out


def _from_json(data, dtype: str, count: int, where: str):
    flat = _flatten(data if isinstance(data, list) else [data], count, where)
    if len(flat) != count:
        raise BadRequest(f"{where}: {len(flat)} data elements for a shape of {count}", 400)
    if dtype == "BYTES":
        out = []
        for e in flat:
            if isinstance(e, str):
                out.append(e.encode("utf-8", "surrogateescape"))
            elif isinstance(e, dict) and isinstance(e.get("b64"), str):
                try:
                    out.append(base64.b64decode(e["b64"], validate=True))
                except (binascii.Error, ValueError):
                    raise BadRequest(f"{where}: an element's b64 is not valid base64", 400) from None
            else:
                raise BadRequest(f"{where}: BYTES elements must be strings or {{\"b64\": ...}} objects", 400)
        return out
    if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in flat):
        raise BadRequest(f"{where}: {dtype} data must be numbers", 400)
    return np.asarray(flat, dtype=DTYPES[dtype])


def response(model: str, req: dict, outputs: list[tuple[str, str, list[int], Any]], binary_all: bool
             ) -> tuple[bytes, dict[str, str]]:
    """The body and headers of an infer response. ``outputs`` are (name, datatype, shape, values),
    values a numpy array or a list of bytes (BYTES). Outputs the request asked for in binary (or
    all, with ``binary_all``) go after the JSON header."""
    asked = {o.get("name"): (o.get("parameters") or {}) for o in (req.get("outputs") or []) if isinstance(o, dict)}
    out, blobs = [], []
    for name, dtype, shape, values in outputs:
        binary = bool(asked.get(name, {}).get("binary_data", binary_all))
        entry = {"name": name, "datatype": dtype, "shape": shape}
        if binary:
            blob = (b"".join(struct.pack("<I", len(v)) + v for v in values) if dtype == "BYTES"
                    else np.ascontiguousarray(values, dtype=np.dtype(DTYPES[dtype]).newbyteorder("<")).tobytes())
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = [v.decode("utf-8", "replace") for v in values] if dtype == "BYTES" \
                else np.asarray(values).reshape(-1).tolist()
        out.append(entry)
    body = {"model_name": model, "model_version": "1", "outputs": out}
    if isinstance(req.get("id"), str):
        body["id"] = req["id"]
    head = json.dumps(body, separators=(",", ":")).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream", HEADER: str(len(head))}
