# digitserve: two images from this one Dockerfile.
#   docker build -t digitserve .                          serve (the default target, the last stage):
#       mnist-serve and mnist-client, no TensorFlow: versions served from their LiteRT flatbuffer
#   docker build --target train -t digitserve-train .     train: mnist-train, TensorFlow, and the
#       server and client too (it serves a version only TensorFlow can serve)
#   docker run -p 50051:50051 -p 8080:8080 -v "$PWD/models:/models:ro" digitserve
#       serves every model of ./models (docs/containers.md)
# Stages: `requirements` turns pyproject.toml alone into requirement lists; `build` builds the
# project's wheel from the sources; `train-deps` and `serve-deps` install each image's
# dependencies into the virtual environment /opt/venv (a layer only a change of dependencies
# rebuilds); `train` and `serve` copy their environment onto a fresh base image and install the
# wheel into it (a small layer per code change): no build tools, pip cache or sources, uid 10001.
# BASE_IMAGE pins the base (a tag of one Debian release; pin a digest for production:
# --build-arg BASE_IMAGE=python:3.11-slim-bookworm@sha256:...). VERSION, CREATED (an RFC 3339
# date) and SOURCE fill the OCI labels.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS requirements
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# serve: the client's dependencies and the serve and loadtest extras; train: the server, trainer
# and loadtest extras (TensorFlow); build: the build system's.
COPY pyproject.toml ./
RUN python -c "import tomllib; \
      p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
      reqs = lambda *extras: p['dependencies'] + [r for e in extras for r in p['optional-dependencies'][e]]; \
      open('requirements-serve.txt', 'w').write('\n'.join(reqs('serve', 'loadtest')) + '\n'); \
      open('requirements-train.txt', 'w').write('\n'.join(reqs('server', 'trainer', 'loadtest')) + '\n')" \
 && python -c "import tomllib; \
      reqs = tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires']; \
      open('requirements-build.txt', 'w').write('\n'.join(reqs) + '\n')"

FROM requirements AS build
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install --no-cache-dir --requirement requirements-build.txt
COPY README.md ./
COPY core ./core
COPY protos ./protos
COPY trainer ./trainer
COPY server ./server
COPY client ./client
RUN /opt/build/bin/pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels .

FROM requirements AS train-deps
# TensorFlow's C++ headers (~290 MB) only serve to compile custom ops: dropped.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --requirement requirements-train.txt \
 && rm -rf /opt/venv/lib/python3*/site-packages/tensorflow/include

