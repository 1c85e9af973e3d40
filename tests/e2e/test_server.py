"""The real server process on a loopback port, driven through the Python client."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from app.client import SwitchbankClient, SwitchbankError
from tests.helpers import ARCH, colour_png, make_bank, task_switch_bytes

TOKEN = "e2e-token"
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bank: Path, port: int, log_path: Path, **env) -> subprocess.Popen:
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "SWITCHBANK_ARCH": ARCH, "SWITCHBANK_DEVICE": "cpu",
               "SWITCHBANK_ADMIN_TOKEN": TOKEN, "SWITCHBANK_K": "5", "SWITCHBANK_SYNC_SECONDS": "0.5",
               **{f"SWITCHBANK_{k.upper()}": str(v) for k, v in env.items()}}
    log = open(log_path, "wb")
    return subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--bank", str(bank), "--port", str(port)],
                            env=environ, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def wait_ready(client: SwitchbankClient, proc: subprocess.Popen, log_path: Path, timeout: float = 60) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        if client.ready():
            return
        time.sleep(0.2)
    raise TimeoutError(log_path.read_text()[-3000:])


@contextmanager
def demo_server(tmp: Path, backbone, tower):
    """A server on a bank of the test tasks; yields (client, proc, port)."""
    bank = make_bank(tmp / "bank", backbone, tower)
    port = free_port()
    proc = start_server(bank, port, tmp / "server.log")
    client = SwitchbankClient(f"http://127.0.0.1:{port}", admin_token=TOKEN)
    try:
        wait_ready(client, proc, tmp / "server.log")
        yield client, proc, port
    finally:
        proc.terminate()
        proc.wait(20)
        client.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, backbone, tower):
    tmp = tmp_path_factory.mktemp("e2e")
    with demo_server(tmp, backbone, tower) as (client, proc, _):
        yield client, proc, tmp


def test_three_modes(server):
    client, _, _ = server
    assert client.predict(colour_png("blue", 1))["head"] == "blue"
    assert client.predict(colour_png("blue", 1), task="red")["head"] == "red"
    r = client.predict(colour_png("blue", 1), weights={"red": 1, "green": 3})
    assert r["mode"] == "weights" and r["head"] == "green"


def test_upload_routes_without_restart(server, backbone, tower):
    client, _, _ = server
    client.upload(task_switch_bytes(backbone, tower, "violet", seed=50))
    assert client.predict(colour_png("red", 2), task="violet")["head"] == "violet"
    assert "violet" in [s["name"] for s in client.switches()["switches"]]
    client.upload(task_switch_bytes(backbone, tower, "violet", seed=51), replace=True)
    client.delete("violet")
    with pytest.raises(SwitchbankError) as e:
        client.predict(colour_png("red", 2), task="violet")
    assert e.value.status == 404


def test_auth_failures(server):
    client, _, _ = server
    anon = SwitchbankClient(client._http.base_url.__str__())
    wrong = SwitchbankClient(client._http.base_url.__str__(), admin_token="nope")
    for c in (anon, wrong):
        with pytest.raises(SwitchbankError) as e:
            c.describe()
        assert e.value.status == 401
        with pytest.raises(SwitchbankError):
            c.delete("red")
    assert "red" in [s["name"] for s in client.switches()["switches"]]


def test_malformed_and_oversize(server):
    client, _, _ = server
    for bad in (b"", b"GIF89a garbage", colour_png("red", 1)[:50]):
        with pytest.raises(SwitchbankError) as e:
            client.predict(bad)
        assert 400 <= e.value.status < 500 and e.value.message
    with pytest.raises(SwitchbankError) as e:
        client.upload(b"\x80\x04" + b"x" * 1000)
    assert e.value.status == 422
    r = client._http.post("/v1/predict", content=b"x" * (40 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.ready()


def test_concurrent_mixed_tasks_match_requests_alone(server):
    client, _, _ = server
    reqs = []
    for i in range(24):
        task = ("red", "green", "blue")[i % 3]
        mode = i % 4
        kw = {} if mode == 0 else {"task": task} if mode == 1 else {"weights": {task: 1, "red": 1}} if mode == 2 else {"task": "green"}
        reqs.append((colour_png(task, 300 + i), kw))
    alone = [client.predict(png, **kw) for png, kw in reqs]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda r: client.predict(r[0], **r[1]), reqs))
    for a, b in zip(alone, together):
        assert (a["head"], a["weights"], [p["label"] for p in a["predictions"]]) == \
               (b["head"], b["weights"], [p["label"] for p in b["predictions"]])
        for p, q in zip(a["predictions"], b["predictions"]):
            assert abs(p["score"] - q["score"]) < 1e-4


def test_graceful_shutdown(tmp_path, backbone, tower):
    bank = make_bank(tmp_path / "bank", backbone, tower, tasks=["red"])
    port = free_port()
    # batches wait 400 ms to fill, so the requests are still in flight when SIGTERM arrives
    proc = start_server(bank, port, tmp_path / "log", batch_wait_ms=400, batch_size=64)
    client = SwitchbankClient(f"http://127.0.0.1:{port}", admin_token=TOKEN)
    wait_ready(client, proc, tmp_path / "log")
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client.predict, colour_png("red", i), task="red") for i in range(8)]
        time.sleep(0.15)
        assert not any(f.done() for f in futures)
        proc.send_signal(signal.SIGTERM)
        done = [f.result()["head"] for f in futures if f.exception() is None]
    # uvicorn re-raises the signal once it has drained, so the exit status is "killed by SIGTERM"
    assert proc.wait(30) in (0, -signal.SIGTERM)
    assert len(done) == len(futures), "in-flight requests should complete during the drain"
    client.close()


def test_bad_settings_fail_startup_with_a_message(tmp_path):
    proc = start_server(tmp_path / "missing-bank", free_port(), tmp_path / "log")
    assert proc.wait(60) != 0
    assert "SWITCHBANK_BANK" in (tmp_path / "log").read_text()


def test_token_never_reaches_the_logs(server):
    client, _, tmp = server
    client.describe()
    SwitchbankClient(str(client._http.base_url), admin_token="wrong-" + TOKEN).ready()
    with pytest.raises(SwitchbankError):
        SwitchbankClient(str(client._http.base_url), admin_token="wrong-" + TOKEN).describe()
    time.sleep(0.2)
    log = (tmp / "server.log").read_text()
    assert '"path": "/v1/admin/switches"' in log  # the requests were logged...
    assert TOKEN not in log  # ...without their credentials
    metrics = client._http.get("/metrics").text + str(client.switches())
    assert TOKEN not in metrics


def test_every_line_the_server_writes_is_a_json_object(server):
    _, _, tmp = server
    lines = [line for line in (tmp / "server.log").read_text().splitlines() if line.strip()]
    assert lines
    for line in lines:
        assert isinstance(json.loads(line), dict), line
    assert not any('"logger": "faiss.loader"' in line for line in lines)
