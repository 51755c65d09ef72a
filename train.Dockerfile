# PLACEHOLDER until the delivery issue: the training image (CUDA PyTorch base).
# Not yet built or linted in CI.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /srv
COPY pyproject.toml README.md ./
COPY fercore ./fercore
COPY app ./app
COPY training ./training
COPY configs ./configs
RUN pip install --no-cache-dir ".[train]"
ENTRYPOINT ["python", "-m", "training.train"]
