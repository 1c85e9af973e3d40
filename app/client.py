"""A small synchronous client for the switchbank API (httpx).

    from app.client import SwitchbankClient
    with SwitchbankClient("http://127.0.0.1:8000", admin_token="...") as sb:
        sb.predict("cat.jpg")                       # Auto-Switch routing
        sb.predict("digit.png", task="mnist")        # a named task (T-Switch)
        sb.upload("new-task.safetensors")            # admin: add a switch
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx


class SwitchbankError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


def _bytes(image: bytes | str | Path) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


class SwitchbankClient:
    def __init__(self, base_url: str, admin_token: str | None = None, timeout: float = 60.0):
        self._http = httpx.Client(base_url=base_url, timeout=timeout)
        self._admin = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}

    def __enter__(self) -> SwitchbankClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _check(self, r: httpx.Response) -> Any:
        if r.status_code >= 400:
            try:
                msg = r.json().get("error", r.text)
            except ValueError:
                msg = r.text
            raise SwitchbankError(r.status_code, msg)
        return r.json()

    # inference
    def predict(self, image: bytes | str | Path, *, task: str | None = None,
                weights: dict[str, float] | None = None, top_k: int = 5) -> dict:
        data: dict[str, str] = {"top_k": str(top_k)}
        if task is not None:
            data["task"] = task
        if weights is not None:
            data["weights"] = json.dumps(weights)
        return self._check(self._http.post("/v1/predict", files={"image": ("image", _bytes(image))}, data=data))

    def predict_batch(self, items: list[dict]) -> dict:
        """items: [{"image": bytes or path, "task"?: str, "weights"?: dict, "top_k"?: int}, ...]"""
        import base64
        body = [{**{k: v for k, v in it.items() if k != "image"},
                 "image": base64.b64encode(_bytes(it["image"])).decode()} for it in items]
        return self._check(self._http.post("/v1/predict/batch", json={"items": body}))

    def switches(self) -> dict:
        return self._check(self._http.get("/v1/switches"))

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    # admin
    def upload(self, file: bytes | str | Path, *, replace: bool = False) -> dict:
        files = {"file": ("switch.safetensors", _bytes(file), "application/octet-stream")}
        return self._check(self._http.post("/v1/admin/switches", params={"replace": str(replace).lower()},
                                           files=files, headers=self._admin))

    def delete(self, name: str) -> dict:
        return self._check(self._http.delete(f"/v1/admin/switches/{name}", headers=self._admin))

    def describe(self, name: str | None = None, *, limit: int = 100, after: str | None = None) -> dict:
        """One switch described in full, or (no name) a page of ``limit`` switches after ``after``."""
        if name:
            return self._check(self._http.get(f"/v1/admin/switches/{name}", headers=self._admin))
        params = {"limit": limit} | ({"after": after} if after is not None else {})
        return self._check(self._http.get("/v1/admin/switches", params=params, headers=self._admin))

    def cache_stats(self) -> dict:
        return self._check(self._http.get("/v1/admin/cache", headers=self._admin))
