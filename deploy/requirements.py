"""Print the requirements pyproject.toml declares, one per line, for ``pip install -r``.

    python deploy/requirements.py pyproject.toml --extras gcp

What each lock in requirements/ (``make lock``) must pin: tests/test_delivery.py checks every
line printed for an image's or CI's extras against that lock, so a dependency added to
pyproject.toml without a new lock fails the tests. Extras that name the project itself
(``fer2013-mlops[train,tracking]``) are expanded. Standard library only: it runs in a bare
Python, before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib  # type: ignore[no-redef]

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: dict[str, Any], extras: Iterable[str] = ()) -> list[str]:
    """The base dependencies plus those of ``extras``, in order, without duplicates."""
    project = pyproject["project"]
    own_name = _canonical(project["name"])
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    out: list[str] = []
    seen_extras: set[str] = set()

    def add(reqs: Iterable[str]) -> None:
        for req in reqs:
            match = _NAME.match(req)
            if match and _canonical(match.group(1)) == own_name:
                expand(name.strip() for name in (match.group(2) or "").split(",") if name.strip())
            elif req not in out:
                out.append(req)

    def expand(names: Iterable[str]) -> None:
        for name in names:
            if name in seen_extras:
                continue
            if name not in optional:
                raise SystemExit(f"unknown extra {name!r}; pyproject.toml has: {', '.join(sorted(optional))}")
            seen_extras.add(name)
            add(optional[name])

    add(project.get("dependencies", []))
    expand(extras)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pyproject", type=Path, help="path of pyproject.toml")
    parser.add_argument("--extras", default="", help="comma-separated extras to add, e.g. train,tracking")
    args = parser.parse_args(argv)
    data = tomllib.loads(args.pyproject.read_text())
    extras = [name.strip() for name in args.extras.split(",") if name.strip()]
    sys.stdout.write("".join(req + "\n" for req in requirements(data, extras)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
