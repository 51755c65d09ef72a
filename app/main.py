"""The app factory: :func:`create_app` builds an app and changes nothing process-wide (tests call it);
:func:`serve_app` is what the entry points run (``python -m app.serve``, the image's and ``make
serve``'s, or ``uvicorn --factory app.main:serve_app``): it configures the process once (JSON
logging, Pillow's decompression-bomb limit), then builds the app from the environment.

Settings are read when the app is created (an invalid value stops startup with a
:class:`~app.settings.ConfigError`); the model is loaded in the lifespan, before the first
request. A model that cannot be loaded does not crash the process: the reason is logged at
ERROR, ``/healthz`` stays 200 and ``/readyz`` answers 503, so the instance never receives
traffic and the reason stays visible in its logs (unless ``FALLBACK_TO_BUNDLED`` asks for the
bundled model instead). Transient GCS failures are retried first, and the model can be replaced
while serving: see :mod:`app.loader`. The face detector ships inside the service (app/assets),
so failing to load it is a broken install and does stop startup.

Observability: Prometheus metrics at ``/metrics`` (:mod:`app.metrics`), one JSON access-log line
per request (:mod:`app.access`, :mod:`app.logs`), and OpenTelemetry traces when the ``OTEL_*``
variables ask for them (:mod:`app.tracing`). Metrics and the tracer provider belong to the app,
not the process.

``/docs`` (Swagger UI) and ``/redoc`` are served from assets installed with the
``fastapi-offline`` package, not from a CDN: they work where the service has no internet.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from app import routes
from app.access import RequestTelemetry
from app.analysis import detector_config
from app.batching import MicroBatcher
from app.concurrency import InferenceLimiter, RefuseWhenFull
from app.errors import install_error_handlers
from app.faces import FaceDetector
from app.images import configure_pillow
from app.limits import MULTIPART_OVERHEAD, BodySizeLimit
from app.loader import ModelLoader
from app.logs import configure_logging
from app.metrics import Metrics
from app.settings import Settings, load_settings
from app.tracing import Tracing

VERSION = "0.1.0"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    tracing: Tracing = app.state.tracing
    threads = settings.resolved_inference_threads()
    slots = settings.resolved_max_concurrent_inferences()
    app.state.limiter = InferenceLimiter(slots, settings.max_queue, metrics)
    app.state.detector = await run_in_threadpool(FaceDetector, detector_config(settings), threads=threads)
    # Created here, not in create_app: its lock and task belong to this event loop.
    app.state.loader = loader = ModelLoader(app.state, settings, metrics, tracing.tracer)
    await loader.load_at_startup()
    tracing.start()
    loader.start()  # periodic reload checks, if RELOAD_INTERVAL_S asks for them
    if settings.batching:  # else each request classifies its faces in its own inference slot
        app.state.batcher = MicroBatcher(settings.batch_max_size, settings.batch_max_wait_ms / 1000, metrics, tracing.tracer)
        app.state.batcher.start()
    try:
        yield
    finally:
        await loader.stop()
        if app.state.batcher is not None:
            await app.state.batcher.stop()  # after the server's last request: nothing is left queued
            app.state.batcher = None
        app.state.loader = None
        app.state.predictor = None
        app.state.detector = None
        app.state.limiter = None
        tracing.shutdown()  # sends the spans still buffered


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app; ``settings`` defaults to the environment as it is now."""
    settings = settings or load_settings()
    app = FastAPIOffline(
        title="FER2013 facial expression service",
        version=VERSION,
        description="Finds the faces in an image and classifies the expression of each into one of the seven FER2013 emotions.",
        lifespan=lifespan,
        # Else Swagger UI, served from any host but localhost, shows a badge from validator.swagger.io.
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.settings = settings
    app.state.predictor = None
    app.state.loader = None
    app.state.detector = None
    app.state.limiter = None
    app.state.batcher = None
    app.state.metrics = metrics = Metrics()
    app.state.tracing = tracing = Tracing(settings, service_version=VERSION)
    per_file = settings.max_upload_bytes + MULTIPART_OVERHEAD
    app.add_middleware(
        BodySizeLimit,
        max_body_bytes=per_file,
        path_limits={
            "/predict/batch": settings.max_batch_files * per_file,
            "/predict/video": settings.max_video_upload_bytes + MULTIPART_OVERHEAD,
        },
    )
    # Before the body limit reads anything.
    app.add_middleware(RefuseWhenFull, paths=("/predict", "/predict/batch", "/predict/video"))
    app.add_middleware(RequestTelemetry, metrics=metrics)  # added last: outside the body limit, sees its 413s
    install_error_handlers(app)
    app.include_router(routes.health.router)
    app.include_router(routes.model.router)
    app.include_router(routes.predict.router)
    app.include_router(routes.metrics.router)
    app.include_router(routes.page.router)  # GET /: the page people use (app/static/)
    if settings.admin_token is not None:  # no token, no admin endpoint: a 404, and absent from /docs
        app.include_router(routes.admin.router)
    tracing.instrument(app)  # around the whole stack: the request span is current in every middleware
    return app


def serve_app() -> FastAPI:
    """The served app: the process configured once, then :func:`create_app` from the environment.

    Process-wide, so here and not in :func:`create_app`: JSON logs for Cloud Logging, and Pillow's
    own decompression-bomb guard set to MAX_IMAGE_PIXELS (:func:`app.images.decode_image` checks
    the limit itself too, so an app built without this refuses the same images).
    """
    configure_logging()
    settings = load_settings()
    configure_pillow(settings.max_image_pixels)
    return create_app(settings)
