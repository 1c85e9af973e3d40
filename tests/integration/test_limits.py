"""Classes of hostile or absurd input, each with many cases: a clear 4xx that names the problem, no
5xx, no non-finite score, bounded work, and the bank unchanged after every refusal."""

import base64
import io
import json
import math

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from app import imaging
from app.main import create_app
from app.settings import Settings
from switchbank.format import content_hash
from tests.helpers import ARCH, make_bank, task_switch_bytes

TOKEN = "limits-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def client(tmp_path_factory, backbone, tower):
    bank = make_bank(tmp_path_factory.mktemp("bank"), backbone, tower)
    settings = Settings(bank=bank, arch=ARCH, device="cpu", admin_token=TOKEN, max_image_pixels=4_000_000)
    with TestClient(create_app(settings, configure_logging=False), raise_server_exceptions=False) as c:
        yield c


def png(arr: np.ndarray, mode=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def predict(client, data: bytes, **fields):
    return client.post("/v1/predict", files={"image": ("x", data, "application/octet-stream")},
                       data={k: str(v) for k, v in fields.items()})


def ok_scores(r) -> None:
    assert r.status_code == 200, r.text
    assert all(math.isfinite(p["score"]) for p in r.json()["predictions"])


# --- 1. image geometry ------------------------------------------------------------------------
STRIPS = [(100_000, 1), (1, 100_000), (60_000, 3), (3, 60_000), (20_000, 40), (4_000, 1_000), (257, 128)]


@pytest.mark.parametrize("w,h", STRIPS)
def test_elongated_images_are_cut_before_scaling(w, h):
    seen = []
    arr = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    imaging.prepare(png(arr), lambda im: seen.append(im.size) or torch.zeros(3, 4, 4), 4_000_000)
    (pw, ph), short = seen[0], min(w, h)
    assert max(pw, ph) <= imaging.MAX_ASPECT * min(pw, ph) and min(pw, ph) == short


@pytest.mark.parametrize("w,h", STRIPS[:4])
def test_strips_are_served(client, w, h):
    arr = np.random.default_rng(1).integers(0, 255, (h, w, 3), dtype=np.uint8)
    ok_scores(predict(client, png(arr), task="red"))


def test_declared_geometry_beyond_the_limit_is_413(client):
    from tests.integration.test_hostile import png_with_size
    for w, h in ((1, 10**7), (10**7, 1), (5000, 5000), (2**31 - 1, 2)):
        r = predict(client, png_with_size(w, h), task="red")
        assert r.status_code == 413 and "pixels" in r.json()["error"], (w, h)


# --- 2. unexpected exceptions ----------------------------------------------------------------
@pytest.mark.parametrize("depth", [100, 10_000, 100_000])
def test_deeply_nested_weights_are_422(client, depth):
    weights = "[" * depth + "]" * depth
    r = predict(client, png(np.zeros((8, 8, 3), np.uint8)), weights=weights)
    assert r.status_code == 422, r.text
    nested = '{"red": ' + "[" * depth + "]" * depth + "}"
    r = client.post("/v1/predict", content=f'{{"image": "AAAA", "weights": {nested}}}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text


# --- 4. absurd weights -----------------------------------------------------------------------
@pytest.mark.parametrize("weights", ['{"red": 1e38}', '{"red": 10.5}', '{"red": 1e308, "blue": 1e308}',
                                     '{"red": Infinity}', '{"red": -0.5}', '{"red": "1"}', '{"red": true}'])
def test_weights_out_of_range_are_refused(client, weights):
    r = predict(client, png(np.zeros((8, 8, 3), np.uint8)), weights=weights)
    assert r.status_code == 422, (weights, r.text)


@pytest.mark.parametrize("weights", ['{"red": 10}', '{"red": 10, "blue": 10, "green": 10}', '{"red": 0.001}'])
def test_weights_in_range_give_finite_scores(client, weights):
    ok_scores(predict(client, png(np.full((8, 8, 3), 200, np.uint8)), weights=weights))


# --- 5. images as a viewer sees them ---------------------------------------------------------
@pytest.mark.parametrize("orientation,turned", [(1, False), (3, False), (6, True), (8, True)])
def test_exif_orientation_is_applied(orientation, turned):
    im = Image.fromarray(np.random.default_rng(2).integers(0, 255, (20, 60, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    assert imaging.decode(buf.getvalue(), 10**6).size == ((20, 60) if turned else (60, 20))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_images_with_non_finite_pixels_are_refused(client, bad):
    arr = np.random.default_rng(3).random((16, 16), dtype=np.float32)
    arr[3, 4] = bad
    buf = io.BytesIO()
    Image.fromarray(arr, "F").save(buf, format="TIFF")
    r = predict(client, buf.getvalue(), task="red")
    assert r.status_code == 422 and "NaN or infinite" in r.json()["error"]


# --- 6. ambiguity ----------------------------------------------------------------------------
def test_form_fields_are_strict(client):
    image = ("image", ("x", png(np.zeros((8, 8, 3), np.uint8)), "image/png"))
    cases = {
        "repeated task": [image, ("task", (None, "red")), ("task", (None, "blue"))],
        "misspelt field": [image, ("taks", (None, "red"))],
        "empty task": [image, ("task", (None, ""))],
        "two images": [image, image],
        "task and weights": [image, ("task", (None, "red")), ("weights", (None, '{"red": 1}'))],
    }
    for what, files in cases.items():
        r = client.post("/v1/predict", files=files)
        assert r.status_code == 422 or (what == "two images" and r.status_code == 400), (what, r.status_code, r.text)
    assert client.post("/v1/predict", json={"image": "AAAA", "task": ""}).status_code == 422


# --- 7 and 8. hostile switch files -----------------------------------------------------------
def forge(data: bytes, meta_edit=None, tensor_edit=None) -> bytes:
    """A switch file with edited metadata or tensors and a content hash that matches them, so that
    only the field checks can stop it."""
    import struct
    n = struct.unpack("<Q", data[:8])[0]
    meta = json.loads(json.loads(data[8:8 + n])["__metadata__"]["switchbank"])
    tensors = st_load(data)
    if meta_edit:
        meta_edit(meta)
    if tensor_edit:
        tensor_edit(tensors)
    meta["content_hash"] = content_hash(meta, tensors)
    return st_save(tensors, metadata={"switchbank": json.dumps(meta)})


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


def _row(i, field, value):
    def edit(m):
        m["tensors"][i][field] = value
    return edit


def _tensor(key, fn):
    def edit(t):
        t[key] = fn(t[key])
    return edit


HOSTILE = {
    "1e12 elements": dict(meta_edit=_row(0, 1, [10**6, 10**6])),
    "2e9 elements": dict(meta_edit=_row(0, 1, [2 * 10**9])),
    "negative dimension": dict(meta_edit=_row(0, 1, [-4, 8])),
    "kept beyond numel": dict(meta_edit=_row(0, 2, 10**9)),
    "integer class names": dict(meta_edit=_set("classes", [0, 1, 2])),
    "too few class names": dict(meta_edit=_set("classes", ["a"])),
    "alpha NaN": dict(meta_edit=_set("alpha", float("nan"))),
    "alpha 1": dict(meta_edit=_set("alpha", 1.0)),
    "alpha as text": dict(meta_edit=_set("alpha", "0.6")),
    "name as number": dict(meta_edit=_set("name", 7)),
    "head_normalize as text": dict(meta_edit=_set("head_normalize", "yes")),
    "NaN scale": dict(tensor_edit=_tensor("scale", lambda t: torch.where(torch.arange(t.numel()) == 0, float("nan"), t))),
    "infinite scale": dict(tensor_edit=_tensor("scale", lambda t: t + float("inf"))),
    "NaN in the head": dict(tensor_edit=_tensor("head.weight", lambda t: t.index_fill(0, torch.tensor([0]), float("nan")))),
    "empty query embeddings": dict(tensor_edit=_tensor("queries", lambda t: t[:0])),
    "NaN query embedding": dict(tensor_edit=_tensor("queries", lambda t: t.index_fill(0, torch.tensor([1]), float("nan")))),
    "query embeddings of another width": dict(tensor_edit=_tensor("queries", lambda t: t[:, :5].contiguous())),
    "head of another width": dict(tensor_edit=_tensor("head.weight", lambda t: t[:, :5].contiguous())),
    "extra tensor": dict(tensor_edit=lambda t: t.__setitem__("payload", torch.zeros(10**4))),
    "scale of the wrong dtype": dict(tensor_edit=_tensor("scale", lambda t: t.double())),
}


@pytest.fixture(scope="module")
def good_switch(backbone, tower):
    return task_switch_bytes(backbone, tower, "teal", seed=7)


@pytest.mark.parametrize("what", list(HOSTILE))
def test_hostile_switch_files_are_refused_and_change_nothing(client, good_switch, what):
    bank_before = client.get("/v1/switches").json()
    r = client.post("/v1/admin/switches", files={"file": ("s", forge(good_switch, **HOSTILE[what]))}, headers=AUTH)
    assert r.status_code == 422, (what, r.status_code, r.text)
    assert r.json()["error"]
    assert client.get("/v1/switches").json() == bank_before
    ok_scores(predict(client, png(np.zeros((8, 8, 3), np.uint8)), task="red"))


def test_a_forged_but_sound_file_is_accepted(client, good_switch):
    r = client.post("/v1/admin/switches", files={"file": ("s", forge(good_switch))}, headers=AUTH)
    assert r.status_code in (200, 201), r.text
    client.delete("/v1/admin/switches/teal", headers=AUTH)


# --- 9. clear messages -----------------------------------------------------------------------
def test_messages_name_the_cause_without_internals(client):
    for data in (b"not an image at all", b"GIF89a" + b"\x00" * 20, b"\x89PNG\r\n\x1a\n" + b"\x01" * 40):
        msg = predict(client, data, task="red").json()["error"]
        assert "0x" not in msg and "BytesIO" not in msg and "Traceback" not in msg, msg
    huge = (100 << 20).to_bytes(8, "little") + b"{}"
    r = client.post("/v1/admin/switches", files={"file": ("s", huge)}, headers=AUTH)
    assert r.status_code == 422 and "limited to" in r.json()["error"]


def test_base64_variants(client):
    raw = png(np.full((8, 8, 3), 90, np.uint8))
    b64 = base64.b64encode(raw).decode()
    for image in (b64, base64.encodebytes(raw).decode(), "data:image/png;base64," + b64):
        assert client.post("/v1/predict", json={"image": image, "task": "red"}).status_code == 200
    r = client.post("/v1/predict", json={"image": "data:image/png," + b64, "task": "red"})
    assert r.status_code == 422 and "data URL" in r.json()["error"]
    r = client.post("/v1/predict", json={"image": "@@@@", "task": "red"})
    assert r.status_code == 422 and "line breaks" in r.json()["error"]


def test_batch_errors_name_the_item(client):
    good = base64.b64encode(png(np.zeros((8, 8, 3), np.uint8))).decode()
    for bad, word in (({"image": "@@@@"}, "base64"), ({"image": good, "task": "ghost"}, "ghost"),
                      ({"image": base64.b64encode(b"junk").decode()}, "image")):
        items = [{"image": good}, {"image": good, "task": "red"}, bad]
        r = client.post("/v1/predict/batch", json={"items": items})
        assert r.status_code in (404, 422) and r.json()["error"].startswith("items[2]"), r.text
        assert word in r.json()["error"]


def test_a_500_carries_its_request_id_in_the_header(client, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("unexpected")
    monkeypatch.setattr(client.app.state.batcher, "submit", boom)
    r = client.post("/v1/predict", files={"image": ("x", png(np.zeros((8, 8, 3), np.uint8)))}, data={"task": "red"},
                    headers={"X-Request-Id": "trace-me-500"})
    assert r.status_code == 500 and r.json() == {"error": "internal server error", "request_id": "trace-me-500"}
    assert r.headers["x-request-id"] == "trace-me-500"
    assert r.headers.get_list("x-request-id") == ["trace-me-500"]
