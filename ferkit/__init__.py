"""ferkit: facial expressions from Python and the command line (``fer-analyze``), on photos,
folders and videos, with the service's own pipeline and model; no server, no PyTorch.

    >>> import ferkit
    >>> faces = ferkit.analyze("photo.jpg")  # a path, bytes, a PIL image or a numpy array
    >>> faces[0].emotion, faces[0].confidence, faces[0].box
    ('happy', 0.93, (257, 59, 161, 161))

The faces are :class:`app.schemas.Face`, the ones ``POST /predict`` answers (``.model_dump()``
for dicts). :class:`Analyzer` holds a model for many calls (``Analyzer("runs/")`` for another
model), :func:`analyze_video` follows each face of a video through its frames.
"""

from app.failures import ServiceError
from app.schemas import Face, FaceTrack, PredictResponse, TrackedFace, VideoResponse
from ferkit.api import Analyzer, analyze, analyze_video

__all__ = [
    "Analyzer",
    "Face",
    "FaceTrack",
    "PredictResponse",
    "ServiceError",
    "TrackedFace",
    "VideoResponse",
    "analyze",
    "analyze_video",
]
