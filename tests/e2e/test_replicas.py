"""Several real server processes sharing one bank directory agree on it without restarts."""

import threading
import time

import pytest

from app.client import SwitchbankClient, SwitchbankError
from switchbank.bank import Bank
from tests.e2e.test_server import TOKEN, free_port, start_server, wait_ready
from tests.helpers import colour_png, make_bank, task_switch_bytes

SYNC = 0.5  # SWITCHBANK_SYNC_SECONDS in these tests
BOUND = 5.0  # a change made through one replica is served by the others within this many seconds


def until(fn, timeout=BOUND):
    end = time.time() + timeout
    while True:
        try:
            if fn():
                return time.time()
        except SwitchbankError:
            pass
        if time.time() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, backbone, tower):
    tmp = tmp_path_factory.mktemp("replicas")
    bank = make_bank(tmp / "bank", backbone, tower)
    procs, clients = [], []
    for i in range(3):
        port = free_port()
        procs.append(start_server(bank, port, tmp / f"r{i}.log", sync_seconds=SYNC))
        clients.append(SwitchbankClient(f"http://127.0.0.1:{port}", admin_token=TOKEN))
    try:
        for i, (c, p) in enumerate(zip(clients, procs)):
            wait_ready(c, p, tmp / f"r{i}.log")
        yield bank, clients
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(20)


def test_upload_on_one_is_served_by_the_others(replicas, backbone, tower):
    bank, (a, b, c) = replicas
    t0 = time.time()
    a.upload(task_switch_bytes(backbone, tower, "cyan", seed=60))
    assert a.predict(colour_png("red", 1), task="cyan")["head"] == "cyan"  # at once on the writer
    for other in (b, c):
        seen = until(lambda: other.predict(colour_png("red", 1), task="cyan")["head"] == "cyan")
        assert seen - t0 < BOUND


def test_replace_and_delete_propagate(replicas, backbone, tower):
    bank, (a, b, c) = replicas
    new = task_switch_bytes(backbone, tower, "green", seed=61)
    res = b.upload(new, replace=True)
    for other in (a, c):
        until(lambda: other.describe("green")["content_hash"] == res["content_hash"])
    c.delete("green")
    for other in (a, b):
        until(lambda: "green" not in [s["name"] for s in other.switches()["switches"]])
    with pytest.raises(SwitchbankError):
        a.predict(colour_png("green", 1), task="green")


def test_replica_starting_during_uploads_loads_a_consistent_bank(replicas, backbone, tower, tmp_path):
    bank_dir, _ = replicas
    versions = [task_switch_bytes(backbone, tower, "blue", seed=s) for s in (70, 71)]
    bank = Bank(bank_dir)
    hashes = {bank.add(v, replace=True)[0].content_hash for v in versions}
    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            bank.add(versions[i % 2], replace=True)
            i += 1

    writer = threading.Thread(target=churn)
    writer.start()
    port = free_port()
    proc = start_server(bank_dir, port, tmp_path / "late.log", sync_seconds=SYNC)
    client = SwitchbankClient(f"http://127.0.0.1:{port}", admin_token=TOKEN)
    try:
        wait_ready(client, proc, tmp_path / "late.log")
        for _ in range(5):
            assert client.describe("blue")["content_hash"] in hashes
            assert client.predict(colour_png("blue", 2), task="blue")["head"] == "blue"
            time.sleep(0.2)
    finally:
        stop.set()
        writer.join()
        proc.terminate()
        proc.wait(20)
        client.close()
    assert not [p for p in (bank_dir / "switches").iterdir() if p.suffix == ".part"]
