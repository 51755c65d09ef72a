"""Per-request dependencies. Tests override them with ``app.dependency_overrides``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from opentelemetry.trace import Tracer

from app.concurrency import InferenceLimiter
from app.errors import ModelNotReady
from app.faces import FaceDetector
from app.metrics import Metrics
from app.model import Predictor
from app.settings import Settings


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_predictor(request: Request) -> Predictor:
    predictor: Predictor | None = request.app.state.predictor
    if predictor is None:
        raise ModelNotReady()
    return predictor


def get_detector(request: Request) -> FaceDetector:
    detector: FaceDetector | None = request.app.state.detector
    if detector is None:  # only before the lifespan has run
        raise ModelNotReady()
    return detector


def get_limiter(request: Request) -> InferenceLimiter:
    limiter: InferenceLimiter | None = request.app.state.limiter
    if limiter is None:  # only before the lifespan has run
        raise ModelNotReady()
    return limiter


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


def get_tracer(request: Request) -> Tracer:
    """The app's tracer: a no-op one when tracing is off."""
    tracer: Tracer = request.app.state.tracing.tracer
    return tracer


SettingsDep = Annotated[Settings, Depends(get_settings)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]
DetectorDep = Annotated[FaceDetector, Depends(get_detector)]
LimiterDep = Annotated[InferenceLimiter, Depends(get_limiter)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
TracerDep = Annotated[Tracer, Depends(get_tracer)]
