"""One router per resource."""

from app.routes import admin, health, metrics, model, page, predict

__all__ = ["admin", "health", "metrics", "model", "page", "predict"]
