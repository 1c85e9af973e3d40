"""The demo pipeline's pieces on a few images per task (not the full training)."""

import json

import pytest
import demo.tasks as tasks
from switchbank.bank import Bank
from switchbank.format import read_switch


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(tasks, "MAX_TRAIN", 24)
    monkeypatch.setattr(tasks, "MAX_TEST", 12)


@pytest.mark.parametrize("name", list(tasks.LOADERS))
def test_each_task_loads_with_a_fixed_held_out_split(name, small):
    a, b = tasks.load(name), tasks.load(name)
    assert len(a.classes) >= 2 and a.train and a.test
    assert len(a.train) <= 24 or name == "textures"
    assert set(a.train_labels) <= set(range(len(a.classes))) and set(a.test_labels) <= set(range(len(a.classes)))
    assert a.test_labels == b.test_labels  # fixed split
    assert [im.tobytes() for im in a.test[:3]] == [im.tobytes() for im in b.test[:3]]
    assert all(im.mode == "RGB" for im in a.train[:5] + a.test[:5])
    train = {im.tobytes() for im in a.train}
    assert not any(im.tobytes() in train for im in a.test)  # held out


def test_pipeline_builds_bank_and_skips_finished_work(tmp_path, small, capsys):
    from demo.pipeline import main
    args = ["--work", str(tmp_path / "work"), "--steps", "2", "--tasks", "faces,mnist", "--bank", str(tmp_path / "bank")]
    assert main(args) == 0
    bank = Bank(tmp_path / "bank")
    assert bank.names() == ["faces", "mnist"]
    sw = bank.load("mnist")
    assert sw.head.classes == [str(i) for i in range(10)] and sw.queries.shape[0] == 24 and not sw.head.normalize
    assert read_switch(tmp_path / "work" / "faces" / "switch-0.6.safetensors").name == "faces"
    tuned = (tmp_path / "work" / "mnist" / "finetuned.safetensors").stat().st_mtime
    capsys.readouterr()
    assert main(args) == 0
    assert "mnist: cached" in capsys.readouterr().out
    assert (tmp_path / "work" / "mnist" / "finetuned.safetensors").stat().st_mtime == tuned


def test_evaluation_writes_table_and_sweep(tmp_path, small):
    from demo.evaluate import main
    out = tmp_path / "results"
    assert main(["--work", str(tmp_path / "work"), "--tasks", "faces,textures", "--steps", "2", "--alphas", "0.0,0.5", "--out", str(out)]) == 0
    res = json.loads((out / "table2.json").read_text())
    for row in ("Pretrained", "Individual", "Weight averaging", "Task arithmetic", "TIES", "DARE", "EMR",
                "Localize-and-Stitch", "T-Switch", "Auto-Switch"):
        assert set(res["rows"][row]) == {"faces", "textures"}
        assert all(0 <= v <= 100 for v in res["rows"][row].values())
    assert 0 <= res["routing_accuracy"] <= 100
    assert res["storage_bytes"]["T-Switch"] < 0.05 * res["fp32_task_vector_bytes"]
    sweep = json.loads((out / "alpha-sweep.json").read_text())["rows"]
    assert [r["alpha"] for r in sweep] == [0.0, 0.5]
    assert (out / "alpha-sweep.png").stat().st_size > 1000 and "| T-Switch |" in (out / "table2.md").read_text()
