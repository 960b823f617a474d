# syntax=docker/dockerfile:1
# The llm-exporter image.
#
#   docker build -t llm-exporter .
#   docker build -t llm-exporter:gpu --build-arg EXTRAS=gpu .    # NVIDIA GPU metrics through NVML
#   docker run -p 127.0.0.1:9741:9741 \
#     -v "$PWD/llm-exporter.yml:/etc/llm-exporter/llm-exporter.yml:ro" llm-exporter
#
# A provider on the host's loopback (Ollama's default 127.0.0.1:11434) needs --network host;
# README.md ("With docker run") shows both ways.
#
# No configuration is baked in: mount one at /etc/llm-exporter/llm-exporter.yml (the
# image's default --config.file) or pass --config.file. docker-compose.yml at the top of
# the repository runs the image with Prometheus, Alertmanager and Grafana.

ARG PYTHON_IMAGE=python:3.11-slim

# Build stage: install the package and its dependencies into a virtualenv, so the
# runtime stage gets them without pip, setuptools or the build's leftovers.
FROM ${PYTHON_IMAGE} AS build
# Extras of the package to install, comma-separated: "gpu" adds nvidia-ml-py (NVML).
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter/ exporter/
RUN /opt/venv/bin/pip install ".${EXTRAS:+[${EXTRAS}]}"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="llm-exporter" \
      org.opencontainers.image.description="Prometheus exporter for LLM inference servers: Ollama, llama.cpp, vLLM and OpenAI-compatible APIs" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A fixed, unprivileged uid/gid (65532, as distroless' "nonroot"), numeric in USER below
# so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN groupadd --system --gid 65532 exporter \
 && useradd --system --uid 65532 --gid 65532 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin exporter \
 && mkdir -p /etc/llm-exporter
COPY --from=build /opt/venv /opt/venv
# The default --config.file is relative to the working directory: with flags of your own
# instead of CMD, llm-exporter still reads /etc/llm-exporter/llm-exporter.yml.
WORKDIR /etc/llm-exporter
USER 65532:65532
EXPOSE 9741
# /-/healthy answers 200 while the process serves. The slim image has no curl, so Python
# asks; proxies are bypassed, as an HTTP_PROXY set for hosted APIs must not catch 127.0.0.1.
# With --web.listen-address on another port, or on one address only, override this.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:9741/-/healthy', timeout=4)"]
ENTRYPOINT ["llm-exporter"]
CMD ["--config.file=/etc/llm-exporter/llm-exporter.yml"]
