# syntax=docker/dockerfile:1.7
# verlyard api image: the HTTP API, its projections and the outbox relay, run as `verlyard api`; also
# `verlyard ssh-runner` (compose's ssh-runner service): verlyard-agent with its `ssh` extra (asyncssh,
# cryptography), never torch or verl (the SSH hosts run their own trainer).
# Build from the repository root (compose.yaml does this):
#   docker build -f deploy/docker/api.Dockerfile -t verlyard-api .
# Both stages use the same base, so the venv's interpreter path is identical in the final image.
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY shared/ shared/
COPY services/api/ services/api/
COPY services/gpu-agent/ services/gpu-agent/
# Wheels first (ours from the local paths, dependencies from the index), then an offline install:
# --no-index means a same-named package on a public index can never replace ours.
RUN python -m pip wheel --wheel-dir /wheels ./shared ./services/api "./services/gpu-agent[ssh]" \
 && python -m venv /opt/verlyard \
 && /opt/verlyard/bin/pip install --no-index --find-links /wheels verlyard-api "verlyard-agent[ssh]" \
 && /opt/verlyard/bin/python -c "import verlyard_api, verlyard_shared, verlyard_agent.ssh.app, asyncssh"

FROM ${PYTHON_IMAGE} AS final
LABEL org.opencontainers.image.title="verlyard-api" \
      org.opencontainers.image.description="verlyard: the HTTP API, its projections, the outbox relay and the SSH runner"
# A fixed, non-root uid: named volumes mounted on /var/lib/verlyard inherit its ownership.
RUN groupadd --system --gid 10001 verlyard \
 && useradd --system --uid 10001 --gid verlyard --home-dir /var/lib/verlyard --shell /usr/sbin/nologin verlyard \
 && install -d -o verlyard -g verlyard -m 0750 /var/lib/verlyard
COPY --from=builder /opt/verlyard /opt/verlyard
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/verlyard-healthcheck
ENV PATH=/opt/verlyard/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VERLYARD_HOME=/var/lib/verlyard \
    VERLYARD_LOG_FORMAT=json
# Inside a container loopback is unreachable from outside; who may reach the API is decided by the
# port publishing (compose binds it to 127.0.0.1 by default) and by the bearer token on every route.
ENV VERLYARD_API_HOST=0.0.0.0 \
    VERLYARD_API_PORT=8400
EXPOSE 8400
USER 10001:10001
WORKDIR /var/lib/verlyard
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["verlyard-healthcheck", "http", "http://127.0.0.1:8400/healthz"]
ENTRYPOINT ["verlyard"]
CMD ["api"]
