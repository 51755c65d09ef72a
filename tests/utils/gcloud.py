"""Checks gcloud command lines against the real installed Google Cloud CLI, without credentials.

gcloud parses a command line (the command groups, every flag and its value type, files named by
``--*-from-file`` flags) before it looks for an account. In a fresh, empty configuration folder,
a command line it accepts therefore fails with "You do not currently have an active account
selected", and one it does not accept fails with a usage error (``Invalid choice``,
``unrecognized arguments``, ...; exit status 2). Nothing reaches Google: there is no account to
send anything with. What the files hold is not checked here (gcloud sends them to the API as they
are); tests/test_monitoring.py parses them with Google's own types.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

NO_ACCOUNT = "You do not currently have an active account selected"


def real_gcloud() -> str | None:
    """The installed ``gcloud`` (e.g. Debian's ``google-cloud-cli``), or None."""
    return shutil.which("gcloud")


def shape(argv: Sequence[str]) -> tuple[str, ...]:
    """``argv`` with the flags' values left out: two command lines of one shape parse alike."""
    return tuple(arg.split("=", 1)[0] if arg.startswith("--") else arg for arg in argv)


def usage_error(gcloud: str, argv: Sequence[str], config_dir: str) -> str | None:
    """None when gcloud accepts ``argv`` (the arguments after ``gcloud``), else what it said."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": config_dir,
        "CLOUDSDK_CONFIG": config_dir,  # no account, no project, no cached credentials
        "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
        "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "1",
        "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "1",
    }
    result = subprocess.run([gcloud, *argv], env=env, capture_output=True, text=True, timeout=120)
    if result.returncode == 1 and NO_ACCOUNT in result.stderr:
        return None
    return f"gcloud {' '.join(argv)}: exit {result.returncode}\n{result.stderr.strip()}"


def usage_errors(gcloud: str, commands: Iterable[Sequence[str]]) -> list[str]:
    """gcloud's complaint about each command line it does not accept, one per shape; each argv
    starts after ``gcloud``. Two at a time: each gcloud start takes a second of CPU."""
    unique = list({shape(argv): list(argv) for argv in commands}.values())
    with tempfile.TemporaryDirectory() as config_dir, ThreadPoolExecutor(max_workers=2) as pool:
        found = pool.map(lambda argv: usage_error(gcloud, argv, config_dir), unique)
        return [error for error in found if error is not None]
