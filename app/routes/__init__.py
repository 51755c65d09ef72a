"""One router per resource."""

from app.routes import health, model, predict

__all__ = ["health", "model", "predict"]
