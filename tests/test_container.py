"""The service image built and run as Cloud Run runs it (bench.container): opt-in, not part of CI's
budget. It builds api.Dockerfile with scripts/build-images-locally.sh (minutes, heavy CPU), then
runs the image under --memory 512m: PORT, non-root, the hostile corpus, a soak with large photos,
SIGTERM under load.

    FER_CONTAINER_TESTS=1 .venv/bin/pytest tests/test_container.py    # as root, podman installed
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from bench import container

OPT_IN = "FER_CONTAINER_TESTS"


def skip_reason() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed (scripts/build-images-locally.sh installs it with apt)"
    if os.geteuid() != 0:
        return "podman's chroot builds and runc need root"
    if os.environ.get(OPT_IN) != "1":
        return f"{OPT_IN}=1 runs it: it builds the service image (minutes of CPU), outside CI's budget"
    return None


@pytest.mark.slow
def test_the_image_runs_as_cloud_run_runs_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if reason := skip_reason():
        pytest.skip(reason)
    out = tmp_path / "container.json"
    status = container.main(["--soak-requests", "120", "--env", "MAX_QUEUE=8", "--output", str(out)])
    record = json.loads(out.read_text())
    checks = record["results"]["checks"]
    assert checks and all(checks.values()), checks
    assert status == 0
    image = record["results"]["image"]
    assert image["added_mb"] > 0 and image["layers"]
    assert all(row["uid"] == container.SERVICE_UID for row in record["results"]["ports"] if "uid" in row)
