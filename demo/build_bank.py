"""Build the bundled demo bank: fine-tune the EfficientNet-Lite0 image tower on each demo task,
compress each fine-tune into a switch, and store the switches in demo/bank.

    python demo/build_bank.py [--steps 40] [--out demo/bank]

Per task: a linear head is fitted on frozen pretrained features, then the tower is fine-tuned
with that head frozen and BatchNorm statistics frozen (eval mode), so the task vector covers
parameters only. Runs on the CPU in a few minutes; deterministic seeds throughout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo.tasks import TASKS, split  # noqa: E402
from switchbank.backbone import DEMO_ARCH, load_backbone  # noqa: E402
from switchbank.bank import Bank  # noqa: E402
from switchbank.build import build_switch  # noqa: E402
from switchbank.format import to_bytes  # noqa: E402
from switchbank.types import Head  # noqa: E402


def features(backbone, x, batch=64):
    return torch.cat([backbone.forward(x[i:i + batch]) for i in range(0, len(x), batch)])


def fit_head(feats, labels, n_classes, steps=300):
    torch.manual_seed(0)
    lin = torch.nn.Linear(feats.shape[1], n_classes)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
    y = torch.tensor(labels)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(feats), y).backward()
        opt.step()
    return lin.weight.detach().clone(), lin.bias.detach().clone()


def finetune(backbone, x, y, weight, bias, steps, batch=32, lr=1e-4):
    model = backbone.model
    params = {k: v.detach().clone().requires_grad_(True) for k, v in backbone.params.items()}
    opt = torch.optim.Adam(params.values(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        feats = torch.func.functional_call(model, (params, backbone.buffers), (x[idx],))
        loss = torch.nn.functional.cross_entropy(feats @ weight.T + bias, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in params.items()}


def accuracy(backbone, params, x, y, weight, bias):
    with torch.inference_mode():
        feats = torch.cat([backbone.forward(x[i:i + 64], params) for i in range(0, len(x), 64)])
    return float(((feats @ weight.T + bias).argmax(1) == y).float().mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "demo" / "bank"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--alpha", type=float, default=0.6)
    ap.add_argument("--queries", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    backbone = load_backbone(DEMO_ARCH, device="cpu")
    base_state = {**{k: v.detach().clone() for k, v in backbone.params.items()}, **backbone.buffers}
    bank = Bank(args.out, create=True)
    report = {}
    for name, loader in TASKS.items():
        t0 = time.time()
        images, labels, classes = loader()
        x = torch.stack([backbone.preprocess(im) for im in images])
        y = torch.tensor(labels)
        tr, te = split(len(images))
        w, b = fit_head(features(backbone, x[tr]), y[tr].tolist(), len(classes))
        tuned = finetune(backbone, x[tr], y[tr], w, b, args.steps)
        fin_state = {**tuned, **backbone.buffers}
        queries = features(backbone, x[tr[: args.queries]])
        sw = build_switch(base_state, fin_state, name, args.alpha, head=Head(w, b, classes, normalize=False),
                          queries=queries, router_fingerprint=backbone.fingerprint, arch=DEMO_ARCH)
        bank.add(to_bytes(sw), replace=True)
        report[name] = {
            "classes": len(classes), "train": len(tr), "test": len(te),
            "pretrained_probe_acc": accuracy(backbone, None, x[te], y[te], w, b),
            "finetuned_acc": accuracy(backbone, tuned, x[te], y[te], w, b),
            "seconds": round(time.time() - t0, 1),
        }
        print(name, json.dumps(report[name]), flush=True)
    (Path(args.out) / "build-report.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
