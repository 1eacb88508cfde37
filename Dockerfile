# zds images: the node agent, the ztunnel side, and a plain one for tools and fixtures.
#
#   docker build --target node-agent -t zds-node-agent .    # `zds server`, HEALTHCHECK on /readyz
#   docker build --target ztunnel    -t zds-ztunnel .       # `zds ztunnel`, HEALTHCHECK on /healthz/ready
#   docker build -t zds .                                   # `zds ...` (default target)
#
# docker-compose.yml builds all three. Every image runs as an unprivileged user by
# default; the node agent and ztunnel need root with CAP_SYS_ADMIN and CAP_NET_ADMIN
# (README "Containers"), which the compose file grants to them and to nothing else.
#
# BASE_IMAGE is any Debian 12 image with Python 3.11 and its venv module (the official
# slim image by default). The runtime stage installs iptables and iproute2 unless the
# base image has them already (the test suite's base image, made without a registry, does).
ARG BASE_IMAGE=python:3.11-slim-bookworm

# --- build: a virtualenv with zds and its dependencies -------------------------------
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python3 -m venv /opt/zds
# Dependencies first, from pyproject.toml alone: this layer stays cached until they change.
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > requirements.txt \
    && /opt/zds/bin/pip install --no-cache-dir -r requirements.txt
COPY README.md ./
COPY zds/ zds/
COPY server/ server/
COPY client/ client/
COPY netns/ netns/
# The runtime needs neither pip nor setuptools: drop them (a quarter of the venv).
RUN /opt/zds/bin/pip install --no-cache-dir --no-deps /src \
    && /opt/zds/bin/pip uninstall --yes --quiet pip setuptools
COPY deploy/zds-get /opt/zds/bin/zds-get
COPY deploy/compose/ /opt/zds/compose/

# --- runtime: what every image shares ----------------------------------------------
FROM ${BASE_IMAGE} AS runtime
# Unpinned on purpose: Debian 12's own iptables/iproute2, security updates included.
# hadolint ignore=DL3008
RUN if ! command -v iptables-restore >/dev/null || ! command -v ip >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends iptables iproute2 \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin zds
COPY --from=build /opt/zds /opt/zds
ENV PATH=/opt/zds/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
LABEL org.opencontainers.image.title="zds" \
      org.opencontainers.image.description="Both ends of Istio ambient mode's ZDS handshake (node agent and ztunnel side)" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 10001:10001

# --- ztunnel: `zds ztunnel` ---------------------------------------------------------
FROM runtime AS ztunnel
# Ready only while connected to the node agent, the snapshot reconciled, nothing pending.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD ["zds-get", "--quiet", "http://127.0.0.1:15021/healthz/ready"]
ENTRYPOINT ["zds", "ztunnel"]

# --- node-agent: `zds server` -------------------------------------------------------
FROM runtime AS node-agent
# Ready once the ZDS socket, the control API and the other listeners are up.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD ["zds-get", "--quiet", "http://127.0.0.1:8000/readyz"]
ENTRYPOINT ["zds", "server"]

# --- default: `zds ...` (pod fixtures, the compose check, `zds pod` clients) ----------
FROM runtime AS zds
ENTRYPOINT ["zds"]
CMD ["--help"]
