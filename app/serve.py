"""The service's entry point (the image's and ``make serve``'s): ``python -m app.serve`` serves
:func:`app.main.serve_app` on ``$PORT``.

Cloud Run tells the container which port to listen on through ``PORT`` (8080 unless set
otherwise); an exec-form ``ENTRYPOINT`` cannot expand a variable itself, hence this module rather
than a shell wrapper. The settings are checked before uvicorn starts, so a bad variable ends the
process with one line naming it (exit status 2) instead of a traceback from inside uvicorn.

Stopping: on SIGTERM (or SIGINT) uvicorn stops accepting connections, lets the requests in flight
finish for up to ``SHUTDOWN_TIMEOUT_S``, runs the app's lifespan shutdown, and the process exits
with status 0. (Uvicorn raises the signal again once it is done, which would end the process
with status 143, "killed by SIGTERM", after a clean shutdown: :func:`_exit_cleanly` turns that
into a plain exit.)
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

import uvicorn

from app.settings import ConfigError, load_settings

# Every interface: inside a container the platform's proxy is the only client.
HOST = "0.0.0.0"


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    """Uvicorn's handlers are in place while it runs; before it starts and after it has shut
    down, SIGTERM means "stop now", and there is nothing left to clean up."""
    raise SystemExit(0)


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"app.serve: {exc}", file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        uvicorn.run(
            "app.main:serve_app",
            factory=True,
            host=HOST,
            port=settings.port,
            # Cloud Run's front end terminates TLS and sets X-Forwarded-Proto/For: trust it, so
            # request URLs (and the access log) show the client's scheme and address.
            proxy_headers=True,
            forwarded_allow_ips="*",
            # On SIGTERM uvicorn closes its listening socket at once, then waits for the requests
            # in flight, at most SHUTDOWN_TIMEOUT_S (Cloud Run sends SIGKILL 10 s after SIGTERM).
            timeout_graceful_shutdown=settings.shutdown_timeout_s,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
