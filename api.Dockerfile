# The service image: the FastAPI app on CPU-only PyTorch, no training dependencies.
#
#   docker build -f api.Dockerfile -t fer-api .
#   docker run --rm -p 8080:8080 fer-api                                   # the bundled model
#   docker run --rm -p 8080:8080 -e MODEL_URI=gs://BUCKET/models fer-api   # latest.json in GCS
#
# Listens on $PORT (Cloud Run sets it; 8080 otherwise). Configuration is the environment
# variables of app/settings.py (README, "The service"). No HEALTHCHECK: Cloud Run ignores it and
# uses the startup (/readyz) and liveness (/healthz) probes that cloudbuild.yaml deploys with.
FROM python:3.11.14-slim-bookworm

# CPU wheels of PyTorch: a fraction of the size of PyPI's CUDA builds. Override the index to
# use a mirror; the versions match the training image (train.Dockerfile).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.9.1
ARG TORCHVISION_VERSION=0.24.1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONPATH=/srv \
    PORT=8080

WORKDIR /srv

# Dependencies first, from pyproject.toml alone: editing the code reuses these layers.
# torch/torchvision come from the CPU index only, and the constraints keep the second install
# from replacing them with PyPI's CUDA builds. The `gcp` extra is the Cloud Trace exporter.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && printf 'torch==%s\ntorchvision==%s\n' "${TORCH_VERSION}" "${TORCHVISION_VERSION}" > /tmp/constraints.txt
COPY pyproject.toml ./
COPY deploy/requirements.py deploy/requirements.py
RUN python deploy/requirements.py pyproject.toml --extras gcp > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt -c /tmp/constraints.txt \
    && rm /tmp/requirements.txt /tmp/constraints.txt

# A non-root user; its home holds the cache of models downloaded from GCS (FER_CACHE_DIR).
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin app

# The source (run from /srv, not installed, so settings.BUNDLED_MODEL resolves to
# /srv/models/fer-compact.pt) and the bundled model: served when MODEL_URI is unset, and the
# fallback when FALLBACK_TO_BUNDLED=true.
COPY fercore ./fercore
COPY app ./app
COPY models ./models

# Numeric, so a platform that enforces non-root (runAsNonRoot) can check it.
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["python", "-m", "app.serve"]
