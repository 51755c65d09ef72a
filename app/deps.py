"""Per-request dependencies. Tests override them with ``app.dependency_overrides``.

All are ``async def``: they only read ``app.state``, and FastAPI would run a plain ``def`` dependency
in the threadpool, a thread hop per dependency per request. Few: each costs its resolution on every
request, so the prediction routes read the app's parts in one (:func:`app.routes.predict.request_pipeline`).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.errors import AdminDisabled, ModelNotReady, NotAuthenticated
from app.loader import ModelLoader
from app.metrics import Metrics
from app.model import Predictor
from app.settings import Settings


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_predictor(request: Request) -> Predictor:
    predictor: Predictor | None = request.app.state.predictor
    if predictor is None:
        raise ModelNotReady()
    return predictor


async def get_loader(request: Request) -> ModelLoader:
    loader: ModelLoader | None = request.app.state.loader
    if loader is None:  # only before the lifespan has run
        raise ModelNotReady()
    return loader


# auto_error=False: a missing or non-Bearer header comes in as None and is answered 401 below,
# with the WWW-Authenticate header, rather than FastAPI's 403.
_bearer = HTTPBearer(auto_error=False, description="ADMIN_TOKEN")


async def require_admin(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """The request carries ``Authorization: Bearer <ADMIN_TOKEN>``; 404 when no token is configured."""
    settings: Settings = request.app.state.settings
    if settings.admin_token is None:
        raise AdminDisabled()
    expected = settings.admin_token.get_secret_value().encode()
    given = credentials.credentials.encode() if credentials is not None else b""
    if not hmac.compare_digest(given, expected):  # constant time: the token cannot be guessed byte by byte
        raise NotAuthenticated()


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]
LoaderDep = Annotated[ModelLoader, Depends(get_loader)]
AdminDep = Depends(require_admin)
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
