"""The app factory. ``uvicorn app.main:app`` serves :data:`app`; tests call :func:`create_app`.

Settings are read when the app is created (an invalid value stops startup with a
:class:`~app.settings.ConfigError`); the model is loaded in the lifespan, before the first
request. A model that cannot be loaded does not crash the process: the reason is logged at
ERROR, ``/healthz`` stays 200 and ``/readyz`` answers 503, so the instance never receives
traffic and the reason stays visible in its logs.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from app import routes
from app.errors import install_error_handlers
from app.images import configure_pillow
from app.limits import MULTIPART_OVERHEAD, BodySizeLimit
from app.logs import configure_logging
from app.model import ModelLoadError, Predictor
from app.settings import Settings, load_settings

log = logging.getLogger(__name__)


def load_predictor(uri: str) -> Predictor:
    predictor = Predictor.from_uri(uri)
    predictor.warm_up()
    return predictor


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    torch.set_num_threads(settings.resolved_torch_threads())
    configure_pillow(settings.max_image_pixels)
    uri = settings.resolved_model_uri()
    try:
        predictor = await run_in_threadpool(load_predictor, uri)
    except ModelLoadError as exc:
        log.error("model not loaded, the service will not become ready: %s", exc)
    else:
        app.state.predictor = predictor
        info = predictor.info
        log.info("serving model %s (%s, sha256 %s) from %s", info.version, info.architecture, info.sha256, info.source)
    yield
    app.state.predictor = None


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app; ``settings`` defaults to the environment as it is now."""
    settings = settings or load_settings()
    app = FastAPI(
        title="FER2013 facial expression service",
        version="0.1.0",
        description="Classifies the facial expression in an image into one of the seven FER2013 emotions.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.predictor = None
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD)
    install_error_handlers(app)
    app.include_router(routes.health.router)
    app.include_router(routes.model.router)
    app.include_router(routes.predict.router)
    return app


configure_logging()
app = create_app()
