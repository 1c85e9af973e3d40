"""Slow and idle clients against the real server: cut off within the documented deadlines."""

import socket
import time

import pytest

from app.client import SwitchbankClient
from tests.e2e.test_server import free_port, start_server, wait_ready
from tests.helpers import colour_png, make_bank

HEADER_TIMEOUT, BODY_TIMEOUT = 1.0, 1.5


@pytest.fixture(scope="module")
def server(tmp_path_factory, backbone, tower):
    tmp = tmp_path_factory.mktemp("slow")
    bank = make_bank(tmp / "bank", backbone, tower)
    port = free_port()
    proc = start_server(bank, port, tmp / "server.log", header_timeout=HEADER_TIMEOUT, body_timeout=BODY_TIMEOUT,
                        max_connections=40)
    client = SwitchbankClient(f"http://127.0.0.1:{port}")
    try:
        wait_ready(client, proc, tmp / "server.log")
        yield port, client
    finally:
        proc.terminate()
        proc.wait(20)
        client.close()


def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float | None:
    """Seconds until the server closes ``sock`` (sending ``trickle`` a byte every 0.2 s), or None."""
    sock.settimeout(0.2)
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < seconds:
        if i < len(trickle):
            try:
                sock.sendall(trickle[i:i + 1])
            except OSError:
                return time.monotonic() - t0
            i += 1
        try:
            data = sock.recv(65536)
            if not data or b"HTTP/1.1 408" in data:
                return time.monotonic() - t0
        except socket.timeout:
            continue
        except OSError:
            return time.monotonic() - t0
    return None


def test_idle_connection_is_closed(server):
    port, _ = server
    with socket.create_connection(("127.0.0.1", port)) as s:
        t = closed_within(s, HEADER_TIMEOUT + 3)
    assert t is not None and t < HEADER_TIMEOUT + 1


def test_headers_trickled_are_cut_off(server):
    port, _ = server
    with socket.create_connection(("127.0.0.1", port)) as s:
        t = closed_within(s, HEADER_TIMEOUT + 3, b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100)
    assert t is not None and t < HEADER_TIMEOUT + 1


def test_body_trickled_is_answered_408_within_the_deadline(server):
    port, _ = server
    body = b"x" * 200
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head)
        t = closed_within(s, BODY_TIMEOUT + 3, body)
    assert t is not None and t < BODY_TIMEOUT + 1


def test_disconnect_mid_body_is_not_a_server_error(server):
    port, client = server
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 100000\r\n\r\n--b\r\n")
            time.sleep(0.2)
    time.sleep(0.5)
    metrics = client._http.get("/metrics").text
    assert 'status="500"' not in metrics
    assert client.predict(colour_png("red", 1), task="red")["head"] == "red"


def test_many_idle_connections_do_not_block_real_clients(server):
    port, client = server
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]
    try:
        assert client.predict(colour_png("blue", 2), task="blue")["head"] == "blue"
        time.sleep(HEADER_TIMEOUT + 1)
        closed = 0
        for s in idle:
            s.settimeout(0.5)
            try:
                closed += s.recv(1) == b""
            except OSError:
                closed += 1
        assert closed == len(idle)
    finally:
        for s in idle:
            s.close()
