"""Service configuration: one settings object read from environment variables.

Cloud Run passes configuration as env vars; an invalid value stops startup with a message
that names the variable and says what is wrong with it.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

import app
from fercore.cpus import available_cpus

# The model shipped inside the service image, used when MODEL_URI is unset: the int8 ONNX export of
# models/fer-compact.pt (models/MODEL_CARD.md).
BUNDLED_MODEL = Path(app.__file__).resolve().parent.parent / "models" / "fer-compact.int8.onnx"


# Values of OTEL_TRACES_EXPORTER the service understands (app.tracing builds them).
TRACE_EXPORTERS = ("otlp", "gcp_trace", "console", "none")
OTLP_PROTOCOL = "http/protobuf"

# Settings whose value is never echoed, not even in the message that rejects it.
SECRETS = frozenset({"admin_token"})
MIN_ADMIN_TOKEN_CHARS = 16


class ConfigError(ValueError):
    """An environment variable has a value the service cannot run with."""


class Settings(BaseSettings):
    """Read from the environment (no prefix, case-insensitive): ``MODEL_URI``, ``MAX_UPLOAD_BYTES``,
    ``MAX_IMAGE_PIXELS``, ``INFERENCE_THREADS``, ``MAX_BATCH_FILES``, ``MAX_CONCURRENT_INFERENCES``,
    ``MAX_QUEUE``, ``BATCH_MAX_SIZE``, ``BATCH_MAX_WAIT_MS``, the video bounds (``MAX_VIDEO_UPLOAD_BYTES``,
    ``MAX_VIDEO_DURATION_S``, ``MAX_VIDEO_FRAMES``, ``MAX_VIDEO_FRAME_PIXELS``), the face detector's
    (``FACE_SCORE_THRESHOLD``, ``FACE_NMS_IOU``, ``FACE_DETECT_MAX_SIDE``, ``FACE_ALIGN``,
    ``FACE_DETECT_GRID``), the model loading and
    reloading variables (``MODEL_LOAD_RETRIES``, ``MODEL_LOAD_BACKOFF_S``, ``GCS_TIMEOUT_S``,
    ``FALLBACK_TO_BUNDLED``, ``BUNDLED_MODEL_PATH``, ``RELOAD_INTERVAL_S``, ``ADMIN_TOKEN``), the
    ``OTEL_*`` variables that turn tracing on (see :mod:`app.tracing`), and ``PORT`` and
    ``SHUTDOWN_TIMEOUT_S`` for :mod:`app.serve`."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, env_ignore_empty=True, extra="ignore")

    # The port ``python -m app.serve`` (the service image's entry point) listens on; Cloud Run sets
    # PORT; ``make serve`` passes its own PORT.
    port: int = Field(default=8080, ge=1, le=65535)
    # Seconds ``python -m app.serve`` lets in-flight requests finish after SIGTERM (it stops accepting
    # connections at once); then they are cancelled and the process exits. Cloud Run sends SIGKILL
    # 10 s after SIGTERM: the default leaves 2 s for the rest of the shutdown.
    shutdown_timeout_s: int = Field(default=8, ge=0, le=3600)

    # A local ONNX model file, a local folder holding latest.json, or gs://bucket/prefix (a
    # folder with latest.json) or gs://bucket/path.onnx. Unset: the bundled model.
    model_uri: str | None = None
    # Largest accepted upload (the image file itself), in bytes.
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    # Largest accepted image, in pixels (width * height), checked before decoding (half for 32-bit samples: app.images).
    max_image_pixels: int = Field(default=40_000_000, gt=0)
    # ONNX Runtime intra-op threads of a forward pass; 0: one per CPU this process may use (affinity, cgroup quota).
    inference_threads: int = Field(default=0, ge=0, le=1024)
    # Most files in one ``POST /predict/batch`` request (Starlette's parser stops at 1000 parts).
    max_batch_files: int = Field(default=16, ge=1, le=1000)
    # Inferences (decode + detect + classify) running at once; 0 means one per CPU.
    max_concurrent_inferences: int = Field(default=0, ge=0, le=1024)
    # Requests allowed to wait for an inference slot; beyond that they get 503 at once.
    max_queue: int = Field(default=64, ge=0, le=100_000)
    # Micro-batching (app.batching): the faces of concurrent requests classified in one forward pass
    # of at most BATCH_MAX_SIZE faces; 1 turns it off (each request runs its own pass in its slot).
    # On by default: see bench/results/serving.json for what it gives.
    batch_max_size: int = Field(default=32, ge=1, le=1024)
    # Longest the oldest face of a batch waits for others to join it, in ms; 0: only the faces that
    # queued while the previous pass ran are batched, a lone request never waits. A wait adds up to
    # itself to every request's latency at low load, for little more throughput under load.
    batch_max_wait_ms: float = Field(default=0.0, ge=0, le=1000)

    # POST /predict/video (app.video): the largest upload, in bytes (30 MiB: with the multipart
    # envelope, under Cloud Run's 32 MiB request limit); the longest video, in seconds (its header's
    # duration and its frames' timestamps); the most frames analysed (at the request's fps); the
    # largest frame, in pixels, checked from the stream's header before decoding (default: 4K UHD).
    max_video_upload_bytes: int = Field(default=30 * 1024 * 1024, gt=0)
    max_video_duration_s: float = Field(default=60.0, gt=0, le=3600)
    max_video_frames: int = Field(default=600, ge=1, le=100_000)
    max_video_frame_pixels: int = Field(default=3840 * 2160, gt=0)

    # Face detection (app.faces, docs/faces.md): BlazeFace full-range on ONNX Runtime.
    # Lowest detection score (0-1) a face is reported with: lower finds more faces (smaller,
    # blurrier, more turned away) and more false ones; 0.5 is MediaPipe's own default.
    face_score_threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    # Overlap (intersection over union) above which two detections are one face, merged by weighted
    # non-maximum suppression; MediaPipe uses 0.3. Higher keeps more of two faces that overlap.
    face_nms_iou: float = Field(default=0.3, gt=0.0, lt=1.0)
    # Longer side, in pixels, of the image detection works at: a JPEG larger than this is decoded
    # at 1/2, 1/4 or 1/8 size (no smaller than this), and faces under 48 px at this size are not
    # reported. At least the model's 192-px input.
    face_detect_max_side: int = Field(default=1024, ge=192, le=8192)
    # Turn each face so its eyes are level and frame it as FER2013 does before classifying it;
    # false: the detector's box with a 10% margin (bench/results/alignment.md).
    face_align: bool = True
    # Also look at large photos (shorter side 768 px or more at FACE_DETECT_MAX_SIDE) in a grid of
    # squares (app.faces.windows): finds the small faces of a crowd, at 13 model runs instead of one;
    # false: one run, faces under ~1/16 of the photo's shorter side are missed.
    face_detect_grid: bool = True

    # Loading the model (app.reload). A transient failure at startup (GCS unreachable or slow, a
    # 5xx) is retried this many times, waiting MODEL_LOAD_BACKOFF_S, then twice that, and so on;
    # a corrupt or mismatching model is refused at once.
    model_load_retries: int = Field(default=3, ge=0, le=20)
    model_load_backoff_s: float = Field(default=1.0, ge=0, le=300)
    # Seconds one request to GCS may take to connect or to send its next bytes (not the whole
    # download); the client's own retries are off, the loader above does them.
    gcs_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    # When MODEL_URI's model cannot be loaded: serve the bundled model (GET /model says so, and
    # why) rather than stay unready.
    fallback_to_bundled: bool = False
    # The model shipped inside the service image: served when MODEL_URI is unset, and the fallback.
    bundled_model_path: Path = BUNDLED_MODEL
    # Seconds between checks of MODEL_URI for a new model (a new latest.json); 0: never.
    reload_interval_s: float = Field(default=0.0, ge=0, le=86_400)
    # Bearer token of POST /admin/reload; no default: unset, the admin endpoint does not exist (404).
    admin_token: SecretStr | None = None

    # Tracing (app.tracing): the standard OpenTelemetry variables. Only those that decide whether
    # and where spans go are read here, to be checked at startup; the SDK reads the rest itself
    # (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_EXPORTER_OTLP_HEADERS, OTEL_TRACES_SAMPLER...).
    # Comma-separated exporters: otlp, gcp_trace, console, none. Unset: otlp if an OTLP endpoint
    # is set, else none (tracing off).
    otel_traces_exporter: str | None = None
    otel_exporter_otlp_endpoint: str | None = None
    otel_exporter_otlp_traces_endpoint: str | None = None
    # OTLP is sent over HTTP with protobuf bodies, the only protocol the service ships.
    otel_exporter_otlp_protocol: str | None = None
    otel_exporter_otlp_traces_protocol: str | None = None
    otel_sdk_disabled: bool = False
    # The Google Cloud project for Cloud Trace (gcp_trace); unset: the credentials' project.
    google_cloud_project: str | None = None

    @field_validator("model_uri")
    @classmethod
    def _check_model_uri(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not value:
            return None
        if "://" in value and not value.startswith("gs://"):
            raise ValueError("must be a local path or gs://bucket/path")
        if value.startswith("gs://") and not value[len("gs://") :].split("/", 1)[0]:
            raise ValueError("gs:// URI has no bucket")
        return value

    @field_validator("admin_token", mode="before")
    @classmethod
    def _check_admin_token(cls, value: object) -> object:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if not isinstance(value, str):
            return value
        value = value.strip()  # a secret mounted from a file often ends with a newline
        if not value:
            return None
        if len(value) < MIN_ADMIN_TOKEN_CHARS:
            # A guessable token is worse than none: reject it rather than serve a weak admin endpoint.
            raise ValueError(f"must be at least {MIN_ADMIN_TOKEN_CHARS} characters (e.g. `openssl rand -hex 32`)")
        return value

    @field_validator("otel_traces_exporter")
    @classmethod
    def _check_traces_exporter(cls, value: str | None) -> str | None:
        if value is None:
            return None
        names = [name.strip().lower() for name in value.split(",") if name.strip()]
        unknown = [name for name in names if name not in TRACE_EXPORTERS]
        if unknown:
            raise ValueError(f"unknown exporter {', '.join(unknown)}; choose from {', '.join(TRACE_EXPORTERS)}")
        return ",".join(names) or None

    @field_validator("otel_exporter_otlp_protocol", "otel_exporter_otlp_traces_protocol")
    @classmethod
    def _check_otlp_protocol(cls, value: str | None) -> str | None:
        if value is not None and value.strip().lower() not in ("", OTLP_PROTOCOL):
            raise ValueError(f"only {OTLP_PROTOCOL} is supported (OTLP over HTTP)")
        return value

    def resolved_model_uri(self) -> str:
        """``MODEL_URI``, or the bundled model's path when it is unset."""
        return self.model_uri or str(self.bundled_model_path)

    def resolved_inference_threads(self) -> int:
        return self.inference_threads or available_cpus()

    def resolved_max_concurrent_inferences(self) -> int:
        return self.max_concurrent_inferences or available_cpus()

    @property
    def batching(self) -> bool:
        """Whether the faces of concurrent requests are micro-batched (``BATCH_MAX_SIZE`` over 1)."""
        return self.batch_max_size > 1

    def resolved_trace_exporters(self) -> tuple[str, ...]:
        """Where spans are sent; empty when tracing is off, the default when no variable asks for it."""
        if self.otel_sdk_disabled:
            return ()
        if self.otel_traces_exporter is None:
            return ("otlp",) if self.otel_exporter_otlp_endpoint or self.otel_exporter_otlp_traces_endpoint else ()
        return tuple(name for name in self.otel_traces_exporter.split(",") if name != "none")


def load_settings() -> Settings:
    """Read the environment now; raise :class:`ConfigError` naming each bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "settings"
            shown = "<hidden>" if field in SECRETS else repr(err.get("input"))
            problems.append(f"{field.upper()}={shown}: {err['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
