# PLACEHOLDER until the delivery issue: the service image (CPU-only PyTorch, no training deps).
# Not yet built or linted in CI.
FROM python:3.11-slim
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PORT=8080
WORKDIR /srv
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch>=2.4" "torchvision>=0.19"
COPY pyproject.toml README.md ./
COPY fercore ./fercore
COPY app ./app
COPY models ./models
RUN pip install --no-cache-dir . && useradd --uid 10001 --create-home app
USER app
CMD ["sh", "-c", "exec uvicorn app.main:app --host 0.0.0.0 --port ${PORT}"]