FROM requirements AS serve-deps
# strip (binutils) only here, in a stage whose files do not reach the image
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends binutils \
 && rm -rf /var/lib/apt/lists/*
# A venv without pip or setuptools (the base image's pip installs into it). Then what serving
# never loads: numpy's tests, f2py, distutils and C headers; type stubs (*.pyi) and Cython
# sources (*.pyx, *.pxd, *.pxi: uvloop's 0.5 MB); LiteRT's GPU accelerator, NPU vendor plugins,
# ahead-of-time compiler, tools and libLiteRt.so (its CompiledModel API: the interpreter the server
# runs, XNNPACK on the CPU, never opens it, checked with strace); and the symbol tables of the
# extension modules (not of the *.libs folders: their libraries are patched by auditwheel, and
# strip breaks them). The container check runs the server and client from the result.
RUN python -m venv --without-pip /opt/venv \
 && python -m pip --python /opt/venv/bin/python install --no-cache-dir --requirement requirements-serve.txt \
 && site=$(/opt/venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") \
 && rm -rf "$site"/numpy/f2py "$site"/numpy/distutils "$site"/numpy/_pyinstaller \
      "$site"/ai_edge_litert/libLiteRtWebGpuAccelerator.so "$site"/ai_edge_litert/vendors \
      "$site"/ai_edge_litert/aot "$site"/ai_edge_litert/tools "$site"/ai_edge_litert/libLiteRt.so \
      "$site"/numpy/_core/include \
 && find "$site"/numpy -depth -type d -name tests -exec rm -rf {} + \
 && find "$site" \( -name '*.pyi' -o -name '*.pyx' -o -name '*.pxd' -o -name '*.pxi' \) -type f -delete \
 && find "$site" -name '*.so*' -type f -not -path '*.libs/*' -exec strip --strip-unneeded {} +

# --- the train image ---------------------------------------------------------------------------
# matplotlib (the training report) keeps its font cache in MPLCONFIGDIR, which must be writable:
# it ignores a cache built into a read-only directory. /tmp is writable (a tmpfs in compose and
# an emptyDir in Kubernetes, where the root file system is read-only).
FROM ${BASE_IMAGE} AS train
ARG VERSION=0.1.0
ARG CREATED=unknown
ARG SOURCE=https://github.com/digitserve/digitserve
LABEL org.opencontainers.image.title="digitserve-train" \
      org.opencontainers.image.description="MNIST trainer (TensorFlow) with the digitserve server and client" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY docker/entrypoint.sh /usr/local/bin/docker-entrypoint
# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can check it; /data and /models belong to
# it so that named volumes mounted there start out writable by it.
RUN useradd --no-log-init --uid 10001 --user-group --create-home --home-dir /home/app app \
 && mkdir -p /data /models \
 && chown app:app /data /models \
 && chmod 0755 /usr/local/bin/docker-entrypoint
COPY --from=train-deps /opt/venv /opt/venv
COPY --from=build /wheels/ /tmp/wheels/
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MPLCONFIGDIR=/tmp/matplotlib \
    DIGITSERVE_IMAGE=train \
    MNIST_DATA_DIR=/data \
    MNIST_MODEL_REPO=/models \
    MNIST_HOST=0.0.0.0 \
    MNIST_PORT=50051 \
    MNIST_HTTP_PORT=8080 \
    MNIST_METRICS_PORT=9090
USER 10001:10001
WORKDIR /home/app
EXPOSE 50051 8080 9090
ENTRYPOINT ["docker-entrypoint"]
CMD ["fetch-and-train"]

# --- the serve image (the default target: keep it last) ---------------------------------------
FROM ${BASE_IMAGE} AS serve
ARG VERSION=0.1.0
ARG CREATED=unknown
ARG SOURCE=https://github.com/digitserve/digitserve
LABEL org.opencontainers.image.title="digitserve" \
      org.opencontainers.image.description="MNIST gRPC model server (LiteRT, no TensorFlow) and client" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY docker/entrypoint.sh /usr/local/bin/docker-entrypoint
RUN useradd --no-log-init --uid 10001 --user-group --create-home --home-dir /home/app app \
 && mkdir -p /data /models \
 && chown app:app /data /models \
 && chmod 0755 /usr/local/bin/docker-entrypoint
COPY --from=serve-deps /opt/venv /opt/venv
COPY --from=build /wheels/ /tmp/wheels/
# the base image's pip (the venv has none), its byte-code compiled into the venv
RUN PYTHONDONTWRITEBYTECODE=1 python -m pip --python /opt/venv/bin/python install --no-cache-dir \
      --no-deps /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels
# No MNIST_MODEL_NAME: the server serves every model of /models, and waits for a first one.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DIGITSERVE_IMAGE=serve \
    MNIST_DATA_DIR=/data \
    MNIST_MODEL_REPO=/models \
    MNIST_HOST=0.0.0.0 \
    MNIST_PORT=50051 \
    MNIST_HTTP_PORT=8080 \
    MNIST_METRICS_PORT=9090
USER 10001:10001
WORKDIR /home/app
EXPOSE 50051 8080 9090
# The gRPC health service (grpc.health.v1) of the server in this container; the client
# containers of the compose stack turn it off.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["docker-entrypoint", "health"]
ENTRYPOINT ["docker-entrypoint"]
CMD ["serve"]
