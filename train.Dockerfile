# The training image: CUDA PyTorch, the `train` and `tracking` extras, `python -m training.train`.
#
#   docker build -f train.Dockerfile -t fer-train .
#   docker run --gpus all fer-train --config configs/compact.yaml \
#       --data gs://BUCKET/data/fer2013.zip --output gs://BUCKET/models
#
# Arguments are those of `python -m training.train` (README, "Training"); the configs/ recipes
# are in the image. --data reads a zip, a folder or fer2013.csv from gs:// (application default
# credentials: the job's service account on Vertex AI); --output gs://BUCKET/prefix uploads the
# finished run to <prefix>/<run-id>/ and then rewrites <prefix>/latest.json, which the service
# follows. deploy/vertex-train.yaml runs it on a GPU on Vertex AI.
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONPATH=/srv

WORKDIR /srv

# Dependencies first, from pyproject.toml alone: editing the code reuses these layers. The base
# image's CUDA build of torch/torchvision is pinned as a constraint, so nothing replaces it.
COPY pyproject.toml ./
COPY deploy/requirements.py deploy/requirements.py
RUN python -c "import torch, torchvision; print(f'torch=={torch.__version__}'); print(f'torchvision=={torchvision.__version__}')" \
        > /tmp/constraints.txt \
    && python deploy/requirements.py pyproject.toml --extras train,tracking > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt -c /tmp/constraints.txt \
    && rm /tmp/requirements.txt /tmp/constraints.txt

# A non-root user; its home holds the dataset and download cache (FER_CACHE_DIR).
RUN groupadd --gid 10001 trainer \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin trainer

COPY fercore ./fercore
COPY training ./training
COPY configs ./configs

# Numeric, so a platform that enforces non-root (runAsNonRoot) can check it.
USER 10001:10001
ENTRYPOINT ["python", "-m", "training.train"]
