"""The service's metrics for Prometheus to scrape."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client.exposition import choose_encoder

from app.deps import MetricsDep

router = APIRouter(tags=["metrics"])


# Both bodies choose_encoder may answer with, so a scraper's Accept never gets an undocumented type.
_CONTENT: dict[str, dict[str, object]] = {"text/plain": {}, "application/openmetrics-text": {}}


@router.get("/metrics", response_class=Response, responses={200: {"content": _CONTENT}})
async def get_metrics(request: Request, metrics: MetricsDep) -> Response:
    """Prometheus text format (OpenMetrics when the scraper asks for it): requests, latencies, queue
    wait and inference time, batch sizes, faces per image, predictions by emotion, the served model."""
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(metrics.registry), media_type=content_type)
