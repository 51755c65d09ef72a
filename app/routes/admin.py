"""Operator actions, behind ``Authorization: Bearer <ADMIN_TOKEN>``; included only when ADMIN_TOKEN is set."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import AdminDep, LoaderDep
from app.schemas import ErrorBody, ReloadResponse

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])


@router.post("/reload", response_model=ReloadResponse, responses={401: {"model": ErrorBody}})
async def reload_model(loader: LoaderDep) -> ReloadResponse:
    """Load MODEL_URI's current model (a new `latest.json`) beside the served one and swap it in.

    Nothing is loaded when `latest.json` names the model already served. A failed reload keeps
    the served model and is answered 200 with `reloaded: false` and `error` (also in `GET /model`).
    """
    outcome = await loader.reload()
    return ReloadResponse(reloaded=outcome.reloaded, version=outcome.version, error=outcome.error)
