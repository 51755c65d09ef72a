"""The loaded model's identity."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import LoaderDep, PredictorDep
from app.schemas import ErrorBody, ModelDetails

router = APIRouter(tags=["model"])


@router.get("/model", response_model=ModelDetails, responses={503: {"model": ErrorBody}})
async def get_model(predictor: PredictorDep, loader: LoaderDep) -> ModelDetails:
    """Run id, source, sha256, classes, metrics and load time of the served model; whether it is
    the bundled fallback, and how the last reload went."""
    return ModelDetails.from_info(predictor.info, loader.last_reload_at, loader.last_reload_error)
