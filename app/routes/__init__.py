"""One router per resource."""

from app.routes import health, metrics, model, predict

__all__ = ["health", "metrics", "model", "predict"]
