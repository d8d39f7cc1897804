# authz-server image: `make image` builds it as authz-server:<version in pyproject.toml>,
# `make image-check` lints and tests this file.
#
#   docker run --rm -p 9001:9001 -p 9090:9090 -v "$PWD/examples/demo:/etc/authz-server:ro" authz-server:0.1.0
#   docker run --rm -v "$PWD/examples/demo:/etc/authz-server:ro" authz-server:0.1.0 \
#       validate --config /etc/authz-server/
#
# Both stages use the same base image: the venv's python links to the base's interpreter.
# For byte-for-byte rebuilds pin the digest too (python:3.11-slim@sha256:...).

# ---- builder: a wheel of the package, installed with its dependencies into /opt/venv ----
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# The locked dependency set first, in its own layer: a change to the code rebuilds only what
# follows. requirements/runtime.txt pins every runtime dependency with its hashes (and the pip
# and setuptools that build the package); --only-binary: every one ships manylinux wheels
# (grpcio, cryptography, pydantic-core), so no compiler is needed either. The venv gets no pip
# of its own from ensurepip: the base image's pip installs into it (--python). Then the lock's
# opentelemetry-proto once more, last: xds-protos ships an old copy of its files at the same
# paths and pip installs xds-protos after it (the Makefile's otlp-protos says more).
COPY requirements/runtime.txt ./requirements/
RUN python -m venv --without-pip /opt/venv \
    && pip --python /opt/venv/bin/python install --no-cache-dir --require-hashes \
        --only-binary=:all: -r requirements/runtime.txt \
    && awk '/^opentelemetry-proto==/ {on = 1; print; next} on && /^[^ ]/ {exit} on {print}' \
        requirements/runtime.txt > /tmp/otlp-protos.txt \
    && pip --python /opt/venv/bin/python install --no-cache-dir --require-hashes --no-deps \
        --force-reinstall --only-binary=:all: -r /tmp/otlp-protos.txt \
    && rm /tmp/otlp-protos.txt

# The package itself, built by the locked setuptools (--no-build-isolation: nothing fetched)
# and installed without dependencies (they are all above). Then pip and setuptools leave: the
# final image carries only the package and what it runs on. Byte code is compiled at install
# time, so the read-only final image never writes any.
COPY pyproject.toml README.md ./
COPY authz_server ./authz_server
RUN /opt/venv/bin/python -m pip wheel --no-cache-dir --no-deps --no-build-isolation \
        --wheel-dir /tmp/wheels . \
    && /opt/venv/bin/python -m pip install --no-cache-dir --no-deps --no-index /tmp/wheels/*.whl \
    && /opt/venv/bin/python -m pip uninstall --yes pip setuptools \
    && rm -rf /tmp/wheels /src/build

# ---- final: the venv on a clean base, run as an unprivileged numeric user ----
FROM python:3.11-slim

LABEL org.opencontainers.image.title="authz-server" \
      org.opencontainers.image.description="Envoy external authorization server: JWT verification and Istio-style claim policies" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH="/opt/venv/bin:${PATH}"

# A passwd entry for 10001 (tools and logs show a name); the config directory is where
# Kubernetes mounts the ConfigMap (k8s/base) and where `serve` reads *.yaml from.
RUN groupadd --system --gid 10001 authz \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin authz \
    && mkdir -p /etc/authz-server

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
USER 10001:10001

# 9001: gRPC (envoy.service.auth.v3.Authorization, grpc.health.v1.Health);
# 9090: HTTP (/metrics, /healthz, /readyz).
EXPOSE 9001 9090

# No HEALTHCHECK: Kubernetes uses its native gRPC probes against the health service.
ENTRYPOINT ["python", "-m", "authz_server"]
CMD ["serve", "--config", "/etc/authz-server/"]
