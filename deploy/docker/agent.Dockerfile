# syntax=docker/dockerfile:1.7
# verlyard gpu-agent image: runs stages on one NVIDIA host, as `verlyard agent`.
# Build from the repository root (compose.yaml does this):
#   docker build -f deploy/docker/agent.Dockerfile -t verlyard-agent .
#
# Base: nvidia/cuda:12.8.1-runtime-ubuntu24.04 (CUDA 12.8 user-space libraries, Ubuntu 24.04, whose
# python3 is 3.12). The host needs only the NVIDIA driver and the NVIDIA Container Toolkit; compose
# reserves the GPUs with `deploy.resources.reservations.devices` (driver nvidia, capabilities [gpu]).
#
# Two separate environments, never mixed (architecture decision 6: the agent never imports torch or verl):
#   /opt/verlyard  the agent itself (verlyard-agent + verlyard-shared), small;
#   /opt/trainer   verl==0.9.1 and torch, the trainer's own Python, run by the agent as a child process:
#                  VERLYARD_TRAINER_PYTHON=/opt/trainer/bin/python
# verl 0.9.1's extras pin torch==2.11.0; the CUDA 12.8 build of it comes from the PyTorch index.
# Change TORCH_VERSION / TORCH_INDEX_URL together with CUDA_IMAGE (e.g. cu126 with a CUDA 12.6 base).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM runtime AS agent-builder
WORKDIR /src
COPY shared/ shared/
COPY services/gpu-agent/ services/gpu-agent/
# Wheels first (ours from the local paths, dependencies from the index), then an offline install:
# --no-index means a same-named package on a public index can never replace ours.
RUN python3 -m venv /opt/build \
 && /opt/build/bin/pip wheel --wheel-dir /wheels ./shared ./services/gpu-agent \
 && python3 -m venv /opt/verlyard \
 && /opt/verlyard/bin/pip install --no-index --find-links /wheels verlyard-agent \
 && /opt/verlyard/bin/python -c "import verlyard_agent, verlyard_shared"

FROM runtime AS trainer-builder
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG VERL_VERSION=0.9.1
# torch first, from the CUDA index, so verl's resolution keeps that exact build; verl 0.9.1's
# sft_trainer imports uvicorn without declaring it, hence uvicorn and fastapi.
RUN python3 -m venv /opt/trainer \
 && /opt/trainer/bin/pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && /opt/trainer/bin/pip install "verl==${VERL_VERSION}" uvicorn fastapi "torch==${TORCH_VERSION}" \
 && /opt/trainer/bin/python -c "import torch, verl; print('torch', torch.__version__, 'verl', verl.__version__)"

FROM runtime AS final
LABEL org.opencontainers.image.title="verlyard-agent" \
      org.opencontainers.image.description="verlyard: GPU agent; verl==0.9.1 + torch in /opt/trainer"
# A fixed, non-root uid: named volumes mounted on /var/lib/verlyard inherit its ownership.
RUN groupadd --system --gid 10001 verlyard \
 && useradd --system --uid 10001 --gid verlyard --home-dir /var/lib/verlyard --shell /usr/sbin/nologin verlyard \
 && install -d -o verlyard -g verlyard -m 0750 /var/lib/verlyard
COPY --from=agent-builder /opt/verlyard /opt/verlyard
COPY --from=trainer-builder /opt/trainer /opt/trainer
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/verlyard-healthcheck
# /opt/trainer/bin stays off PATH on purpose: the agent reaches the trainer only through
# VERLYARD_TRAINER_PYTHON, so nothing in the agent's own environment can pick up torch by accident.
ENV PATH=/opt/verlyard/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VERLYARD_HOME=/var/lib/verlyard \
    VERLYARD_LOG_FORMAT=json \
    VERLYARD_TRAINER_PYTHON=/opt/trainer/bin/python
USER 10001:10001
WORKDIR /var/lib/verlyard
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["verlyard-healthcheck", "process", "agent"]
# SIGTERM asks the agent to drain (take no new work, wind down and report what runs); give it time
# with `stop_grace_period` in compose or `docker stop -t`, or it is killed mid-report.
STOPSIGNAL SIGTERM
ENTRYPOINT ["verlyard"]
CMD ["agent"]
