"""POST /v1/predict (multipart or JSON) and POST /v1/predict/batch."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from switchbank.engine import Result, Route

from ..errors import BadRequest
from ..forms import content_type, form_file, read_form
from ..imaging import decode
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


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"] for e in exc.errors())


def _b64(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image is not valid base64") from None


async def _read_json(request: Request, model):
    body = await request.body()
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise BadRequest(_validation_message(exc)) from None


async def _parse_single(request: Request) -> tuple[bytes, PredictOptions]:
    ctype = content_type(request)
    if ctype == "application/json":
        req = await _read_json(request, PredictJSON)
        return _b64(req.image), req
    if ctype == "multipart/form-data":
        form = await read_form(request, max_files=1, max_fields=8)
        upload = form_file(form, "image", "a file")
        raw = {k: form.get(k) for k in ("task", "weights", "top_k") if form.get(k) not in (None, "")}
        if "weights" in raw:
            try:
                raw["weights"] = json.loads(raw["weights"])
            except ValueError:
                raise BadRequest("weights must be a JSON object {switch: weight}") from None
        try:
            opts = PredictOptions.model_validate(raw)
        except ValidationError as exc:
            raise BadRequest(_validation_message(exc)) from None
        return await upload.read(), opts
    raise BadRequest("send multipart/form-data with an 'image' file, or application/json with base64 'image'", 415)


def _route(opts: PredictOptions) -> Route:
    return Route(task=opts.task, weights=opts.weights)


def _prediction(res: Result, top_k: int) -> Prediction:
    k = min(top_k, res.probs.numel())
    scores, idx = res.probs.topk(k)
    labels = [Label(label=res.classes[i], score=round(float(s), 6)) for s, i in zip(scores.tolist(), idx.tolist())]
    return Prediction(mode=res.mode, head=res.head, weights=res.weights, predictions=labels)


async def _classify(request: Request, data: bytes, opts: PredictOptions) -> Prediction:
    state = request.app.state
    tensor = await run_in_threadpool(_preprocess, state, data)
    res = await state.batcher.submit(tensor, _route(opts))
    state.metrics.predictions.labels(res.mode).inc()
    return _prediction(res, opts.top_k)


def _preprocess(state, data: bytes):
    image = decode(data, state.settings.max_image_pixels)
    return state.engine.backbone.preprocess(image)


@router.post("/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=PREDICT_BODY,
             summary="Classify one image with a named task, explicit weights, or Auto-Switch routing")
async def predict(request: Request) -> PredictResponse:
    data, opts = await _parse_single(request)
    pred = await _classify(request, data, opts)
    return PredictResponse(request_id=request.state.request_id, **pred.model_dump())


BATCH_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": BatchJSON.model_json_schema()}}}}


@router.post("/predict/batch", response_model=BatchResponse, responses=ERRORS, openapi_extra=BATCH_BODY,
             summary="Classify several base64 images, each routed on its own")
async def predict_batch(request: Request) -> BatchResponse:
    if content_type(request) != "application/json":
        raise BadRequest("send application/json: {\"items\": [{\"image\": base64, ...}, ...]}", 415)
    body = await _read_json(request, BatchJSON)
    limit = request.app.state.settings.batch_items
    if len(body.items) > limit:
        raise BadRequest(f"at most {limit} items per batch request, got {len(body.items)}", 413)
    datas = [_b64(item.image) for item in body.items]
    preds = await asyncio.gather(*(_classify(request, d, item) for d, item in zip(datas, body.items)))
    return BatchResponse(request_id=request.state.request_id, results=list(preds))
