# tidegate: MySQL sidecar proxy + online schema-change migrator.
# A small non-root image whose entrypoint is `tidegate serve`:
#
#   docker build -t tidegate:0.1.0 .
#   docker run -p 6033:6033 -p 9104:9104 -e TIDEGATE_BACKEND=mysql://svc:secret@db:3306 tidegate:0.1.0
#
# The base is pinned to a Python patch release on a fixed Debian release.  To
# pin it by digest too (recommended in CI), pass the digest your registry
# reports:  --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest>
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- build: install tidegate and its dependencies into a virtualenv ---------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# The venv gets no pip of its own: the base image's pip installs into it, so
# the shipped image carries neither pip nor setuptools.
RUN python -m venv --without-pip /opt/tidegate
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY migrator ./migrator
RUN pip --python /opt/tidegate/bin/python install --no-cache-dir --no-compile . \
 && /opt/tidegate/bin/python -m compileall -q -j 0 /opt/tidegate/lib
COPY deploy/docker/healthcheck.py /opt/tidegate/bin/tidegate-healthcheck

# ---- runtime ----------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="tidegate" \
      org.opencontainers.image.description="MySQL sidecar proxy with an online schema-change migrator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 tidegate \
 && useradd --system --uid 10001 --gid tidegate --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin tidegate
COPY --from=build /opt/tidegate /opt/tidegate
COPY deploy/docker/tidegate.toml /etc/tidegate/tidegate.toml
# Bytecode was compiled at build time; the root filesystem may be read-only.
ENV PATH=/opt/tidegate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TIDEGATE_CONFIG=/etc/tidegate/tidegate.toml
USER 10001:10001
WORKDIR /tmp
# 6033 MySQL for applications, 9104 /metrics /healthz /readyz /status.
# The admin SQL port (6032) listens on loopback only and is not exposed.
EXPOSE 6033 9104
# SIGTERM drains: no new clients, running statements and transactions get
# limits.shutdown_grace (default 5 s).  Give `docker stop -t` more than that.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["tidegate-healthcheck", "/healthz"]
ENTRYPOINT ["tidegate", "serve"]
