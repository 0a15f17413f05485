# One image per role, from one source tree:
#   target `app`    — control plane and data plane (no inference engine):
#                     python -m controlplane.server | python -m dataplane.app
#   target `worker` — a GPU node's agent, which starts and guards vLLM (GPU build from PyPI):
#                     python -m workeragent.agent
# The NVIDIA driver comes from the host (NVIDIA Container Toolkit); the CUDA libraries come with
# vLLM's and torch's wheels.
FROM python:3.11-slim AS app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --uid 1000 --create-home loraplane \
 && mkdir -p /var/lib/loraplane/artifacts /var/cache/loraplane \
 && chown -R 1000:1000 /var/lib/loraplane /var/cache/loraplane
WORKDIR /app
COPY pyproject.toml README.md ./
COPY loraplane loraplane
COPY controlplane controlplane
COPY dataplane dataplane
COPY workeragent workeragent
RUN pip install .
# Named volumes mounted on these directories start owned by this user.
USER 1000
ENV HOME=/home/loraplane

FROM app AS worker
USER root
# Triton (under vLLM) compiles small launchers at run time: it needs a C compiler.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN pip install ".[vllm]"
USER 1000
