"""One router per resource."""

from app.routes import admin, health, metrics, model, predict

__all__ = ["admin", "health", "metrics", "model", "predict"]
