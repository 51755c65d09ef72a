"""Emotion prediction for an uploaded image."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, UploadFile
from starlette.concurrency import run_in_threadpool

from app.deps import PredictorDep, SettingsDep
from app.errors import EmptyFile, PayloadTooLarge
from app.images import decode_image
from app.model import Predictor
from app.schemas import ErrorBody, Face, ModelRef, PredictResponse

router = APIRouter(tags=["predict"])

CHUNK_BYTES = 1 << 20

_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "empty file or corrupt image",
        413: "file or image too large",
        415: "unsupported image format",
        503: "model not loaded",
    }.items()
}


@router.post("/predict", response_model=PredictResponse, responses=_ERRORS)
async def predict(
    file: Annotated[UploadFile, File(description="an image: JPEG, PNG, GIF, BMP, TIFF, WebP or PPM")],
    predictor: PredictorDep,
    settings: SettingsDep,
) -> PredictResponse:
    """Classify the facial expression in an image, taken whole as one face crop."""
    data = await read_upload(file, settings.max_upload_bytes)
    # Decoding and inference are CPU-bound: off the event loop.
    faces = await run_in_threadpool(classify_image, predictor, data, settings.max_image_pixels)
    return PredictResponse(faces=faces, model=ModelRef.from_info(predictor.info))


async def read_upload(file: UploadFile, max_bytes: int) -> bytes:
    """The upload's bytes, read in chunks; stops as soon as it is known to be over ``max_bytes``."""
    if file.size is not None and file.size > max_bytes:
        raise PayloadTooLarge()
    data = bytearray()
    while chunk := await file.read(CHUNK_BYTES):
        data += chunk
        if len(data) > max_bytes:
            raise PayloadTooLarge()
    if not data:
        raise EmptyFile()
    return bytes(data)


def classify_image(predictor: Predictor, data: bytes, max_pixels: int) -> list[Face]:
    """Decode, then classify the whole image as one face (face detection will slot in here)."""
    image = decode_image(data, max_pixels)
    width, height = image.size
    prediction = predictor.predict_face(image)
    return [Face(box=(0, 0, width, height), **prediction)]
