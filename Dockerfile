# digitserve: one image that trains (mnist-train), serves (mnist-serve) and calls (mnist-client).
#   docker build -t digitserve .    then    docker run digitserve {serve|fetch-and-train|evaluate|...}
# Stages: `builder` makes a virtual environment in /opt/venv (dependencies first, in a layer that
# only pyproject.toml invalidates, then the project itself); `runtime` copies that environment
# onto a fresh base image: no build tools, no pip cache, no sources, a non-root user.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
# Dependency layer: the requirement lists of pyproject.toml (build system, project and EXTRAS),
# installed before any source is copied, so editing code does not reinstall TensorFlow.
# TensorFlow's C++ headers (~290 MB) only serve to compile custom ops: dropped.
# EXTRAS= (empty) makes a client-only image without TensorFlow.
ARG EXTRAS=server,trainer
COPY pyproject.toml ./
RUN python -c "import os, tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); extras = [e for e in os.environ['EXTRAS'].split(',') if e]; reqs = p['build-system']['requires'] + p['project']['dependencies'] + [r for e in extras for r in p['project']['optional-dependencies'][e]]; print('\n'.join(reqs))" > requirements.txt \
 && /opt/venv/bin/pip install --no-cache-dir --requirement requirements.txt \
 && rm -rf /opt/venv/lib/python3*/site-packages/tensorflow/include
# Code layer: the project alone, built with the setuptools installed above (no network needed).
COPY README.md ./
COPY protos ./protos
COPY trainer ./trainer
COPY server ./server
COPY client ./client
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation .

FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="digitserve" \
      org.opencontainers.image.description="MNIST trainer, gRPC model server and client" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY docker/entrypoint.sh /usr/local/bin/docker-entrypoint
# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can check it; /data and /models belong to
# it so that named volumes mounted there start out writable by it.
RUN useradd --no-log-init --uid 10001 --user-group --create-home --home-dir /home/app app \
 && mkdir -p /data /models \
 && chown app:app /data /models \
 && chmod 0755 /usr/local/bin/docker-entrypoint
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MNIST_DATA_DIR=/data \
    MNIST_MODEL_REPO=/models \
    MNIST_MODEL_NAME=mnist \
    MNIST_HOST=0.0.0.0 \
    MNIST_PORT=50051
USER 10001:10001
WORKDIR /home/app
EXPOSE 50051 9090
# The gRPC health service (grpc.health.v1) of the server in this container; the trainer and
# client containers of the compose stack turn this off.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["docker-entrypoint", "health"]
ENTRYPOINT ["docker-entrypoint"]
CMD ["serve"]
