"""Fine-tune the demo backbone on every task, build the switches with the CLI, assemble the bank.

    python -m demo.pipeline [--steps 150] [--alpha 0.6] [--bank demo/bank] [--tasks mnist,faces]

Per task, in work-cache/TASK/: the frozen linear head (fitted on pretrained features), the
fine-tuned image tower (head and BatchNorm statistics frozen), the Auto-Switch query embeddings
and the switch file. A finished step is skipped on a rerun unless its settings changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from demo.common import WORK, embed, fit_head, finetune, to_tensor
from demo.tasks import LOADERS, load
from switchbank.backbone import DEMO_ARCH, load_backbone

QUERIES = 100
LR = 2e-4


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(".part")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def pretrained_checkpoint(backbone, work: Path) -> Path:
    path = work / "pretrained.safetensors"
    if not path.exists():
        work.mkdir(parents=True, exist_ok=True)
        _save(backbone.model.state_dict(), path)
    return path


def run_task(name: str, backbone, work: Path, steps: int, log) -> Path:
    """Fine-tune one task (cached) and return its directory."""
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    config = {"steps": steps, "lr": LR, "batch": 32, "queries": QUERIES, "arch": DEMO_ARCH,
              "backbone": backbone.fingerprint, "version": 2}
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    done = d / "done.json"
    if done.exists() and json.loads(done.read_text()).get("key") == key:
        log(f"{name}: cached")
        return d
    t0 = time.time()
    task = load(name)
    x = to_tensor(backbone, task.train)
    weight, bias = fit_head(embed(backbone, x), task.train_labels, len(task.classes))
    _save({"weight": weight, "bias": bias}, d / "head.safetensors")
    (d / "classes.txt").write_text("\n".join(task.classes) + "\n")
    # Query examples: a fixed random sample of the training images (loaders may sort by class).
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:QUERIES]
    _save({"embeddings": embed(backbone, x[pick])}, d / "queries.safetensors")
    tuned = finetune(backbone, x, task.train_labels, weight, bias, steps, lr=LR)
    _save({**tuned, **backbone.buffers}, d / "finetuned.safetensors")
    done.write_text(json.dumps({"key": key, "config": config, "seconds": round(time.time() - t0, 1)}) + "\n")
    log(f"{name}: fine-tuned {steps} steps in {time.time() - t0:.0f} s")
    return d


def build_switch_file(name: str, d: Path, pretrained: Path, alpha: float) -> Path:
    out = d / f"switch-{alpha}.safetensors"
    if out.exists() and out.stat().st_mtime > (d / "finetuned.safetensors").stat().st_mtime:
        return out
    cmd = [sys.executable, "-m", "switchbank.cli", "build", "--pretrained", str(pretrained),
           "--finetuned", str(d / "finetuned.safetensors"), "--name", name, "--alpha", str(alpha),
           "--arch", DEMO_ARCH, "--head", str(d / "head.safetensors"), "--head-no-normalize",
           "--classes", str(d / "classes.txt"), "--queries", str(d / "queries.safetensors"),
           "--out", str(out), "--quiet"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def assemble_bank(bank: Path, files: list[Path]) -> None:
    cli = [sys.executable, "-m", "switchbank.cli", "bank"]
    subprocess.run([*cli, "init", str(bank)], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*cli, "add", str(bank), *map(str, files), "--replace"], check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--alpha", type=float, default=0.6)
    ap.add_argument("--bank", type=Path, default=None, help="write the switches into this bank")
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--tasks", default=",".join(LOADERS))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    backbone = load_backbone(DEMO_ARCH, device="cpu")
    pretrained = pretrained_checkpoint(backbone, args.work)
    files = []
    for name in args.tasks.split(","):
        d = run_task(name, backbone, args.work, args.steps, lambda m: print(m, flush=True))
        files.append(build_switch_file(name, d, pretrained, args.alpha))
    if args.bank:
        assemble_bank(args.bank, files)
    return 0


def load_checkpoint(work: Path, name: str) -> tuple[dict, torch.Tensor, torch.Tensor, list[str]]:
    d = work / name
    head = load_file(str(d / "head.safetensors"))
    return load_file(str(d / "finetuned.safetensors")), head["weight"], head["bias"], \
        (d / "classes.txt").read_text().split("\n")[:-1]


if __name__ == "__main__":
    sys.exit(main())
