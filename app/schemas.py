"""Request and response models."""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, field_validator, model_validator

MAX_TOP_K = 100
MAX_WEIGHT = 10.0  # explicit weights scale task vectors; far beyond 1 a merged tower stops meaning anything


class PredictOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str | None = Field(None, min_length=1, max_length=64,
                             description="serve this switch (T-Switch); omit it for Auto-Switch")
    weights: dict[str, Annotated[StrictFloat, Field(ge=0, le=MAX_WEIGHT)]] | None = Field(
        None, max_length=256,
        description=f"explicit {{switch: weight}}: each in [0, {MAX_WEIGHT:g}], not all zero, applied as given")
    top_k: int = Field(5, ge=1, le=MAX_TOP_K, description="how many labels to return")

    @field_validator("weights")
    @classmethod
    def _weights(cls, v):
        if v is None:
            return v
        if not v:
            raise ValueError("weights must name at least one switch")
        for name, w in v.items():
            if not math.isfinite(w) or not 0 <= w <= MAX_WEIGHT:
                raise ValueError(f"weight for {name!r} must be a number between 0 and {MAX_WEIGHT:g}")
        if not any(w > 0 for w in v.values()):
            raise ValueError("weights must not all be zero")
        return v

    @model_validator(mode="after")
    def _one_mode(self):
        if self.task is not None and self.weights is not None:
            raise ValueError("give either task or weights, not both")
        return self


class PredictJSON(PredictOptions):
    image: str = Field(..., min_length=1, description="the image file, base64-encoded")


class BatchJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[PredictJSON] = Field(..., min_length=1)


class Label(BaseModel):
    label: str
    score: float


class Prediction(BaseModel):
    mode: str = Field(..., description="task, weights or auto")
    head: str = Field(..., description="the switch whose classification head produced the labels")
    weights: dict[str, float] = Field(..., description="the switch weights applied")
    predictions: list[Label]


class PredictResponse(Prediction):
    request_id: str


class BatchResponse(BaseModel):
    request_id: str
    results: list[Prediction]


class SwitchSummary(BaseModel):
    name: str
    classes: list[str] | None
    alpha: float
    parameters: int
    bits_per_param: float
    file_bytes: int
    queries: int


class SwitchList(BaseModel):
    generation: int
    total: int = Field(..., description="switches served")
    switches: list[SwitchSummary]
    next_after: str | None = Field(None, description="pass as ?after= for the next page; null on the last page")


class ErrorResponse(BaseModel):
    error: str
    request_id: str | None = None
