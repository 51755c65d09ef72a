"""Response bodies. Separate from the internal objects (:class:`app.model.ModelInfo`) on purpose:
the API stays the same when the internals move."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.model import ModelInfo


class Status(BaseModel):
    status: str = Field(examples=["ok"])


class ErrorBody(BaseModel):
    detail: str = Field(examples=["empty file"])


class Explanation(BaseModel):
    """Where the model looked for one face: occlusion sensitivity (see ``app.explain``)."""

    method: str = Field(examples=["occlusion"], description="`occlusion`: patches of the model input hidden one at a time")
    emotion: str = Field(examples=["happy"], description="the class explained: the face's predicted emotion")
    png: str = Field(
        description="base64 RGBA PNG of the face crop's size: colour and opacity grow with the share of `emotion`'s probability"
        " lost when that region is hidden, relative to `max_drop`",
    )
    box: tuple[int, int, int, int] = Field(
        description="x, y, width, height in the image of the crop the heatmap covers: the face box plus a margin, or,"
        " for a face turned upright by its eyes (FACE_ALIGN), the square of that crop around its centre (the heatmap is"
        " in the upright face's frame)"
    )
    forward_passes: int = Field(examples=[37], description="model inputs evaluated for this face, in one batched pass")
    max_drop: float = Field(
        ge=0.0,
        le=1.0,
        examples=[0.16],
        description="share of `emotion`'s probability lost when the most telling region is hidden; the PNG is scaled so that"
        " region is fully hot (unless under 0.01: then the map stays faint)",
    )


class Face(BaseModel):
    box: tuple[int, int, int, int] = Field(
        description="x, y, width, height in pixels of the upright image: the detected face, or the whole image with detect=false"
    )
    emotion: str = Field(examples=["happy"])
    confidence: float = Field(ge=0.0, le=1.0, description="probability of `emotion`")
    scores: dict[str, float] = Field(description="probability per class, in the model's class order")
    landmarks: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="the face's keypoints, x and y in pixels of the upright image (a face cut by the border may have"
        " some just outside it): `right_eye`, `left_eye` (the person's own right and left: the right eye is on the"
        " image's left for a face towards the camera), `nose_tip`, `mouth`, `right_ear`, `left_ear`;"
        " empty with detect=false",
        examples=[
            {
                "right_eye": [205.4, 102.3],
                "left_eye": [246.9, 105.1],
                "nose_tip": [224.6, 127.9],
                "mouth": [223.4, 147.4],
                "right_ear": [182.3, 109.8],
                "left_ear": [271.2, 115.2],
            }
        ],
    )
    explanation: Explanation | None = Field(
        default=None,
        description="where the model looked, with `explain=true` (at most 4 faces per request, the largest; null for the others"
        " and without `explain`)",
    )


class TrackedFace(Face):
    """A face in one sampled frame of a video, with the track it belongs to (app.tracking)."""

    track_id: int = Field(ge=1, description="the face's track: the same id for the same face from frame to frame")
    frame: int = Field(ge=0, description="the frame's index among the video's decoded frames")
    time_s: float = Field(ge=0.0, description="the frame's time, seconds from the video's first frame")
    smoothed_emotion: str = Field(examples=["happy"], description="the top class of `smoothed_scores`")
    smoothed_scores: dict[str, float] = Field(
        description="the track's scores smoothed over time: an exponential moving average of its faces' scores, time"
        " constant 0.5 s (weight 1 - exp(-dt / 0.5 s) for a face dt seconds after the track's previous one)"
    )


class FaceTrack(BaseModel):
    """One face followed through a video."""

    id: int = Field(ge=1)
    first_s: float = Field(description="time of its first frame, s")
    last_s: float = Field(description="time of its last frame, s")
    faces: list[TrackedFace] = Field(description="the face in each sampled frame it was found in, in time order")


class VideoSummary(BaseModel):
    width: int = Field(description="frame width, pixels")
    height: int = Field(description="frame height, pixels")
    duration_s: float = Field(description="time of the last decoded frame, s")
    sample_fps: float | None = Field(description="frames analysed per second of video (null: every frame)")
    frames_analysed: int


class ModelRef(BaseModel):
    """Which model answered a prediction."""

    version: str
    architecture: str
    sha256: str

    @classmethod
    def from_info(cls, info: ModelInfo) -> ModelRef:
        return cls(version=info.version, architecture=info.architecture, sha256=info.sha256)


class PredictResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    faces: list[Face]
    model: ModelRef


class VideoResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    video: VideoSummary
    tracks: list[FaceTrack] = Field(description="one per face followed, by id (the order faces first appeared in)")
    model: ModelRef


class FileError(BaseModel):
    """Why one file of a batch got no faces: the status and detail ``POST /predict`` would answer."""

    status: int = Field(examples=[415])
    detail: str = Field(examples=["unsupported image format"])


class FileFaces(BaseModel):
    filename: str | None = Field(description="the file name the client sent, if any", examples=["team.jpg"])
    faces: list[Face]


class FileFailure(BaseModel):
    filename: str | None = Field(description="the file name the client sent, if any", examples=["notes.txt"])
    error: FileError


class BatchResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    results: list[FileFaces | FileFailure] = Field(description="one per uploaded file, in upload order")
    model: ModelRef


class ModelDetails(BaseModel):
    """``GET /model``: the loaded model and where it came from."""

    version: str
    run_id: str
    source: str
    sha256: str
    architecture: str
    precision: str = Field(default="", description="of the served ONNX graph: `fp32` or `int8`", examples=["int8"])
    classes: list[str]
    metrics: dict[str, Any]
    preprocessing: dict[str, Any]
    created_at: str
    code_version: str
    loaded_at: str
    fallback: bool = Field(
        default=False, description="true: the bundled model, served because MODEL_URI's failed to load (FALLBACK_TO_BUNDLED)"
    )
    fallback_error: str | None = Field(default=None, description="why MODEL_URI's model failed to load, when `fallback`")
    last_reload_at: str | None = Field(default=None, description="when the last reload check ended (null: none yet)")
    last_reload_error: str | None = Field(
        default=None, description="why the last reload failed (the model above is still served); null if it did not fail"
    )

    @classmethod
    def from_info(cls, info: ModelInfo, last_reload_at: str | None = None, last_reload_error: str | None = None) -> ModelDetails:
        return cls(
            version=info.version,
            run_id=info.run_id,
            source=info.source,
            sha256=info.sha256,
            architecture=info.architecture,
            precision=info.precision,
            classes=list(info.classes),
            metrics=dict(info.metrics),
            preprocessing=dict(info.preprocessing),
            created_at=info.created_at,
            code_version=info.code_version,
            loaded_at=info.loaded_at,
            fallback=info.fallback,
            fallback_error=info.fallback_error or None,
            last_reload_at=last_reload_at,
            last_reload_error=last_reload_error,
        )


class ReloadResponse(BaseModel):
    """``POST /admin/reload``: whether another model is now served."""

    reloaded: bool = Field(description="false: nothing new to load, or the reload failed (see `error`)")
    version: str | None = Field(description="the version served now (null: no model is)", examples=["20250101-120000"])
    error: str | None = Field(default=None, description="why the reload failed; the previous model is still served")
