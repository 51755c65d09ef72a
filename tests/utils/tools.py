"""Command-line tools the tests need from the system's packages."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(tool: str, package: str) -> str:
    """``tool``'s path. Without it the test is skipped, except in CI (``CI=true``), where .ci/run
    installs ``package`` and a missing tool fails the test: CI never skips it."""
    path = shutil.which(tool)
    if path is None:
        reason = f"{tool} ({package}) is not on PATH"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}: CI must run this test (.ci/run installs {package})", pytrace=False)
        pytest.skip(reason)
    return path
