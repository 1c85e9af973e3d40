"""Every command in the README and docs/ runs as written.

Shell blocks run with bash, in order, one document at a time. Blocks that talk to a server on
127.0.0.1:8000 run against the demo server started with the README's own command
(`bash scripts/serve-demo.sh`, on a free port); so does the README's Python snippet. Commands that
cannot run here (docker, kubectl, the long demo pipeline, the benchmarks, the test suite itself, a
second server) are checked otherwise: their files exist and their --help works.
"""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import wait_ready

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```(bash|python)\n(.*?)```", re.S)
# commands checked otherwise (see test_commands_that_cannot_run_here)
ELSEWHERE = ("bash scripts/serve-demo.sh", "bash scripts/test.sh", "docker ", "kubectl ", "bash deploy/container-test.sh",
             "demo.pipeline", "demo.evaluate", "python -m bench.", "switchbank serve", "SWITCHBANK_ADMIN_TOKEN=change-me")


def blocks(path: Path) -> list[tuple[str, str]]:
    return [(lang, code) for lang, code in BLOCK.findall(path.read_text())]


def runnable(code: str) -> str:
    """The block without the lines checked elsewhere (a trailing backslash joins lines)."""
    lines, out = code.replace("\\\n", " ").splitlines(), []
    for line in lines:
        if not any(marker in line for marker in ELSEWHERE):
            out.append(line)
    return "\n".join(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_server():
    port = free_port()
    env = {**os.environ, "PORT": str(port), "SWITCHBANK_ADMIN_TOKEN": "docs-token"}
    proc = subprocess.Popen(["bash", "scripts/serve-demo.sh"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_ready(port, proc, timeout=600)
        yield port
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


def run_bash(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_commands_run_as_written(doc, demo_server):
    port = demo_server
    for lang, code in blocks(doc):
        needs_server = "127.0.0.1:8000" in code
        code = code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        if lang == "python":
            if not needs_server:
                continue
            p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        else:
            code = runnable(code)
            if not code.strip():
                continue
            p = run_bash(code, ROOT)
        assert p.returncode == 0, f"{doc.name}:\n{code}\n--- stdout\n{p.stdout[-2000:]}\n--- stderr\n{p.stderr[-2000:]}"
        if needs_server and lang == "bash":
            for line in p.stdout.splitlines():
                assert '"error"' not in line, line


def test_commands_that_cannot_run_here():
    text = "\n".join(p.read_text() for p in DOCS)
    assert (ROOT / "scripts" / "serve-demo.sh").is_file() and (ROOT / "scripts" / "test.sh").is_file()
    assert (ROOT / ".ci" / "run").read_text().count("scripts/test.sh") == 1
    assert (ROOT / "Dockerfile").is_file() and (ROOT / "deploy" / "kubernetes" / "kustomization.yaml").is_file()
    assert (ROOT / "deploy" / "container-test.sh").is_file()
    for module in sorted(set(re.findall(r"python -m ((?:bench|demo)\.[a-z_]+)", text))):
        p = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, (module, p.stderr[-1000:])
    p = subprocess.run([str(ROOT / ".venv" / "bin" / "switchbank"), "serve", "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "--bank" in p.stdout


def test_readme_is_short_and_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 160
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#:]+)\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"
