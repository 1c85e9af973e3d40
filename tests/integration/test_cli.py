import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from switchbank.build import bin_discard
from switchbank.checkpoints import fingerprint, image_tower
from switchbank.combine import switch_delta
from switchbank.format import read_switch
from tests.helpers import finetune, save, visual

CLI = [sys.executable, "-m", "switchbank.cli"]


def run(*args, check=True):
    p = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    if check:
        assert p.returncode == 0, p.stderr
    return p


@pytest.mark.parametrize("alpha", [0.5, 0.6, 0.8])
def test_build_and_inspect(tmp_path, model_state, alpha):
    pre = save(model_state, tmp_path / "pre.safetensors")  # whole model, visual. prefix
    fin_tower = finetune(visual(model_state), seed=5)
    fin = tmp_path / "fin.pt"
    torch.save(fin_tower, fin)  # image tower only, torch format
    torch.save({"weight": torch.randn(4, 32), "bias": torch.zeros(4)}, tmp_path / "head.pt")
    torch.save({"embeddings": torch.randn(6, 32)}, tmp_path / "q.pt")
    out = tmp_path / "t.switch"
    run("build", "--pretrained", pre, "--finetuned", fin, "--name", "digits", "--alpha", alpha, "--out", out,
        "--head", tmp_path / "head.pt", "--classes", "zero,one,two,three", "--queries", tmp_path / "q.pt", "--quiet")
    sw = read_switch(out)
    tower = visual(model_state)
    for name, t in tower.items():
        tau = fin_tower[name].float() - t.float()
        if tau.dim() == 0:
            continue
        mask, _, lam = bin_discard(tau, alpha)
        expected = torch.where(mask.reshape(tau.shape), torch.sign(tau) * lam, torch.zeros_like(tau))
        torch.testing.assert_close(switch_delta(sw, name), expected, rtol=1e-6, atol=0)
    info = json.loads(run("inspect", out, "--json").stdout)
    n = sum(t.numel() for k, t in tower.items() if t.dim() > 0 and t.is_floating_point())
    assert info["name"] == "digits" and info["alpha"] == alpha and info["parameters"] == n
    assert info["file_bytes"] == out.stat().st_size
    assert info["bits_per_param"] <= (1 + (1 - alpha)) * 1.02
    assert info["classes"] == ["zero", "one", "two", "three"] and info["queries"] == 6
    assert info["backbone_fingerprint"] == fingerprint(image_tower(model_state))
    assert "digits" in run("inspect", out).stdout


def test_build_errors_are_clear(tmp_path, model_state):
    pre = save(model_state, tmp_path / "pre.safetensors")
    bad = dict(visual(model_state))
    k = next(k for k, v in bad.items() if v.dim() == 2)
    bad[k] = torch.zeros(2, 2)
    fin = save(bad, tmp_path / "bad.safetensors")
    p = run("build", "--pretrained", pre, "--finetuned", fin, "--name", "x", "--out", tmp_path / "x", check=False)
    assert p.returncode == 2 and k in p.stderr
    (tmp_path / "junk").write_bytes(b"junk")
    p = run("inspect", tmp_path / "junk", check=False)
    assert p.returncode == 2 and "switch" in p.stderr


def test_bank_commands(tmp_path, model_state):
    pre = save(model_state, tmp_path / "pre.safetensors")
    fin = save(finetune(visual(model_state), seed=2), tmp_path / "fin.safetensors")
    run("build", "--pretrained", pre, "--finetuned", fin, "--name", "a", "--out", tmp_path / "a.sw", "--quiet")
    run("bank", "init", tmp_path / "bank")
    assert "1 of 1 switches added" in run("bank", "add", tmp_path / "bank", tmp_path / "a.sw").stdout
    assert "0 of 1 switches added" in run("bank", "add", tmp_path / "bank", tmp_path / "a.sw").stdout
    assert "generation 1" in run("bank", "list", tmp_path / "bank").stdout
    run("bank", "remove", tmp_path / "bank", "a")
    assert "generation 2" in run("bank", "list", tmp_path / "bank").stdout


def test_head_normalisation_is_judged_on_the_queries(tmp_path, model_state):
    pre = save(model_state, tmp_path / "pre.safetensors")
    fin = save(finetune(visual(model_state), seed=6), tmp_path / "fin.safetensors")
    g = torch.Generator().manual_seed(0)
    raw = 20 * torch.randn(40, 32, generator=g)  # raw embeddings with norms in the tens
    torch.save({"embeddings": raw}, tmp_path / "q.pt")
    centres = raw[:4] / raw[:4].norm(dim=1, keepdim=True)
    heads = {
        # fitted on raw features: modest weights; on unit-norm features its scores are near uniform
        "raw": {"weight": 0.05 * centres},
        # a CLIP-style head: logit scale 100 on unit-norm features
        "clip": {"weight": 100 * centres},
    }
    for kind, head in heads.items():
        torch.save(head, tmp_path / f"{kind}.pt")
        out = tmp_path / f"{kind}.switch"
        p = run("build", "--pretrained", pre, "--finetuned", fin, "--name", kind, "--out", out, "--quiet",
                "--head", tmp_path / f"{kind}.pt", "--queries", tmp_path / "q.pt")
        assert "median top-1 score" in p.stderr
        assert read_switch(out).head.normalize == (kind == "clip"), p.stderr
    out = tmp_path / "forced.switch"
    run("build", "--pretrained", pre, "--finetuned", fin, "--name", "forced", "--out", out, "--quiet",
        "--head", tmp_path / "raw.pt", "--queries", tmp_path / "q.pt", "--head-normalize", "yes")
    assert read_switch(out).head.normalize
    p = run("build", "--pretrained", pre, "--finetuned", fin, "--name", "blind", "--out", tmp_path / "b.switch",
            "--quiet", "--head", tmp_path / "raw.pt", check=False)
    assert p.returncode == 2 and "--head-normalize" in p.stderr


def test_library_never_imports_the_service():
    code = ("import sys, switchbank, switchbank.cli, switchbank.engine, switchbank.bank, switchbank.mixed; "
            "bad = sorted(m for m in sys.modules if m == 'app' or m.startswith('app.') or m.startswith('fastapi')); "
            "print(bad); sys.exit(1 if bad else 0)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
