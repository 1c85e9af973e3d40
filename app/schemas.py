"""Request and response models."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TOP_K = 100


class PredictOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str | None = Field(None, max_length=64, description="serve this switch (T-Switch)")
    weights: dict[str, float] | None = Field(
        None, max_length=256, description="explicit {switch: weight}; non-negative, not all zero")
    top_k: int = Field(5, ge=1, le=MAX_TOP_K, description="how many labels to return")

    @field_validator("weights")
    @classmethod
    def _weights(cls, v):
        if v is None:
            return v
        if not v:
            raise ValueError("weights must name at least one switch")
        for name, w in v.items():
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"weight for {name!r} must be a finite non-negative number")
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
    switches: list[SwitchSummary]


class ErrorResponse(BaseModel):
    error: str
    request_id: str | None = None
