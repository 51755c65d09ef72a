# The service image: the FastAPI app on ONNX Runtime; no PyTorch, no training dependencies.
#
#   docker build -f api.Dockerfile -t fer-api .
#   docker run --rm -p 8080:8080 fer-api                                   # the bundled model
#   docker run --rm -p 8080:8080 -e MODEL_URI=gs://BUCKET/models fer-api   # latest.json in GCS
#
# Listens on $PORT (Cloud Run sets it; 8080 otherwise). Configuration is the environment
# variables of app/settings.py (README, "The service"). No HEALTHCHECK: Cloud Run ignores it and
# uses the startup (/readyz) and liveness (/healthz) probes that cloudbuild.yaml deploys with.
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONPATH=/srv \
    PORT=8080

WORKDIR /srv

# Dependencies first, from the lock alone: editing the code reuses this layer. Every package at
# the version and sha256 of requirements/api.txt (`make lock`: the dependencies and the `gcp`
# extra, the Cloud Trace exporter); pip check proves the result consistent. Then, in the same
# layer (a later one could not make it smaller), what the service never imports: the packages'
# own test suites and ONNX Runtime's model tools (quantisation, transformer optimisers), about
# 30 MB with their bytecode; the bytecode of everything else stays, or every start compiles it.
COPY requirements/api.txt requirements/api.txt
RUN pip install --no-cache-dir --require-hashes -r requirements/api.txt \
    && pip check \
    && site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
    && find "$site" -depth -type d -name tests -prune -exec rm -rf {} + \
    && rm -rf "$site/onnxruntime/tools" "$site/onnxruntime/transformers" "$site/onnxruntime/quantization" \
    && python -c 'import av, fastapi, numpy, onnxruntime, PIL, uvicorn'

# A non-root user; its home holds the cache of models downloaded from GCS (FER_CACHE_DIR).
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin app

# The source (run from /srv, not installed, so settings.BUNDLED_MODEL resolves to
# /srv/models/fer-compact.int8.onnx) and the bundled model: served when MODEL_URI is unset, and
# the fallback when FALLBACK_TO_BUNDLED=true. Only its served ONNX file: the checkpoint and the
# fp32 export are for training.
COPY fercore ./fercore
COPY app ./app
COPY models/fer-compact.int8.onnx models/MODEL_CARD.md ./models/

# glibc's malloc, told to give large blocks back: a decoded photo is tens of MB, allocated and freed
# per request from many threads. By default each thread gets its own arena and the mmap threshold
# rises to the largest block freed, so freed images stay in the heap and the resident set only grows
# (under --memory 512m the soak's 36-megapixel PNGs had it OOM-killed; with these, its peak was
# 317 MiB: bench/results/container-without-malloc-tuning.json, bench/results/container.json).
ENV MALLOC_ARENA_MAX=2 \
    MALLOC_MMAP_THRESHOLD_=1048576 \
    MALLOC_TRIM_THRESHOLD_=1048576

# Numeric, so a platform that enforces non-root (runAsNonRoot) can check it.
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["python", "-m", "app.serve"]
