"""Service configuration: one settings object read from environment variables.

Cloud Run passes configuration as env vars; an invalid value stops startup with a message
that names the variable and says what is wrong with it.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

import app

# The model shipped inside the service image, used when MODEL_URI is unset.
BUNDLED_MODEL = Path(app.__file__).resolve().parent.parent / "models" / "fer-compact.pt"


class ConfigError(ValueError):
    """An environment variable has a value the service cannot run with."""


class Settings(BaseSettings):
    """Read from the environment (no prefix, case-insensitive): ``MODEL_URI``, ``MAX_UPLOAD_BYTES``,
    ``MAX_IMAGE_PIXELS``, ``TORCH_THREADS``."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, env_ignore_empty=True, extra="ignore")

    # A local checkpoint file, a local folder holding latest.json, or gs://bucket/prefix (a
    # folder with latest.json) or gs://bucket/path.pt. Unset: the bundled model.
    model_uri: str | None = None
    # Largest accepted upload (the image file itself), in bytes.
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    # Largest accepted image, in pixels (width * height), checked before decoding.
    max_image_pixels: int = Field(default=40_000_000, gt=0)
    # Torch intra-op threads; 0 means one per CPU this process may run on.
    torch_threads: int = Field(default=0, ge=0, le=1024)

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

    def resolved_model_uri(self) -> str:
        """``MODEL_URI``, or the bundled model's path when it is unset."""
        return self.model_uri or str(BUNDLED_MODEL)

    def resolved_torch_threads(self) -> int:
        if self.torch_threads:
            return self.torch_threads
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return max(1, os.cpu_count() or 1)


def load_settings() -> Settings:
    """Read the environment now; raise :class:`ConfigError` naming each bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = str(err["loc"][0]).upper() if err["loc"] else "settings"
            problems.append(f"{name}={err.get('input')!r}: {err['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
