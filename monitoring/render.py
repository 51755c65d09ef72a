"""Fill in the placeholders of this folder's alert policies and dashboard for one project.

    python3 monitoring/render.py --project my-project [--service fer-api] [--channel-id 123] [--out-dir DIR]
    python3 monitoring/render.py --check --project my-project --service fer-api   # only check the names

The committed files name the Cloud Run service ``fer-api`` and notify
``projects/PROJECT_ID/notificationChannels/CHANNEL_ID``. The rendered copies name ``--service``
and notify the channel ``--channel-id`` of ``--project``, or no one without it. They are written
to ``--out-dir`` (a new temporary folder without it), whose path is printed; the committed files
stay as they are. Used by monitoring/apply.sh and deploy/setup-gcp.sh. Standard library only:
the set-up script runs it with nothing but python3 on PATH.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SERVICE = "fer-api"  # the service named in the committed files
CHANNEL = "projects/PROJECT_ID/notificationChannels/CHANNEL_ID"
# Values end up inside JSON strings and query filters: nothing that could end or widen either.
SAFE = re.compile(r"[A-Za-z0-9_.:-]*")


def render(doc: Any, service: str, channels: list[str]) -> Any:
    """``doc`` with every string's service name replaced and the notification channels set."""
    if isinstance(doc, dict):
        return {k: channels if k == "notificationChannels" else render(v, service, channels) for k, v in doc.items()}
    if isinstance(doc, list):
        return [render(item, service, channels) for item in doc]
    return doc.replace(SERVICE, service) if isinstance(doc, str) else doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", required=True)
    parser.add_argument("--service", default=SERVICE)
    parser.add_argument("--channel-id", default="", help="the notification channel's id (empty: notify no one)")
    parser.add_argument("--out-dir", type=Path, help="where the copies go (not this folder)")
    parser.add_argument("--check", action="store_true", help="only check the values; write nothing")
    args = parser.parse_args(argv)
    if not args.project or not args.service:
        parser.error("--project and --service need a value")
    for value in (args.project, args.service, args.channel_id):
        if not SAFE.fullmatch(value):
            print(f"render.py: unexpected characters in '{value}'", file=sys.stderr)
            return 2
    if args.check:
        return 0
    if args.out_dir and args.out_dir.resolve() == HERE:
        parser.error("--out-dir: not the folder of the committed files")
    channels = [CHANNEL.replace("PROJECT_ID", args.project).replace("CHANNEL_ID", args.channel_id)] if args.channel_id else []
    out = args.out_dir or Path(tempfile.mkdtemp(prefix="fer-monitoring-"))
    out.mkdir(parents=True, exist_ok=True)
    for src in [*sorted(HERE.glob("alert-*.json")), HERE / "dashboard.json"]:
        doc = render(json.loads(src.read_text()), args.service, channels)
        (out / src.name).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
