import base64
import json

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.helpers import ARCH, colour_png, make_bank, task_switch_bytes

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory, backbone, tower):
    return make_bank(tmp_path_factory.mktemp("bank"), backbone, tower)


@pytest.fixture(scope="module")
def client(bank_dir):
    settings = Settings(bank=bank_dir, arch=ARCH, device="cpu", admin_token=TOKEN, k=5, batch_wait_ms=2,
                        body_limit=1 << 20, upload_limit=4 << 20, sync_seconds=0.2)
    with TestClient(create_app(settings, configure_logging=False)) as c:
        yield c


def predict(client, png, **fields):
    data = {k: (json.dumps(v) if k == "weights" else str(v)) for k, v in fields.items()}
    return client.post("/v1/predict", files={"image": ("x.png", png, "image/png")}, data=data)


def test_health_and_readiness(client):
    assert client.get("/livez").json() == {"status": "alive"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["switches"] == 3


def test_predict_named_task_multipart_and_json(client):
    png = colour_png("red", 1)
    a = predict(client, png, task="green", top_k=2)
    assert a.status_code == 200, a.text
    body = a.json()
    assert body["mode"] == "task" and body["head"] == "green" and body["weights"] == {"green": 1.0}
    assert len(body["predictions"]) == 2 and body["predictions"][0]["label"].startswith("green-")
    b = client.post("/v1/predict", json={"image": base64.b64encode(png).decode(), "task": "green", "top_k": 2})
    assert b.status_code == 200 and b.json()["predictions"] == body["predictions"]


def test_predict_auto_routes_to_the_images_task(client):
    for task in ("red", "green", "blue"):
        r = predict(client, colour_png(task, 77))
        assert r.status_code == 200, r.text
        assert r.json()["mode"] == "auto" and r.json()["head"] == task and r.json()["weights"] == {task: 1.0}


def test_predict_explicit_weights(client):
    r = predict(client, colour_png("red", 2), weights={"red": 0.3, "blue": 0.7})
    assert r.status_code == 200 and r.json()["head"] == "blue" and r.json()["weights"] == {"blue": 0.7, "red": 0.3}


def test_batch_form(client):
    items = [{"image": base64.b64encode(colour_png(t, 5)).decode()} for t in ("blue", "red")]
    items.append({"image": items[0]["image"], "task": "green"})
    r = client.post("/v1/predict/batch", json={"items": items})
    assert r.status_code == 200, r.text
    assert [x["head"] for x in r.json()["results"]] == ["blue", "red", "green"]


def test_request_id_is_echoed(client):
    r = client.get("/livez", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = predict(client, colour_png("red", 3), task="red")
    assert r.json()["request_id"] == r.headers["x-request-id"]


@pytest.mark.parametrize("kwargs,status,message", [
    ({"task": "nope"}, 404, "nope"),
    ({"weights": {"red": -1}}, 422, "greater than or equal to 0"),
    ({"weights": {"red": 11}}, 422, "less than or equal to 10"),
    ({"weights": {"red": 0}}, 422, "zero"),
    ({"weights": {"nope": 1}}, 404, "nope"),
    ({"top_k": 0}, 422, "top_k"),
    ({"top_k": 1000}, 422, "top_k"),
    ({"task": "red", "weights": {"red": 1}}, 422, "either"),
])
def test_bad_options(client, kwargs, status, message):
    r = predict(client, colour_png("red", 4), **kwargs)
    assert r.status_code == status and message in r.json()["error"]


def test_bad_bodies(client):
    assert client.post("/v1/predict", files={"image": ("x", b"not an image", "image/png")}).status_code == 422
    assert client.post("/v1/predict", files={"image": ("x", colour_png("red", 1)[:60], "image/png")}).status_code == 422
    assert client.post("/v1/predict", files={"image": ("x", b"", "image/png")}).status_code == 422
    assert client.post("/v1/predict", content=b"raw", headers={"content-type": "text/plain"}).status_code == 415
    r = client.post("/v1/predict", json={"image": "***not base64***"})
    assert r.status_code == 422 and "base64" in r.json()["error"]
    r = client.post("/v1/predict", content=b"{bad json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = client.post("/v1/predict", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.get("/readyz").status_code == 200  # still healthy
    # no failed request is still counted as on its way (which would hold every later batch)
    assert client.app.state.batcher._arriving == 0


def test_public_switch_list(client):
    r = client.get("/v1/switches").json()
    assert [s["name"] for s in r["switches"]] == ["blue", "green", "red"]
    # what each switch's bits take on disk, whether or not they were read yet (about H(1 - alpha) + (1 - alpha))
    assert all(0.5 < s["bits_per_param"] < 1.5 and s["classes"] for s in r["switches"]), r["switches"]


@pytest.mark.parametrize("path", ["/v1/switches", "/v1/admin/switches"])
def test_switch_lists_come_a_page_at_a_time(client, path):
    names, after, pages = [], None, 0
    while True:
        params = {"limit": 2} | ({"after": after} if after else {})
        r = client.get(path, params=params, headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["total"] == 3 and len(body["switches"]) <= 2
        names += [s["name"] for s in body["switches"]]
        pages += 1
        after = body["next_after"]
        if after is None:
            break
    assert names == ["blue", "green", "red"] and pages == 2
    if path.startswith("/v1/admin"):
        assert body["switches"][0]["content_hash"].startswith("sha256:")
        assert client.get(path + "/nope", headers=AUTH).status_code == 404
    for bad in ({"limit": 0}, {"limit": 1001}, {"after": "x" * 65}):
        assert client.get(path, params=bad, headers=AUTH).status_code == 422


def test_admin_requires_the_token(client):
    for method, path in (("get", "/v1/admin/switches"), ("get", "/v1/admin/cache"), ("delete", "/v1/admin/switches/red"),
                         ("post", "/v1/admin/switches"), ("put", "/v1/admin/switches/red"), ("get", "/v1/admin/switches/red")):
        assert getattr(client, method)(path).status_code == 401
        assert getattr(client, method)(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/admin/switches", headers=AUTH).status_code == 200


def test_admin_upload_replace_delete(client, backbone, tower):
    data = task_switch_bytes(backbone, tower, "purple", seed=42)
    files = {"file": ("purple.safetensors", data, "application/octet-stream")}
    r = client.post("/v1/admin/switches", files=files, headers=AUTH)
    assert r.status_code == 201, r.text
    assert predict(client, colour_png("red", 9), task="purple").json()["head"] == "purple"  # routable at once
    assert client.post("/v1/admin/switches", files=files, headers=AUTH).status_code == 200  # idempotent
    other = task_switch_bytes(backbone, tower, "purple", seed=43)
    files2 = {"file": ("p.safetensors", other, "application/octet-stream")}
    assert client.post("/v1/admin/switches", files=files2, headers=AUTH).status_code == 409
    assert client.put("/v1/admin/switches/purple", files=files2, headers=AUTH).status_code == 201
    assert client.put("/v1/admin/switches/orange", files=files2, headers=AUTH).status_code == 422  # name mismatch
    info = client.get("/v1/admin/switches/purple", headers=AUTH).json()
    assert info["name"] == "purple" and info["file_bytes"] == len(other)
    assert client.delete("/v1/admin/switches/purple", headers=AUTH).status_code == 200
    assert predict(client, colour_png("red", 9), task="purple").status_code == 404
    assert client.delete("/v1/admin/switches/purple", headers=AUTH).status_code == 404


def test_bad_uploads_change_nothing(client, backbone, tower):
    before = client.get("/v1/switches").json()
    good = task_switch_bytes(backbone, tower, "teal", seed=7)
    for bad in (good[:-100], b"junk" * 100, good[:200] + bytes([good[200] ^ 1]) + good[201:]):
        r = client.post("/v1/admin/switches", files={"file": ("t", bad, "application/octet-stream")}, headers=AUTH)
        assert r.status_code == 422, r.text
    r = client.post("/v1/admin/switches", content=b"x" * (5 << 20), headers={**AUTH, "content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413
    assert client.get("/v1/switches").json() == before


def test_metrics(client):
    predict(client, colour_png("red", 1), task="red")
    text = client.get("/metrics").text
    for name in ("switchbank_requests_total", "switchbank_request_seconds_bucket", "switchbank_batch_size_bucket",
                 "switchbank_cache_hits_total", "switchbank_cache_misses_total", "switchbank_cache_evictions_total",
                 "switchbank_cache_bytes", "switchbank_materialise_seconds_bucket", "switchbank_queue_depth",
                 "switchbank_batches_mixed_total", "switchbank_groups_cold_total"):
        assert name in text
    assert "switchbank_mixed_forward 1.0" in text
    assert "switchbank_router_rebuilds_total 0.0" in text and "switchbank_router_drift 0.0" in text
    assert "switchbank_router_rebuilding 0.0" in text
    assert "switchbank_resident_heads " in text and "switchbank_head_loads_total " in text
    assert TOKEN not in text


def test_admin_cache_reports_heads_read_from_the_bank(client):
    assert predict(client, colour_png("green", 2), task="green").status_code == 200
    stats = client.get("/v1/admin/cache", headers=AUTH).json()
    heads = stats["heads"]
    assert heads["heads"] >= 1 and heads["loads"] >= 1 and 0 < heads["head_bytes"] <= heads["budget_bytes"]
    assert stats["switches"]["green"]["head_bytes"] > 0
    assert sum(s.get("head_bytes", 0) for s in stats["switches"].values()) == heads["head_bytes"]


def test_openapi(client):
    spec = client.get("/openapi.json").json()
    assert "/v1/predict" in spec["paths"] and "/v1/admin/switches" in spec["paths"]
    assert client.get("/docs").status_code == 200


def test_admin_closed_without_a_configured_token(bank_dir):
    settings = Settings(bank=bank_dir, arch=ARCH, device="cpu")
    with TestClient(create_app(settings, configure_logging=False)) as c:
        for path in ("/v1/admin/switches", "/v1/admin/cache"):
            r = c.get(path, headers={"Authorization": "Bearer anything"})
            assert r.status_code == 403 and "SWITCHBANK_ADMIN_TOKEN" in r.json()["error"]


def test_slow_body_gets_408(bank_dir):
    import asyncio

    import httpx

    settings = Settings(bank=bank_dir, arch=ARCH, device="cpu", body_timeout=0.3)
    app = create_app(settings, configure_logging=False)

    async def trickle():
        yield b'{"image": "'
        await asyncio.sleep(1.0)
        yield b'"}'

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                return await c.post("/v1/predict", content=trickle(), headers={"content-type": "application/json"})

    r = asyncio.run(main())
    assert r.status_code == 408 and "0.3" in r.json()["error"]


def test_the_bundled_demo_bank_is_served_from_a_copy(tmp_path, monkeypatch):
    """Admin changes to the demo bank go to a copy: the repository's files never change."""
    import hashlib

    import app.main as main_module
    from app.settings import DEFAULT_BANK
    copy = tmp_path / "var" / "demo-bank"
    monkeypatch.setattr(main_module, "DEMO_COPY", copy)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in DEFAULT_BANK.rglob("*") if p.is_file()}
    settings = Settings(bank=DEFAULT_BANK, device="cpu", admin_token=TOKEN)
    with TestClient(create_app(settings, configure_logging=False)) as c:
        r = c.delete("/v1/admin/switches/faces", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200
        assert "faces" not in [s["name"] for s in c.get("/v1/switches").json()["switches"]]
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in DEFAULT_BANK.rglob("*") if p.is_file()}
    assert after == before
    assert "faces" not in (copy / "manifest.json").read_text()
