"""Shared benchmark helpers: machine description, repeated timing, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from switchbank.allocator import use_huge_pages

use_huge_pages()  # as the server does, so that in-process and served figures compare like for like

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cpu = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    field = {}
    for line in info:  # the first core's lines
        key, _, value = line.partition(":")
        field.setdefault(key.strip(), value.strip())
    cpu = field.get("model name", cpu)
    flags = set(field.get("flags", "").split())
    return {"host": platform.node(), "cpu": cpu, "isa": _isa(flags), "cores": os.cpu_count(), "gpu": gpu,
            "device": "cuda" if gpu else "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version()}


def _isa(flags: set[str]) -> str:
    """The widest vector extensions the figures depend on (bfloat16 products, AVX-512, AVX2)."""
    for name, need in (("amx", "amx_bf16"), ("avx512-bf16", "avx512_bf16"), ("avx512", "avx512f"), ("avx2", "avx2")):
        if need in flags:
            return name
    return platform.machine()


def machine_tag() -> str:
    """Results' file suffix: the GPU, or the CPU's cores, with its vector extensions where they are
    not AVX512-BF16's ("-avx2", "-avx512", "-amx"): its figures differ by several times, and which
    of torch's kernels is fastest differs with them (results without a suffix come from an
    AVX512-BF16 CPU)."""
    m = machine()
    if m["gpu"]:
        return "gpu-" + m["gpu"].split()[-1].lower()
    return f"cpu{m['cores']}" + ("" if m["isa"] == "avx512-bf16" else f"-{m['isa']}")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeit(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call, ``repeats`` times after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def interleaved(cases: dict, repeats: int, inner: dict | int = 1, warmup: int = 1) -> dict[object, list[float]]:
    """Seconds per call of each case, timed in rounds: every round runs every case once (``inner``
    calls per sample, per case or for all), so the machine's slow moments fall on all cases alike
    and ratios can be taken round by round."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[object, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for key, fn in cases.items():
            n = inner if isinstance(inner, int) else inner[key]
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            times[key].append((time.perf_counter() - t0) / n)
    return times


def paired(samples: list[float], reference: list[float]) -> float:
    """Median over rounds of sample / reference."""
    return statistics.median(a / b for a, b in zip(samples, reference))


def summary(samples: list[float]) -> dict:
    s = sorted(samples)
    q = statistics.quantiles(s, n=4) if len(s) >= 4 else [s[0], statistics.median(s), s[-1]]
    return {"median": statistics.median(s), "p25": q[0], "p75": q[2], "min": s[0], "max": s[-1], "n": len(s)}


def write(name: str, payload: dict, markdown: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = machine_tag()
    base = RESULTS / f"{name}-{tag}"
    base.with_suffix(".json").write_text(json.dumps({"machine": machine(), **payload}, indent=1) + "\n")
    m = machine()
    header = (f"Machine: {m['cpu']} ({m['isa']}, {m['cores']} cores{', ' + m['gpu'] if m['gpu'] else ''}), torch {m['torch']}, "
              f"{m['threads']} threads, device {m['device']}.\n\n")
    base.with_suffix(".md").write_text(header + markdown + "\n")
    return base


def group_counts(before: dict, after: dict) -> tuple[int, int, int]:
    """From two of an engine's stats (EngineStats as a dict): the groups served on cached weights
    and those merged just in time between them, and the batches."""
    hot = after["groups_hot"] - before["groups_hot"]
    cold = after["groups_cold"] - before["groups_cold"]
    batches = sum(after[k] - before[k] for k in ("batches_cached", "batches_mixed", "batches_grouped"))
    return hot, cold, batches


def md_table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        out.append("| " + " | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in r) + " |")
    return "\n".join(out)


# --- a real server on loopback, and demo traffic for it --------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bank: Path, port: int, *, entry: tuple[str, ...] = ("app.cli", "serve"), **env):
    """``switchbank serve`` (or ``python -m *entry``) in a subprocess; ``env`` sets SWITCHBANK_*
    settings (admin_token=...)."""
    import subprocess
    import sys
    environ = {**os.environ, "PYTHONPATH": str(ROOT),
               **{f"SWITCHBANK_{k.upper()}": str(v) for k, v in env.items()}}
    return subprocess.Popen([sys.executable, "-m", *entry, "--bank", str(bank), "--port", str(port)],
                            env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(port: int, proc, timeout: float = 120) -> None:
    import httpx
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError("server not ready")


def demo_traffic(n: int, per_task: int | None = None, seed: int = 0, named: float = 0.5) -> list[tuple[bytes, dict]]:
    """n (png bytes, form fields) requests: the held-out test images of every demo task, shuffled
    (bench/traffic.py) and taken in turn, at most ``per_task`` of each task; a share ``named`` of
    them name their task, the rest are left to Auto-Switch."""
    import random

    from bench.traffic import demo_pngs
    rng = random.Random(seed)
    pool, taken = [], {}
    for task, png in demo_pngs():
        if per_task is None or taken.get(task, 0) < per_task:
            taken[task] = taken.get(task, 0) + 1
            pool.append((task, png))
    return [(png, {"task": t} if rng.random() < named else {}) for t, png in (pool[i % len(pool)] for i in range(n))]
