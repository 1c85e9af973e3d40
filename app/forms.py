"""Reading request bodies: content type, and multipart forms parsed only after the size limit."""

from __future__ import annotations

from fastapi import Request

from .errors import BadRequest


def content_type(request: Request) -> str:
    """The media type of the body, without parameters, lower-case."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_form(request: Request, **limits):
    """The multipart form, parsed once the whole body is in (so the body limit applies first)."""
    await request.body()
    try:
        return await request.form(**limits)
    except Exception as exc:  # the multipart parser's errors are many; the client's fault either way
        raise BadRequest(f"malformed multipart body: {exc}", 400) from None


def form_file(form, field: str, what: str) -> object:
    """The uploaded file in ``field``; 422 when it is missing or a plain string."""
    upload = form.get(field)
    if upload is None or isinstance(upload, str):
        raise BadRequest(f"multipart field {field!r} ({what}) is required")
    return upload
