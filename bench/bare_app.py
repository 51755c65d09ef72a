"""The floor for ``bench.serving``: a bare FastAPI endpoint that reads and decodes an upload as the
service does (:func:`app.images.decode_image`) and classifies nothing. Its route is ``async def``:
the floor is what FastAPI and uvicorn cost, with no thread hop.

    uvicorn --factory bench.bare_app:create_app
"""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, File, UploadFile

from app.images import decode_image

MAX_PIXELS = 40_000_000  # the service's default MAX_IMAGE_PIXELS


def create_app() -> FastAPI:
    app = FastAPI()

    @app.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ok"}

    # async, like the service's routes: a plain ``def`` would run in the threadpool, a thread hop
    # the service's own crop path does not pay, and the floor would be higher than the real one.
    # The decode runs on the event loop: a 48x48 crop's takes microseconds.
    @app.post("/predict")
    async def predict(file: Annotated[UploadFile, File()]) -> dict[str, object]:
        image = decode_image(await file.read(), MAX_PIXELS)
        return {"faces": [], "size": list(image.size)}

    return app
