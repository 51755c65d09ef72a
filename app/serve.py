"""The service image's entry point: ``python -m app.serve`` serves :data:`app.main.app` on ``$PORT``.

Cloud Run tells the container which port to listen on through ``PORT`` (8080 unless set
otherwise); an exec-form ``ENTRYPOINT`` cannot expand a variable itself, hence this module rather
than a shell wrapper. The settings are checked before uvicorn starts, so a bad variable ends the
process with one line naming it (exit status 2) instead of a traceback from inside uvicorn.
"""

from __future__ import annotations

import sys

import uvicorn

from app.settings import ConfigError, load_settings

# Every interface: inside a container the platform's proxy is the only client.
HOST = "0.0.0.0"


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"app.serve: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(
        "app.main:app",
        host=HOST,
        port=settings.port,
        # Cloud Run's front end terminates TLS and sets X-Forwarded-Proto/For: trust it, so
        # request URLs (and the access log) show the client's scheme and address.
        proxy_headers=True,
        forwarded_allow_ips="*",
        # Cloud Run sends SIGTERM and waits 10 s before SIGKILL: finish what is in flight first.
        timeout_graceful_shutdown=8,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
