"""The Open Inference Protocol v2 over REST (KServe v2 / Triton's HTTP API), beside /v1.

Every switch is a model (its name: T-Switch); the model ``auto`` routes each input with Auto-Switch,
or applies the explicit weights in the request's ``parameters.weights``. Inputs: ``IMAGE``, a BYTES
tensor of encoded images [N] or [N, 1], or ``PIXELS``, an FP32 tensor of preprocessed images
[N, 3, H, W]. Outputs: ``PROBABILITIES``, FP32 [N, classes], or with the classification extension
(``parameters.classification: k``, tritonclient's ``class_count``) BYTES [N, k] of
"score:index:label"; and ``ROUTING``, BYTES [N] of JSON {"mode", "head", "weights"} per input.
The same limits and checks as /v1 apply.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import torch
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from switchbank import __version__
from switchbank.engine import Result, Route
from switchbank.errors import NotFound

from ..errors import BadRequest, validation_message
from ..imaging import prepare
from ..oip import HEADER, parse_request, response
from ..schemas import ErrorResponse, PredictOptions

router = APIRouter(prefix="/v2", tags=["open inference protocol"])
AUTO = "auto"
EXTENSIONS = ["classification", "binary_tensor_data", "model_repository"]


def _image_size(state) -> tuple[int, int]:
    return tuple(state.engine.backbone.probe().shape[-2:])


def _model(state, name: str):
    """None for the Auto-Switch model, else the switch of that name (404 if there is none)."""
    if name == AUTO:
        return None
    sw = state.engine.switches.get(name)
    if sw is None:
        raise NotFound(f"model {name!r} not found: models are the switches' names and {AUTO!r}")
    return sw


@router.get("", summary="Server metadata")
async def server_metadata() -> dict:
    return {"name": "switchbank", "version": __version__, "extensions": EXTENSIONS}


@router.get("/health/live", summary="The server is live")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="The server is ready for inference")
async def ready(request: Request):
    ok = bool(getattr(request.app.state, "ready", False))
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


def _metadata(state, name: str) -> dict:
    sw = _model(state, name)
    h, w = _image_size(state)
    classes = -1 if sw is None else len(sw.head.classes)
    return {
        "name": name, "versions": ["1"], "platform": "switchbank",
        "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [-1]},
                   {"name": "PIXELS", "datatype": "FP32", "shape": [-1, 3, h, w]}],
        "outputs": [{"name": "PROBABILITIES", "datatype": "FP32", "shape": [-1, classes]},
                    {"name": "ROUTING", "datatype": "BYTES", "shape": [-1]}],
        "parameters": {"mode": "auto" if sw is None else "task",
                       **({} if sw is None else {"classes": list(sw.head.classes)})},
    }


def _config(state, name: str) -> dict:
    """The model as a Triton model configuration (what perf_analyzer and Triton clients read)."""
    sw = _model(state, name)
    h, w = _image_size(state)
    return {
        "name": name, "platform": "switchbank", "backend": "switchbank", "max_batch_size": 0,
        "input": [{"name": "IMAGE", "data_type": "TYPE_STRING", "dims": [-1], "optional": True},
                  {"name": "PIXELS", "data_type": "TYPE_FP32", "dims": [-1, 3, h, w], "optional": True}],
        "output": [{"name": "PROBABILITIES", "data_type": "TYPE_FP32", "dims": [-1, -1 if sw is None else len(sw.head.classes)]},
                   {"name": "ROUTING", "data_type": "TYPE_STRING", "dims": [-1]}],
    }


ERRORS = {s: {"model": ErrorResponse} for s in (400, 404, 408, 413, 415, 422, 503)}
INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": {"type": "object"}},
        "outputs": {"type": "array", "items": {"type": "object"}}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


async def model_metadata(name: str, request: Request) -> dict:
    return _metadata(request.app.state, name)


async def model_ready(name: str, request: Request):
    state = request.app.state
    sw = _model(state, name)
    ok = bool(getattr(state, "ready", False)) and (sw is not None or len(state.engine.router) > 0)
    return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)


async def model_config(name: str, request: Request) -> dict:
    return _config(request.app.state, name)


async def infer(name: str, request: Request) -> Response:
    return await _infer(request, name)


def _versioned(fn):
    """The same endpoint under /versions/{version} (every switch has one version, "1")."""
    async def endpoint(name: str, version: str, request: Request):
        return await fn(name, request)
    endpoint.__name__ = fn.__name__ + "_version"
    return endpoint


for path, fn, method, summary, extra in (
    ("", model_metadata, "GET", "Model metadata", None),
    ("/ready", model_ready, "GET", "The model is ready", None),
    ("/config", model_config, "GET", "The model as a Triton model configuration", None),
    ("/infer", infer, "POST", "Inference (JSON, or JSON and binary tensor data)", INFER_BODY),
):
    for prefix in ("/models/{name}", "/models/{name}/versions/{version}"):
        endpoint = fn if "version" not in prefix else _versioned(fn)
        router.add_api_route(prefix + path, endpoint, methods=[method], summary=summary, responses=ERRORS,
                             openapi_extra=extra, response_model=None)


def _route(state, name: str, params: dict) -> Route:
    sw = _model(state, name)
    weights = params.get("weights")
    if sw is not None:
        if weights is not None:
            raise BadRequest(f"explicit weights go to model {AUTO!r}; model {name!r} is T-Switch", 400)
        return Route(task=name)
    if weights is None:
        return Route()
    if isinstance(weights, str):
        if len(weights) > 16 << 10:
            raise BadRequest("parameters.weights is too long", 400)
        try:
            weights = json.loads(weights)
        except (ValueError, RecursionError):
            raise BadRequest('parameters.weights must be a JSON object {"switch": weight}', 400) from None
    try:
        opts = PredictOptions.model_validate({"weights": weights})
    except ValidationError as exc:
        raise BadRequest(validation_message(exc, "parameters."), 400) from None
    return Route(weights=opts.weights)


async def _images(state, tensors) -> list[torch.Tensor]:
    """One preprocessed image per input row, from IMAGE (encoded) or PIXELS (preprocessed)."""
    by_name = {t.name: t for t in tensors}
    unknown = sorted(set(by_name) - {"IMAGE", "PIXELS"})
    if unknown or len(tensors) != len(by_name):
        raise BadRequest(f"inputs are IMAGE (BYTES) or PIXELS (FP32), once each; got {[t.name for t in tensors]}", 400)
    if len(by_name) != 1:
        raise BadRequest("give one input: IMAGE (encoded images) or PIXELS (preprocessed images)", 400)
    limit = state.settings.batch_items
    if "IMAGE" in by_name:
        t = by_name["IMAGE"]
        if t.datatype != "BYTES" or not (len(t.shape) == 1 or (len(t.shape) == 2 and t.shape[1] == 1)):
            raise BadRequest("IMAGE must be a BYTES tensor of shape [N] or [N, 1]", 400)
        if not 1 <= len(t.value) <= limit:
            raise BadRequest(f"IMAGE holds {len(t.value)} images; 1 to {limit} per request", 413 if t.value else 400)
        preprocess, pixels = state.engine.backbone.preprocess, state.settings.max_image_pixels

        async def one(i, data):
            async with state.decode_slots:
                try:
                    return await run_in_threadpool(prepare, data, preprocess, pixels)
                except BadRequest as exc:
                    raise BadRequest(f"IMAGE[{i}]: {exc.message}", exc.status) from None
        return list(await asyncio.gather(*(one(i, d) for i, d in enumerate(t.value))))
    t = by_name["PIXELS"]
    h, w = _image_size(state)
    if t.datatype != "FP32" or len(t.shape) != 4 or t.shape[1:] != [3, h, w] or not 1 <= t.shape[0] <= limit:
        raise BadRequest(f"PIXELS must be FP32 [N, 3, {h}, {w}] with 1 <= N <= {limit}", 400)
    pixels = np.ascontiguousarray(t.value, dtype=np.float32).reshape(t.shape)
    if not np.isfinite(pixels).all():  # numpy: torch would start an OpenMP team on this thread
        raise BadRequest("PIXELS holds NaN or infinite values", 400)
    x = torch.from_numpy(pixels)
    return list(x)


def _outputs(req: dict, results: list[Result]) -> list[tuple]:
    asked = req.get("outputs")
    if asked is not None and not isinstance(asked, list):
        raise BadRequest("'outputs' must be a list", 400)
    wanted = {o.get("name"): (o.get("parameters") or {}) for o in (asked or []) if isinstance(o, dict)}
    if not wanted:
        wanted = {"PROBABILITIES": {}, "ROUTING": {}}
    unknown = sorted(set(wanted) - {"PROBABILITIES", "ROUTING"}, key=str)
    if unknown:
        raise BadRequest(f"unknown output {unknown[0]!r}; the outputs are PROBABILITIES and ROUTING", 400)
    out = []
    n = len(results)
    for name, params in wanted.items():
        if name == "ROUTING":
            rows = [json.dumps({"mode": r.mode, "head": r.head, "weights": r.weights}).encode() for r in results]
            out.append(("ROUTING", "BYTES", [n], rows))
            continue
        k = params.get("classification")
        if k is not None:
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 100:
                raise BadRequest("parameters.classification must be an integer from 1 to 100", 400)
            rows = []
            for r in results:
                scores, idx = r.probs.topk(min(k, r.probs.numel()))
                rows.extend(f"{s:.6f}:{i}:{r.classes[i]}".encode() for s, i in zip(scores.tolist(), idx.tolist()))
            out.append(("PROBABILITIES", "BYTES", [n, len(rows) // n], rows))
            continue
        sizes = {r.probs.numel() for r in results}
        if len(sizes) != 1:
            raise BadRequest("the inputs use heads with different numbers of classes; ask for PROBABILITIES with "
                             "parameters.classification (class_count) instead", 400)
        out.append(("PROBABILITIES", "FP32", [n, sizes.pop()], torch.stack([r.probs for r in results]).numpy()))
    return out


async def _infer(request: Request, name: str) -> Response:
    state = request.app.state
    _model(state, name)
    with state.batcher.arriving():
        body = await request.body()
        h, w = _image_size(state)
        req, tensors = parse_request(body, request.headers.get(HEADER), state.settings.batch_items * 3 * h * w)
        params = req.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest("'parameters' must be an object", 400)
        route = _route(state, name, params)
        images = await _images(state, tensors)
    results = await asyncio.gather(*(state.batcher.submit(x, route) for x in images))
    for r in results:
        state.metrics.predictions.labels(r.mode).inc()
    content, headers = response(name, req, _outputs(req, list(results)), bool(params.get("binary_data_output")))
    return Response(content=content, headers=headers)
