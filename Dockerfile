# One image for every loraplane component; the worker's target is a GPU node.
# The command picks the component: controlplane.server, dataplane.app or workeragent.agent.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY loraplane loraplane
COPY controlplane controlplane
COPY dataplane dataplane
COPY workeragent workeragent
ARG EXTRAS=vllm
RUN pip install --no-cache-dir ".[${EXTRAS}]"
USER 1000
