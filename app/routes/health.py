"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import PredictorDep
from app.schemas import ErrorBody, Status

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Status)
async def check_health() -> Status:
    """The process is up (liveness). Always 200, model or not."""
    return Status(status="ok")


@router.get("/readyz", response_model=Status, responses={503: {"model": ErrorBody}})
async def check_ready(predictor: PredictorDep) -> Status:
    """A model is loaded and warmed up (readiness); 503 until then, or for good if loading failed."""
    return Status(status="ready")
