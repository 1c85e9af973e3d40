"""Triton's perf_analyzer driving a running switchbank server over the Open Inference Protocol.

    python -m bench.triton_perf [--concurrency 1,8,32] [--seconds 10]

perf_analyzer is Triton's C++ load generator. PyPI's `perf-analyzer` package is a placeholder
(0.1.0, no binary); the binary ships inside tritonclient's manylinux wheels up to the 2.4x
releases, so this script downloads tritonclient 2.41.0's wheel and takes the binary from it, with
the CUDA runtime library it links against (PyPI nvidia-cuda-runtime-cu12; no GPU is used) and
libb64 (Debian libb64-0d, installed when running as root). Everything goes to .cache/perf_analyzer.

It starts the server on the demo bank (cosine routing, as the demo serves), gives perf_analyzer the
shuffled held-out images of all six demo tasks as IMAGE inputs (one image per request) for the
Auto-Switch model ``auto``, and reports its throughput and latency per concurrency.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

from bench.common import ROOT, free_port, md_table, start_server, wait_ready, write
from bench.traffic import demo_pngs

CACHE = ROOT / ".cache" / "perf_analyzer"
WHEEL = "tritonclient[all]==2.41.0"


def _pip_download(spec: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), spec], check=True)
    return next(dest.glob("*.whl"))


def perf_analyzer() -> tuple[Path, dict]:
    """The perf_analyzer binary and the environment it runs in (fetched once)."""
    binary = CACHE / "perf_analyzer"
    libdir = CACHE / "lib"
    if not binary.exists():
        wheel = _pip_download(WHEEL, CACHE / "wheels" / "tritonclient")
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith("/bin/perf_analyzer"))
            binary.write_bytes(z.read(member))
        binary.chmod(0o755)
    if not (libdir / "libcudart.so.12").exists():
        wheel = _pip_download("nvidia-cuda-runtime-cu12", CACHE / "wheels" / "cudart")
        libdir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith("/libcudart.so.12"))
            (libdir / "libcudart.so.12").write_bytes(z.read(member))
    if not _has_libb64():
        if os.geteuid() == 0 and shutil.which("apt-get"):
            subprocess.run(["apt-get", "install", "-y", "-q", "libb64-0d"], check=True, stdout=subprocess.DEVNULL)
        else:
            raise SystemExit("perf_analyzer needs libb64 (Debian: apt-get install libb64-0d)")
    env = {**os.environ, "LD_LIBRARY_PATH": f"{libdir}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    return binary, env


def _has_libb64() -> bool:
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    return "libb64.so.0d" in out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=10, help="measurement window per concurrency")
    ap.add_argument("--images", type=int, default=200)
    args = ap.parse_args(argv)
    binary, env = perf_analyzer()
    data = CACHE / "demo-images.json"
    # perf_analyzer sends a b64 input as the tensor's serialised bytes: for BYTES, each element is
    # its 4-byte little-endian length followed by its bytes
    data.write_text(json.dumps({"data": [{"IMAGE": {"b64": base64.b64encode(struct.pack("<I", len(png)) + png).decode()}}
                                         for _, png in demo_pngs()[:args.images]]}))
    port = free_port()
    proc = start_server(ROOT / "demo" / "bank", port, router_metric="cosine")
    rows, results = [], []
    try:
        wait_ready(port, proc)
        for c in (int(x) for x in args.concurrency.split(",")):
            out = CACHE / f"result-{c}.csv"
            cmd = [str(binary), "-m", "auto", "-u", f"127.0.0.1:{port}", "-i", "http", "--shape", "IMAGE:1",
                   "--input-data", str(data), "--concurrency-range", str(c),
                   "--measurement-interval", str(int(args.seconds * 1000)), "--stability-percentage", "25",
                   "--max-trials", "5", "-f", str(out)]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            if p.returncode != 0:
                raise SystemExit(f"perf_analyzer failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
            with open(out) as f:
                row = next(csv.DictReader(f))
            r = {"concurrency": c, "inferences_per_s": float(row["Inferences/Second"]),
                 "p50_ms": float(row["p50 latency"]) / 1000, "p90_ms": float(row["p90 latency"]) / 1000,
                 "p99_ms": float(row["p99 latency"]) / 1000, "raw": row}
            results.append(r)
            rows.append([c, r["inferences_per_s"], r["p50_ms"], r["p90_ms"], r["p99_ms"]])
            print(rows[-1], flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    table = md_table(["concurrency", "inferences/s", "p50 ms", "p90 ms", "p99 ms"], rows)
    print(table)
    write("perf-analyzer", {"results": results, "perf_analyzer": WHEEL},
          "# Triton perf_analyzer against switchbank (Open Inference Protocol over HTTP)\n\n"
          f"Model `auto` (Auto-Switch), one encoded demo image per request (IMAGE, BYTES), the first "
          f"{args.images} shuffled held-out images of all six demo tasks; perf_analyzer from {WHEEL}'s wheel, "
          "on the same machine as the server.\n\n" + table + "\n\nRerun: `python -m bench.triton_perf`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
