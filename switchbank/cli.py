"""Command line: ``switchbank build | inspect | bank`` (the service adds ``serve``, see app/cli.py)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from .errors import SwitchBankError


def _classes(spec: str | None, n: int | None) -> list[str]:
    if spec is None:
        if n is None:
            return []
        return [str(i) for i in range(n)]
    p = Path(spec)
    names = [line.strip() for line in p.read_text().splitlines() if line.strip()] if p.is_file() else [
        c.strip() for c in spec.split(",") if c.strip()]
    return names


def _read_tensor_file(path: str, key: str) -> dict[str, torch.Tensor]:
    from .checkpoints import read_state_dict
    state = read_state_dict(path)
    if key not in state:
        raise SwitchBankError(f"{path}: expected a tensor named {key!r}, found {sorted(state)[:5]}")
    return state


def _load_head(args, queries):
    from .types import Head
    if not args.head:
        return None
    state = _read_tensor_file(args.head, "weight")
    weight = state["weight"].float()
    classes = _classes(args.classes, weight.shape[0])
    head = Head(weight, state.get("bias"), classes)
    mode = "no" if args.head_no_normalize else args.head_normalize
    head.normalize = mode == "yes" if mode != "auto" else _normalize_fits(head, queries)
    return head


def _normalize_fits(head, queries) -> bool:
    """Whether the head expects L2-normalised embeddings, judged on the query embeddings.

    A head fitted on raw features gives near-uniform scores on normalised ones (their norm is 1
    where raw features have norms in the tens), which labels right but scores meaninglessly. So:
    normalise (the CLIP convention) unless that makes the head's median top-1 score near uniform.
    """
    if queries is None:
        raise SwitchBankError("--head-normalize auto judges the head on the query embeddings; give --queries or "
                              "--query-images, or say --head-normalize yes (heads on L2-normalised embeddings, "
                              "such as CLIP zero-shot heads) or no (heads fitted on raw embeddings)")
    import torch

    def top1(f):
        logits = f @ head.weight.T + (0 if head.bias is None else head.bias.float())
        return float(logits.softmax(-1).max(-1).values.median())

    raw, normed = top1(queries.float()), top1(torch.nn.functional.normalize(queries.float(), dim=-1))
    uniform = 1 / head.weight.shape[0]
    fits = normed > 1.5 * uniform
    print(f"head: median top-1 score {normed:.3f} on normalised query embeddings, {raw:.3f} on raw ones "
          f"(uniform {uniform:.3f}); {'normalising' if fits else 'not normalising'} embeddings before the head "
          "(override with --head-normalize yes|no)", file=sys.stderr)
    return fits


def _load_queries(args, pretrained_tower):
    """(embeddings, router fingerprint) from --queries or --query-images, else (None, None)."""
    from .checkpoints import fingerprint
    if args.queries:
        return _read_tensor_file(args.queries, "embeddings")["embeddings"].float(), fingerprint(pretrained_tower)
    if args.query_images:
        from .backbone import load_backbone
        from .images import encode_folder
        if not args.arch:
            raise SwitchBankError("--query-images needs --arch to build the router encoder")
        backbone = load_backbone(args.arch, args.pretrained, device="cpu")
        return encode_folder(backbone, Path(args.query_images), args.max_queries), backbone.fingerprint
    return None, None


def cmd_build(args) -> int:
    from .build import build_switch
    from .checkpoints import image_tower, read_state_dict
    from .format import describe
    from .bank import atomic_write, check_name
    from .format import to_bytes

    check_name(args.name)
    pre = image_tower(read_state_dict(args.pretrained))
    fin = image_tower(read_state_dict(args.finetuned))
    queries, router_fp = _load_queries(args, pre)
    sw = build_switch(pre, fin, args.name, args.alpha, head=_load_head(args, queries), queries=queries,
                      router_fingerprint=router_fp, arch=args.arch, progress=not args.quiet)
    data = to_bytes(sw)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, data)
    info = describe(sw, len(data))
    print(json.dumps(info, indent=2) if args.json else
          f"wrote {out}: {info['parameters']:,} parameters, {info['bits_per_param']:.3f} bits/param "
          f"({len(data):,} bytes on disk)")
    return 0


def cmd_inspect(args) -> int:
    from .format import describe, read_switch
    sw = read_switch(args.file)
    info = describe(sw, Path(args.file).stat().st_size)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            if isinstance(v, float):
                v = f"{v:.4f}"
            elif isinstance(v, list) and len(v) > 12:
                v = f"{v[:12]} ... ({len(v)} in all)"
            print(f"{k:<{width}}  {v}")
    return 0


def cmd_bank(args) -> int:
    from .bank import Bank
    if args.bank_cmd == "init":
        b = Bank(args.dir, create=True)
        print(f"bank at {b.root}, generation {b.generation}")
    elif args.bank_cmd == "add":
        b = Bank(args.dir)
        changed = b.add_many([Path(f).read_bytes() for f in args.files], replace=args.replace)
        print(f"{changed} of {len(args.files)} switches added or replaced; generation {b.generation}")
    elif args.bank_cmd == "remove":
        Bank(args.dir).remove(args.name)
        print(f"removed {args.name}")
    else:
        b = Bank(args.dir)
        m = b.manifest()
        print(f"generation {m.generation}")
        for name, info in sorted(m.switches.items()):
            print(f"{name:<24} {info['bytes']:>12,} bytes  {info['content_hash'][:19]}")
    return 0


def parser(extend=None) -> argparse.ArgumentParser:
    """The command-line parser; ``extend(subparsers)`` may add commands (the service adds serve)."""
    p = argparse.ArgumentParser(prog="switchbank", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="build a task switch from a pretrained and a fine-tuned checkpoint")
    b.add_argument("--pretrained", required=True, help="pretrained weights (.safetensors, .pt, .bin)")
    b.add_argument("--finetuned", required=True, help="fine-tuned weights of the same architecture")
    b.add_argument("--name", required=True, help="switch (task) name")
    b.add_argument("--alpha", type=float, default=0.6, help="discard ratio in [0, 1) (default 0.6)")
    b.add_argument("--out", required=True, help="output switch file")
    b.add_argument("--arch", help="open_clip architecture (recorded; needed for --query-images)")
    b.add_argument("--head", help="classification head file with 'weight' [classes, dim] and optional 'bias'")
    b.add_argument("--classes", help="class names: a file with one per line, or a comma-separated list")
    b.add_argument("--head-normalize", choices=("auto", "yes", "no"), default="auto",
                   help="L2-normalise embeddings before the head: yes (CLIP zero-shot heads), no (heads fitted on "
                        "raw embeddings), or auto (default): judged on the query embeddings")
    b.add_argument("--head-no-normalize", action="store_true", help="same as --head-normalize no")
    b.add_argument("--queries", help="Auto-Switch query embeddings file with 'embeddings' [n, dim] from the pretrained encoder")
    b.add_argument("--query-images", help="folder of example images to encode as Auto-Switch queries")
    b.add_argument("--max-queries", type=int, default=100, help="at most this many query images (default 100)")
    b.add_argument("--json", action="store_true", help="print the switch's figures as JSON")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_build)

    i = sub.add_parser("inspect", help="describe a switch file")
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    k = sub.add_parser("bank", help="manage a bank directory")
    ks = k.add_subparsers(dest="bank_cmd", required=True)
    ks.add_parser("init").add_argument("dir")
    ka = ks.add_parser("add")
    ka.add_argument("dir")
    ka.add_argument("files", nargs="+")
    ka.add_argument("--replace", action="store_true")
    kr = ks.add_parser("remove")
    kr.add_argument("dir")
    kr.add_argument("name")
    ks.add_parser("list").add_argument("dir")
    k.set_defaults(func=cmd_bank)

    if extend is not None:
        extend(sub)
    return p


def main(argv: list[str] | None = None, extend=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parser(extend).parse_args(argv)
    try:
        return args.func(args)
    except SwitchBankError as exc:
        print(f"switchbank: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
