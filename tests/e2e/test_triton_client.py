"""The Open Inference Protocol, driven by Triton's own Python client against the real server."""

import base64
import json

import numpy as np
import pytest

tritonclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from tests.e2e.test_server import TOKEN, demo_server  # noqa: E402
from tests.helpers import TASKS, colour_png, task_switch_bytes  # noqa: E402

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, backbone, tower):
    with demo_server(tmp_path_factory.mktemp("triton"), backbone, tower) as (_, _, port):
        yield tritonclient.InferenceServerClient(f"127.0.0.1:{port}"), port, backbone, tower


def image_input(pngs, binary=True, shape_2d=False):
    data = np.array(pngs, dtype=np.object_)
    if shape_2d:
        data = data.reshape(-1, 1)
    inp = tritonclient.InferInput("IMAGE", list(data.shape), "BYTES")
    inp.set_data_from_numpy(data, binary_data=binary)
    return inp


def test_health_and_metadata(server):
    client, _, backbone, _ = server
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "switchbank" and "classification" in meta["extensions"]
    for model in ("red", "auto"):
        assert client.is_model_ready(model)
        m = client.get_model_metadata(model)
        assert {i["name"] for i in m["inputs"]} == {"IMAGE", "PIXELS"}
        assert {o["name"] for o in m["outputs"]} == {"PROBABILITIES", "ROUTING"}
    assert client.get_model_metadata("red")["outputs"][0]["shape"] == [-1, 3]
    assert client.get_model_config("red")["input"][0]["name"] == "IMAGE"
    assert not client.is_model_ready("nope")
    with pytest.raises(InferenceServerException, match="not found"):
        client.get_model_metadata("nope")


@pytest.mark.parametrize("shape_2d", [False, True])
def test_infer_bytes_images_in_every_mode(server, shape_2d):
    client, _, _, _ = server
    pngs = [colour_png(t, 300 + i) for i, t in enumerate(TASKS)]
    outputs = [tritonclient.InferRequestedOutput("PROBABILITIES", class_count=2),
               tritonclient.InferRequestedOutput("ROUTING")]
    named = client.infer("green", [image_input(pngs, shape_2d=shape_2d)], outputs=outputs)
    top = named.as_numpy("PROBABILITIES")
    assert top.shape == (3, 2) and all(row[0].decode().split(":")[2].startswith("green-") for row in top)
    routing = [json.loads(r) for r in named.as_numpy("ROUTING")]
    assert all(r == {"mode": "task", "head": "green", "weights": {"green": 1.0}} for r in routing)
    auto = client.infer("auto", [image_input(pngs, shape_2d=shape_2d)], outputs=outputs)
    heads = [json.loads(r)["head"] for r in auto.as_numpy("ROUTING")]
    assert heads == TASKS  # each image routed to its own task's switch
    mixed = client.infer("auto", [image_input(pngs[:1])], outputs=outputs,
                         parameters={"weights": json.dumps({"red": 0.25, "blue": 0.75})})
    assert json.loads(mixed.as_numpy("ROUTING")[0]) == {"mode": "weights", "head": "blue",
                                                         "weights": {"blue": 0.75, "red": 0.25}}


@pytest.mark.parametrize("binary", [True, False])
def test_infer_preprocessed_pixels(server, binary):
    client, _, backbone, _ = server
    import io

    from PIL import Image
    x = np.stack([backbone.preprocess(Image.open(io.BytesIO(colour_png("blue", 7 + i))).convert("RGB")).numpy()
                  for i in range(2)]).astype(np.float32)
    inp = tritonclient.InferInput("PIXELS", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = client.infer("blue", [inp], outputs=[tritonclient.InferRequestedOutput("PROBABILITIES", binary_data=binary)])
    probs = out.as_numpy("PROBABILITIES")
    assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    # the same images as encoded bytes give the same probabilities
    again = client.infer("blue", [image_input([colour_png("blue", 7 + i) for i in range(2)])])
    assert np.allclose(again.as_numpy("PROBABILITIES"), probs, atol=1e-5)


def test_errors_in_the_protocols_form(server):
    client, port, _, _ = server
    import httpx
    url = f"http://127.0.0.1:{port}/v2/models"
    cases = [
        ("red", {"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES", "data": [{"b64": "@@"}]}]}, 400),
        ("red", {"inputs": [{"name": "OTHER", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}, 400),
        ("red", {"inputs": [{"name": "IMAGE", "shape": [2], "datatype": "BYTES", "data": ["x"]}]}, 400),
        ("red", {"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES", "data": ["not an image"]}]}, 422),
        ("auto", {"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES",
                              "data": [{"b64": base64.b64encode(colour_png("red", 1)).decode()}]}],
                  "parameters": {"weights": {"red": 1e38}}}, 400),
        ("red", {"inputs": [{"name": "PIXELS", "shape": [1, 3, 5, 5], "datatype": "FP32", "data": [0.0] * 75}]}, 400),
        ("nope", {"inputs": []}, 404),
        ("red", {"inputs": [{"name": "IMAGE", "shape": [10**9], "datatype": "BYTES", "data": []}]}, 413),
    ]
    for model, body, status in cases:
        r = httpx.post(f"{url}/{model}/infer", json=body)
        assert r.status_code == status, (body, r.status_code, r.text)
        assert isinstance(r.json()["error"], str) and r.json()["error"]
    ok = httpx.post(f"{url}/red/infer", json=cases[4][1] | {"parameters": {}})
    assert ok.status_code == 200 and {o["name"] for o in ok.json()["outputs"]} == {"PROBABILITIES", "ROUTING"}


def test_model_repository(server):
    client, port, backbone, tower = server
    admin = tritonclient.InferenceServerClient(f"127.0.0.1:{port}")
    with pytest.raises(InferenceServerException):
        admin.get_model_repository_index()  # no token
    index = admin.get_model_repository_index(headers=AUTH)
    assert {m["name"] for m in index} == {"auto", *TASKS}
    admin.load_model("teal", files={"file:teal.safetensors": task_switch_bytes(backbone, tower, "teal", seed=77)},
                     headers=AUTH)
    assert client.is_model_ready("teal")
    with pytest.raises(InferenceServerException):
        admin.load_model("ghost", files={"file:x": b"not a switch"}, headers=AUTH)
    with pytest.raises(InferenceServerException, match="holds switch"):
        admin.load_model("other", files={"file:x": task_switch_bytes(backbone, tower, "teal", seed=78)}, headers=AUTH)
    admin.unload_model("teal", headers=AUTH)
    assert not client.is_model_ready("teal")
    assert {m["name"] for m in admin.get_model_repository_index(headers=AUTH)} == {"auto", *TASKS}
