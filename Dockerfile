# digitserve: one image that trains (mnist-train), serves (mnist-serve) and calls (mnist-client).
#   docker build -t digitserve .    then    docker run digitserve {serve|fetch-and-train|evaluate|...}
# Stages: `deps` installs the dependencies into the virtual environment /opt/venv from
# pyproject.toml alone; `wheel` builds the project's wheel from the sources; `runtime` copies the
# environment (a layer that only a change of dependencies rebuilds) onto a fresh base image and
# installs the wheel into it (a small layer per code change): no build tools, no pip cache, no
# sources, a non-root user.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# The requirement lists of pyproject.toml: the project's and its EXTRAS into /opt/venv, the build
# system's into /opt/build (for the wheel stage, which then needs no network).
# TensorFlow's C++ headers (~290 MB) only serve to compile custom ops: dropped.
# EXTRAS=loadtest makes a client-only image without TensorFlow (EXTRAS= drops `mnist-client
# loadtest` too).
ARG EXTRAS=server,trainer,loadtest
COPY pyproject.toml ./
RUN python -c "import os, tomllib; \
      p = tomllib.load(open('pyproject.toml', 'rb')); \
      extras = [e for e in os.environ['EXTRAS'].split(',') if e]; \
      reqs = p['project']['dependencies'] + [r for e in extras for r in p['project']['optional-dependencies'][e]]; \
      open('requirements.txt', 'w').write('\n'.join(reqs) + '\n'); \
      open('build-requirements.txt', 'w').write('\n'.join(p['build-system']['requires']) + '\n')" \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --requirement requirements.txt \
 && rm -rf /opt/venv/lib/python3*/site-packages/tensorflow/include \
 && python -m venv /opt/build \
 && /opt/build/bin/pip install --no-cache-dir --requirement build-requirements.txt

FROM deps AS wheel
COPY README.md ./
COPY core ./core
COPY protos ./protos
COPY trainer ./trainer
COPY server ./server
COPY client ./client
RUN /opt/build/bin/pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels .

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
COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /wheels/ /tmp/wheels/
# TensorFlow imports matplotlib: build its font cache once here instead of at every start
# (the root file system is read-only at run time).
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels \
 && MPLCONFIGDIR=/opt/mplconfig /opt/venv/bin/python -c "import matplotlib.font_manager" \
 && chmod -R a+rX /opt/mplconfig
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MPLCONFIGDIR=/opt/mplconfig \
    MNIST_DATA_DIR=/data \
    MNIST_MODEL_REPO=/models \
    MNIST_MODEL_NAME=mnist \
    MNIST_HOST=0.0.0.0 \
    MNIST_PORT=50051 \
    MNIST_HTTP_PORT=8080 \
    MNIST_METRICS_PORT=9090
USER 10001:10001
WORKDIR /home/app
EXPOSE 50051 8080 9090
# The gRPC health service (grpc.health.v1) of the server in this container; the trainer and
# client containers of the compose stack turn this off.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["docker-entrypoint", "health"]
ENTRYPOINT ["docker-entrypoint"]
CMD ["serve"]
