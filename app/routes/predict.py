"""POST /v1/predict (multipart or JSON) and POST /v1/predict/batch."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json

import torch
from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from switchbank.engine import Result, Route

from switchbank.errors import SwitchBankError

from ..errors import BadRequest, status_of, validation_message
from ..forms import content_type, form_file, read_form
from ..imaging import prepare
from ..schemas import BatchJSON, BatchResponse, ErrorResponse, Label, PredictJSON, PredictOptions, Prediction, PredictResponse

router = APIRouter(prefix="/v1", tags=["predict"])

ERRORS = {s: {"model": ErrorResponse} for s in (400, 404, 408, 413, 415, 422, 503)}
_OPTIONS = {"task": {"type": "string"}, "weights": {"type": "string", "description": "JSON object {switch: weight}"},
            "top_k": {"type": "integer", "minimum": 1, "maximum": 100}}
PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
                "image": {"type": "string", "format": "binary"}, **_OPTIONS}}},
            "application/json": {"schema": PredictJSON.model_json_schema()},
        },
    }
}


FIELDS = ("image", "task", "weights", "top_k")
MAX_WEIGHTS_CHARS = 16 << 10  # a weights field longer than this cannot be a sane {switch: weight} map


def _b64(data: str, where: str = "image") -> bytes:
    """Standard base64, with or without line breaks, optionally as a data: URL."""
    if data.startswith("data:"):
        head, sep, data = data.partition(",")
        if not sep or not head.endswith(";base64"):
            raise BadRequest(f"{where}: a data URL must be data:<type>;base64,<data>")
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where} is not valid base64 (standard alphabet, padded; line breaks and a "
                         "data:image/...;base64, prefix are accepted)") from None


async def _read_json(request: Request, model):
    body = await request.body()
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise BadRequest(validation_message(exc)) from None
    except RecursionError:
        raise BadRequest("JSON body is nested too deeply") from None


def _weights_field(raw: str):
    if len(raw) > MAX_WEIGHTS_CHARS:
        raise BadRequest(f"weights is {len(raw)} characters; at most {MAX_WEIGHTS_CHARS} are accepted")
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest('weights must be a JSON object {"switch": weight, ...}') from None
    if not isinstance(value, dict):
        raise BadRequest('weights must be a JSON object {"switch": weight, ...}')
    return value


async def _parse_single(request: Request) -> tuple[bytes, PredictOptions]:
    ctype = content_type(request)
    if ctype == "application/json":
        req = await _read_json(request, PredictJSON)
        return _b64(req.image), req
    if ctype == "multipart/form-data":
        form = await read_form(request, max_files=1, max_fields=8)
        seen: dict[str, int] = {}
        for key, _ in form.multi_items():
            seen[key] = seen.get(key, 0) + 1
        unknown = sorted(set(seen) - set(FIELDS))
        if unknown:
            raise BadRequest(f"unknown form field {unknown[0]!r}; the fields are {', '.join(FIELDS)}")
        repeated = sorted(k for k, n in seen.items() if n > 1)
        if repeated:
            raise BadRequest(f"form field {repeated[0]!r} is given {seen[repeated[0]]} times; give it once")
        upload = form_file(form, "image", "a file")
        raw = {k: form.get(k) for k in ("task", "weights", "top_k") if form.get(k) is not None}
        for k, v in raw.items():
            if not isinstance(v, str):
                raise BadRequest(f"form field {k!r} must be a plain value, not a file")
        if "weights" in raw:
            raw["weights"] = _weights_field(raw["weights"])
        try:
            opts = PredictOptions.model_validate(raw)
        except ValidationError as exc:
            raise BadRequest(validation_message(exc)) from None
        return await upload.read(), opts
    raise BadRequest("send multipart/form-data with an 'image' file, or application/json with base64 'image'", 415)


def _route(opts: PredictOptions) -> Route:
    return Route(task=opts.task, weights=opts.weights)


def _prediction(res: Result, top_k: int) -> Prediction:
    k = min(top_k, res.probs.numel())
    scores, idx = res.probs.topk(k)
    labels = [Label(label=res.classes[i], score=round(float(s), 6)) for s, i in zip(scores.tolist(), idx.tolist())]
    return Prediction(mode=res.mode, head=res.head, weights=res.weights, predictions=labels)


async def _decode(request: Request, data: bytes) -> torch.Tensor:
    state = request.app.state
    async with state.decode_slots:  # bounds the memory and CPU that decoding can take at once
        return await run_in_threadpool(prepare, data, state.engine.backbone.preprocess, state.settings.max_image_pixels)


async def _decode_b64(request: Request, data: str, where: str) -> torch.Tensor:
    return await _decode(request, _b64(data, where))


async def _classify(request: Request, tensor: torch.Tensor, opts: PredictOptions) -> Prediction:
    state = request.app.state
    res = await state.batcher.submit(tensor, _route(opts))
    state.metrics.predictions.labels(res.mode).inc()
    return _prediction(res, opts.top_k)


@router.post("/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=PREDICT_BODY,
             summary="Classify one image with a named task, explicit weights, or Auto-Switch routing")
async def predict(request: Request) -> PredictResponse:
    with request.app.state.batcher.arriving():
        data, opts = await _parse_single(request)
        tensor = await _decode(request, data)
    pred = await _classify(request, tensor, opts)
    return PredictResponse(request_id=request.state.request_id, **pred.model_dump())


BATCH_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": BatchJSON.model_json_schema()}}}}


async def _item(i: int, step):
    """One batch item's step (a coroutine); its errors name the item's index."""
    try:
        return await step
    except BadRequest as exc:
        exc.message = exc.message if exc.message.startswith(f"items[{i}]") else f"items[{i}]: {exc.message}"
        raise
    except SwitchBankError as exc:
        raise BadRequest(f"items[{i}]: {exc}", status_of(exc)) from None


@router.post("/predict/batch", response_model=BatchResponse, responses=ERRORS, openapi_extra=BATCH_BODY,
             summary="Classify several base64 images, each routed on its own")
async def predict_batch(request: Request) -> BatchResponse:
    if content_type(request) != "application/json":
        raise BadRequest("send application/json: {\"items\": [{\"image\": base64, ...}, ...]}", 415)
    with request.app.state.batcher.arriving():
        body = await _read_json(request, BatchJSON)
        limit = request.app.state.settings.batch_items
        if len(body.items) > limit:
            raise BadRequest(f"at most {limit} items per batch request, got {len(body.items)}", 413)
        items = list(enumerate(body.items))
        tensors = await asyncio.gather(*(_item(i, _decode_b64(request, it.image, f"items[{i}].image"))
                                         for i, it in items))
    preds = await asyncio.gather(*(_item(i, _classify(request, t, it)) for (i, it), t in zip(items, tensors)))
    return BatchResponse(request_id=request.state.request_id, results=list(preds))
