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
FROM pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime

# PIP_BREAK_SYSTEM_PACKAGES: the image is the environment, and recent PyTorch images have a
# distribution Python that refuses pip installs otherwise (PEP 668); older ones ignore it.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONPATH=/srv

WORKDIR /srv

# Dependencies first, from the lock alone: editing the code reuses these layers. Every package
# at the version and sha256 of requirements/train.txt (`make lock`: the dependencies and the
# `train` and `tracking` extras). PyTorch is the base image's CUDA build, of the version in
# requirements/torch.txt (the tag above; tests/test_delivery.py checks they agree): the lock
# leaves out torch, torchvision and their CUDA wheels, and nothing in it asks for them.
COPY requirements/train.txt requirements/train.txt
RUN pip install --no-cache-dir --require-hashes -r requirements/train.txt

# A non-root user; its home holds the dataset and download cache (FER_CACHE_DIR).
RUN groupadd --gid 10001 trainer \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin trainer

COPY fercore ./fercore
COPY training ./training
COPY configs ./configs

# Numeric, so a platform that enforces non-root (runAsNonRoot) can check it.
USER 10001:10001
ENTRYPOINT ["python", "-m", "training.train"]
