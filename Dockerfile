# syntax=docker/dockerfile:1
# One image for the deepspec operator and every workload Job it launches (regenerate, features,
# train under torchrun, eval, export). GPU nodes: torch comes with its CUDA wheels (the NVIDIA driver
# is provided by the node through the container toolkit). The SGLang target server is a separate
# image (spec.target.image, default lmsysorg/sglang:<pinned tag>).
#
#   docker build -t ghcr.io/deepspec/deepspec:0.1.0 .
#   docker run --rm ghcr.io/deepspec/deepspec:0.1.0 --help

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126

# ---- build: a virtual environment with torch (CUDA) and deepspec[serve,operator] ----------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION
ARG TORCH_INDEX
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the CUDA index, so that nothing later pulls another build
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY deepspec ./deepspec
RUN pip install --no-cache-dir "./[serve,operator]"

# ---- runtime --------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="deepspec" \
      org.opencontainers.image.description="Speculative-decoding draft training, evaluation, export and the DraftTraining operator" \
      org.opencontainers.image.licenses="Apache-2.0"
# HF_HOME: a folder uid 1000 owns. The operator's Jobs override it with a folder on the run volume
# (/data/.cache) or an emptyDir (/cache) when the run stores to S3; /data only exists with a volume.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/deepspec/.cache/huggingface \
    HOME=/home/deepspec
RUN groupadd --gid 1000 deepspec \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/deepspec --shell /usr/sbin/nologin deepspec
COPY --from=build /opt/venv /opt/venv
COPY --chown=1000:1000 configs /opt/deepspec/configs
WORKDIR /home/deepspec
USER 1000:1000
ENTRYPOINT ["deepspec"]
CMD ["--help"]
