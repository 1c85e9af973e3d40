"""Hostile and malformed input: a clear 4xx, nothing lost, and the server healthy afterwards."""

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.settings import Settings
from switchbank.format import to_bytes
from tests.helpers import ARCH, make_bank, make_switch, task_switch_bytes

TOKEN = "hostile-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def client(tmp_path_factory, backbone, tower):
    bank = make_bank(tmp_path_factory.mktemp("bank"), backbone, tower)
    settings = Settings(bank=bank, arch=ARCH, device="cpu", admin_token=TOKEN, body_limit=2 << 20,
                        upload_limit=4 << 20, max_image_pixels=4_000_000)
    with TestClient(create_app(settings, configure_logging=False)) as c:
        yield c


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def predict(client, data: bytes, **fields):
    return client.post("/v1/predict", files={"image": ("x", data, "application/octet-stream")},
                       data={k: str(v) for k, v in fields.items()})


def png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares a huge image (a decompression bomb's calling card)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


RGB = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
UNUSUAL = {
    "cmyk-jpeg": encode(RGB.convert("CMYK"), "JPEG"),
    "16-bit-png": encode(Image.fromarray(np.arange(1600, dtype=np.uint16).reshape(40, 40) * 40), "PNG"),
    "palette-png": encode(RGB.convert("P"), "PNG"),
    "rgba-png": encode(RGB.convert("RGBA"), "PNG"),
    "la-png": encode(RGB.convert("LA"), "PNG"),
    "grey-bmp": encode(RGB.convert("L"), "BMP"),
    "animated-gif": encode(RGB.convert("P"), "GIF", save_all=True, append_images=[RGB.convert("P").rotate(90)]),
    "webp": encode(RGB, "WEBP"),
    "tiff-float": encode(Image.fromarray(np.random.default_rng(1).random((40, 40), dtype=np.float32)), "TIFF"),
}


@pytest.mark.parametrize("name", list(UNUSUAL))
def test_unusual_modes_are_served(client, name):
    r = predict(client, UNUSUAL[name], task="red")
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("data,status", [
    (png_with_size(100_000, 100_000), 413),           # declared 10^10 pixels
    (png_with_size(5000, 5000), 413),                 # above the configured 4M pixels
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, 422),       # PNG signature, garbage after
    (encode(RGB, "JPEG")[:300], 422),                 # truncated JPEG
    (b"%PDF-1.4 not an image", 422),
    (pickle.dumps({"a": 1}), 422),
    (b"", 422),
])
def test_bad_images(client, data, status):
    r = predict(client, data, task="red")
    assert r.status_code == status and r.json()["error"]
    assert client.get("/readyz").status_code == 200


def test_bad_weights_and_options(client):
    for weights, status in (('{"red": -1}', 422), ('{"red": NaN}', 422), ('{"red": 0, "blue": 0}', 422),
                            ('{"ghost": 1}', 404), ('[1, 2]', 422), ('not json', 422), ('{}', 422)):
        r = client.post("/v1/predict", files={"image": ("x", UNUSUAL["rgba-png"])}, data={"weights": weights})
        assert r.status_code == status, (weights, r.text)
    for top_k in ("0", "-3", "101", "abc"):
        r = client.post("/v1/predict", files={"image": ("x", UNUSUAL["rgba-png"])}, data={"top_k": top_k})
        assert r.status_code == 422
    r = client.post("/v1/predict", json={"image": "AAAA", "extra": 1})
    assert r.status_code == 422 and "extra" in r.json()["error"]


def upload(client, data: bytes, name="f"):
    return client.post("/v1/admin/switches", files={"file": (name, data, "application/octet-stream")}, headers=AUTH)


def test_hostile_uploads_change_nothing(client, backbone, tower):
    before = client.get("/v1/switches").json()
    good = task_switch_bytes(backbone, tower, "teal", seed=5)

    class Boom:
        def __reduce__(self):
            import os
            return (os.system, ("touch /tmp/switchbank-pwned",))

    cases = {
        "truncated": good[: len(good) // 2],
        "corrupted": good[:-50] + bytes(b ^ 0xFF for b in good[-50:]),
        "pickle in disguise": pickle.dumps({"mask": Boom()}),
        "torch zip in disguise": _torch_file(),
        "path characters in the name": to_bytes(make_switch(tower, "../../etc/passwd", seed=1)),
        "foreign backbone": to_bytes(make_switch({k: v * 1.01 for k, v in tower.items()}, "alien", seed=1,
                                                 dim=backbone.embed_dim)),
        "shape mismatch": _wrong_shape(tower, backbone),
        "no head": to_bytes(_headless(tower)),
        "empty": b"",
    }
    for what, data in cases.items():
        r = upload(client, data)
        assert r.status_code in (400, 413, 422), (what, r.status_code, r.text)
        assert r.json()["error"], what
    import os
    assert not os.path.exists("/tmp/switchbank-pwned")
    assert client.get("/v1/switches").json() == before
    assert client.get("/readyz").status_code == 200


def test_path_characters_in_admin_urls(client):
    for name in ("..", "a/b", "%2e%2e", "x" * 200, ".hidden"):
        r = client.delete(f"/v1/admin/switches/{name}", headers=AUTH)
        assert r.status_code in (404, 422), (name, r.status_code)
    assert len(client.get("/v1/switches").json()["switches"]) == 3


def _torch_file() -> bytes:
    buf = io.BytesIO()
    torch.save({"mask": torch.zeros(3)}, buf)
    return buf.getvalue()


def _headless(tower):
    sw = make_switch(tower, "headless", seed=2)
    sw.head = None
    return sw


def _wrong_shape(tower, backbone):
    name = next(k for k, v in tower.items() if v.dim() == 2)
    bad = dict(tower)
    bad[name] = torch.zeros(3, 3)
    from switchbank.build import build_switch
    sw = build_switch(bad, {k: v + 0.01 for k, v in bad.items()}, "wrongshape", 0.5)
    sw.backbone_fingerprint = backbone.fingerprint  # pretend: the shapes alone must stop it
    return to_bytes(sw)
