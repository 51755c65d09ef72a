"""The service image, built and run as Cloud Run runs it, as evidence.

    sudo .venv/bin/python -m bench.container                 # build, then check: bench/results/container.json
    sudo .venv/bin/python -m bench.container --no-build      # check the image built already
    sudo .venv/bin/python -m bench.container --soak-requests 100 --output /tmp/container.json

Root, podman (``scripts/build-images-locally.sh`` installs it, with buildah and debootstrap, and
builds the base image locally: nothing is pulled from a registry). Steps:

* build ``api.Dockerfile`` with ``scripts/build-images-locally.sh --api-only`` (at nice 10): its
  wall time; the image's size, its base's, what the service adds, and the size of each layer
  (``podman history``);
* for ``PORT`` 8080 (when free here) and another port: ``podman run --memory 512m --cpus 1`` (no
  swap; ``--cpus``), an instance of 1 vCPU and 512 MiB, on the host's network: ready after how long,
  the process's uid (not root), ``/readyz`` on that port. The service sizes itself from its CPU
  quota: one inference slot per CPU, so at ``--cpus 2`` two large photos decode at once;
* on the other port: the hostile-upload corpus (:mod:`bench.fuzz_corpus`, at the service's default
  limits), then a soak at concurrency ``--soak-concurrency`` (:mod:`bench.soak`'s kinds plus large
  photos: a 4000x3000 JPEG and a 6000x6000 PNG): no 5xx but deliberate 503s, no wrong answer,
  no OOM kill; the container's peak memory from its cgroup (``memory.max_usage_in_bytes`` on
  cgroup v1, ``memory.peak`` on v2);
* SIGTERM during load: ``podman kill --signal TERM`` while ``--term-concurrency`` clients post
  photos; every request sent before it must be answered (200, or a 503), the container must exit
  0 within 10 s (Cloud Run's SIGKILL). Requests sent after it are refused (the socket closes).

Exit status 1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from bench import fuzz_corpus, soak
from bench.machine import RESULTS_DIR, command_line, describe_host, write_result
from bench.service import ROOT, free_port, parse_env
from bench.timing import positive_int
from tests.utils.corpus import build_corpus

log = logging.getLogger(__name__)

IMAGE = "localhost/fer-api:local"
BUILD = ("nice", "-n", "10", "bash", "scripts/build-images-locally.sh", "--api-only")
MEMORY = "512m"
SIGKILL_AFTER_S = 10.0  # Cloud Run's grace period after SIGTERM
READY_TIMEOUT_S = 120.0
SERVICE_UID = 10001
DEFAULT_LIMITS = {"max_image_pixels": 40_000_000, "max_upload_bytes": 10 * 1024 * 1024}


def podman(*args: str, check: bool = True, timeout: float = 600) -> str:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip()


def build(log_path: Path) -> dict[str, Any]:
    """``scripts/build-images-locally.sh --api-only``; its wall time and the tail of its output."""
    started = time.perf_counter()
    with log_path.open("wb") as out:
        proc = subprocess.run(BUILD, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=False)
    tail = log_path.read_text(errors="replace")[-1500:]
    if proc.returncode != 0:
        raise RuntimeError(f"the build failed ({proc.returncode}):\n{tail}")
    return {"command": " ".join(BUILD), "wall_s": round(time.perf_counter() - started, 1), "log_tail": tail}


def image_facts(image: str) -> dict[str, Any]:
    """The image's size, its base's (the first FROM of api.Dockerfile), and each layer's (``podman history``)."""
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image))
    dockerfile = (ROOT / "api.Dockerfile").read_text().splitlines()
    base_name = next(line.split()[1] for line in dockerfile if line.upper().startswith("FROM "))
    base = f"docker.io/library/{base_name}" if "/" not in base_name else base_name
    base_size = int(podman("image", "inspect", "--format", "{{.Size}}", base))
    layers = [
        {"size_mb": round(layer.get("size", 0) / 1e6, 2), "created_by": layer.get("CreatedBy", layer.get("createdBy", ""))[:200]}
        for layer in json.loads(podman("history", "--format", "json", image))
    ]
    return {
        "image": image,
        "packages_mb": package_sizes(image),
        "size_mb": round(size / 1e6, 1),
        "base": base,
        "base_size_mb": round(base_size / 1e6, 1),
        "added_mb": round((size - base_size) / 1e6, 1),
        "layers": layers,
    }


_PACKAGE_SIZES = """
import json, os, sysconfig
site = sysconfig.get_paths()["purelib"]
def size(path):
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
sizes = {name: size(os.path.join(site, name)) for name in os.listdir(site)}
print(json.dumps({name: round(n / 1e6, 1) for name, n in sorted(sizes.items(), key=lambda kv: -kv[1]) if n >= 1e6}))
"""


def run_args() -> list[str]:
    """As scripts/build-images-locally.sh runs containers: runc, the host's network, limits no higher
    than this shell's (podman's defaults for root need CAP_SYS_RESOURCE, which a sandbox may not grant)."""
    hard = subprocess.run(["sh", "-c", "ulimit -Hn"], capture_output=True, text=True, check=True).stdout.strip()
    return ["--runtime", "runc", "--network", "host", "--ulimit", f"nofile={hard}:{hard}", "--ulimit", "nproc=4096:4096"]


def package_sizes(image: str) -> dict[str, float]:
    """MB per top-level entry of the image's site-packages (1 MB or more), largest first."""
    out = podman("run", "--rm", *run_args(), "--entrypoint", "python", image, "-c", _PACKAGE_SIZES)
    sizes: dict[str, float] = json.loads(out)
    return sizes


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


@dataclass
class Running:
    name: str
    port: int
    base_url: str
    host_pid: int
    ready_s: float


@contextlib.contextmanager
def container(image: str, port: int, cpus: str, env: dict[str, str] | None = None) -> Iterator[Running]:
    """``image`` under ``--memory 512m`` (no swap) and ``--cpus`` with ``PORT``, ready; removed on exit."""
    name = f"fer-container-check-{os.getpid()}-{port}"
    args = ["run", "--detach", "--name", name, *run_args(), "--cpus", cpus, "--memory", MEMORY, "--memory-swap", MEMORY]
    args += [arg for key, value in {"PORT": str(port), **(env or {})}.items() for arg in ("--env", f"{key}={value}")]
    started = time.perf_counter()
    podman(*args, image)
    try:
        base_url = f"http://127.0.0.1:{port}"
        ready_s = wait_ready(name, base_url, started)
        host_pid = int(podman("inspect", "--format", "{{.State.Pid}}", name))
        yield Running(name, port, base_url, host_pid, ready_s)
    finally:
        podman("rm", "--force", "--time", "10", name, check=False)


def wait_ready(name: str, base_url: str, started: float) -> float:
    with httpx.Client(base_url=base_url, timeout=2.0) as client:
        while True:
            with contextlib.suppress(httpx.TransportError):
                if client.get("/readyz").status_code == 200:
                    return round(time.perf_counter() - started, 2)
            if podman("inspect", "--format", "{{.State.Running}}", name) != "true":
                raise RuntimeError(f"{name} stopped before it was ready:\n{podman('logs', name, check=False)[-3000:]}")
            if time.perf_counter() - started > READY_TIMEOUT_S:
                raise RuntimeError(f"{name} not ready after {READY_TIMEOUT_S:.0f} s")
            time.sleep(0.1)


def memory_cgroup(host_pid: int) -> dict[str, Any]:
    """The container's peak memory and OOM kills, from the memory cgroup of its process."""
    lines = Path(f"/proc/{host_pid}/cgroup").read_text().splitlines()
    v1 = [line.split(":", 2)[2] for line in lines if line.split(":", 2)[1] == "memory"]
    if v1:
        folder = Path("/sys/fs/cgroup/memory") / v1[0].lstrip("/")
        oom = dict(line.split() for line in (folder / "memory.oom_control").read_text().splitlines())
        return {
            "cgroup": "v1",
            "limit_mib": int((folder / "memory.limit_in_bytes").read_text()) / 2**20,
            "peak_mib": round(int((folder / "memory.max_usage_in_bytes").read_text()) / 2**20, 1),
            "now_mib": round(int((folder / "memory.usage_in_bytes").read_text()) / 2**20, 1),
            "oom_kills": int(oom.get("oom_kill", 0)),
        }
    folder = Path("/sys/fs/cgroup") / next(line.split(":", 2)[2] for line in lines if line.startswith("0::")).lstrip("/")
    events = dict(line.split() for line in (folder / "memory.events").read_text().splitlines())
    return {
        "cgroup": "v2",
        "limit_mib": int((folder / "memory.max").read_text()) / 2**20,
        "peak_mib": round(int((folder / "memory.peak").read_text()) / 2**20, 1),
        "now_mib": round(int((folder / "memory.current").read_text()) / 2**20, 1),
        "oom_kills": int(events.get("oom_kill", 0)),
    }


def uid_of(name: str) -> int:
    """The uid of the container's main process (python -m app.serve)."""
    return int(podman("exec", name, "sh", "-c", "awk '/^Uid:/ { print $2 }' /proc/1/status"))


# --- the checks ---------------------------------------------------------------------------------


def state_of(name: str) -> dict[str, Any]:
    """Whether the container still runs, and if not how it ended (137: SIGKILL, the OOM killer's)."""
    fields = "{{.State.Running}} {{.State.OOMKilled}} {{.State.ExitCode}}"
    running, oom, code = podman("inspect", "--format", fields, name).split()
    return {"running": running == "true", "oom_killed": oom == "true", "exit_code": int(code)}


def run_corpus(running: Running, seed: int, timeout: float) -> dict[str, Any]:
    """Every case of the hostile corpus (:func:`tests.utils.corpus.build_corpus` at the service's default
    limits) to ``POST /predict``, one at a time; stops at the first case the container does not survive."""
    cases = build_corpus(DEFAULT_LIMITS["max_image_pixels"], DEFAULT_LIMITS["max_upload_bytes"], seed=seed)
    statuses: Counter[str] = Counter()
    failures: dict[str, list[str]] = {}
    with httpx.Client(base_url=running.base_url, timeout=timeout) as client:
        for case in cases:
            answer = fuzz_corpus.post_one(client, case)
            statuses[str(answer["status"])] += 1
            if found := fuzz_corpus.problems(case, answer):
                failures[case.name] = found
            state = state_of(running.name)
            if not state["running"]:
                return {"cases": len(cases), "statuses": dict(statuses), "failures": failures, "died_at": case.name, **state}
    return {"cases": len(cases), "statuses": dict(statuses), "failures": failures, "died_at": None}


def check_port(image: str, port: int, cpus: str, env: dict[str, str]) -> dict[str, Any]:
    with container(image, port, cpus, env) as running:
        return {"port": port, "ready_s": running.ready_s, "uid": uid_of(running.name), "readyz": 200}


def large_kinds() -> dict[str, soak.Kind]:
    """Photos as phones take them, mixed into the soak: the astronaut scaled to 4000x3000 (JPEG), and
    in the middle of a 6000x6000 grey canvas (PNG, 36 Mpx: 108 MB decoded, under MAX_IMAGE_PIXELS)."""
    from skimage import data as skdata

    astronaut = Image.fromarray(skdata.astronaut())
    big = astronaut.resize((4000, 3000), Image.Resampling.BILINEAR)
    jpeg = io.BytesIO()
    big.save(jpeg, format="JPEG", quality=90)
    canvas = Image.new("RGB", (6000, 6000), (128, 128, 128))
    canvas.paste(astronaut.resize((2000, 2000), Image.Resampling.BILINEAR), (2000, 2000))
    png = io.BytesIO()
    canvas.save(png, format="PNG", compress_level=6)
    return {
        "large_jpeg": soak.Kind("large_jpeg", "large", jpeg.getvalue(), detect=True, status=200, faces=1),
        "large_png": soak.Kind("large_png", "large", png.getvalue(), detect=True, status=200, faces=1),
    }


def run_soak(running: Running, requests: int, concurrency: int, timeout: float, seed: int) -> dict[str, Any]:
    kinds = {**soak.request_kinds(), **large_kinds()}
    sizes = {name: len(kind.data) for name, kind in kinds.items()}
    plan = soak.schedule(kinds, {"crop": 4, "photo": 3, "bad": 1, "large": 2}, requests, seed)
    tally, seconds = asyncio.run(soak.run_phase(running.base_url, plan, concurrency, timeout))
    return {
        "requests": requests,
        "concurrency": concurrency,
        "upload_bytes": sizes,
        "seconds": round(seconds, 1),
        "by_kind": tally.by_kind(list(kinds)),
        "ok": tally.total("ok"),
        "busy_503": tally.total("busy_503"),
        "unexpected": tally.unexpected(),
    }


async def _load_with_sigterm(running: Running, photo: bytes, concurrency: int, after_s: float) -> dict[str, Any]:
    """``concurrency`` clients posting ``photo`` until the server is gone; SIGTERM ``after_s`` in."""
    rows: list[tuple[float, str]] = []  # (when sent, outcome)
    term_at: float | None = None
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=running.base_url, timeout=30, limits=limits) as client:

        async def worker() -> None:
            while True:
                sent = time.perf_counter()
                try:
                    response = await client.post("/predict", files={"file": ("photo.png", photo, "image/png")})
                    rows.append((sent, str(response.status_code)))
                except httpx.ConnectError:  # the listening socket is closed: the server is stopping
                    rows.append((sent, "refused"))
                    return
                except httpx.HTTPError as exc:
                    rows.append((sent, f"dropped_{type(exc).__name__}"))
                    return

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        await asyncio.sleep(after_s)
        term_at = time.perf_counter()
        await asyncio.to_thread(podman, "kill", "--signal", "TERM", running.name)
        exit_code = int((await asyncio.to_thread(podman, "wait", running.name)).splitlines()[-1])
        exited_s = time.perf_counter() - term_at
        await asyncio.gather(*workers)
    before = Counter(outcome for sent, outcome in rows if sent < term_at)
    after = Counter(outcome for sent, outcome in rows if sent >= term_at)
    return {
        "concurrency": concurrency,
        "sigterm_after_s": after_s,
        "exit_code": exit_code,
        "exit_s": round(exited_s, 2),
        "sent_before_sigterm": dict(before),
        "sent_after_sigterm": dict(after),
    }


def sigterm_under_load(image: str, concurrency: int, cpus: str, env: dict[str, str]) -> dict[str, Any]:
    photo = next(kind.data for kind in soak.request_kinds().values() if kind.name == "photo")
    with container(image, free_port(), cpus, env) as running:
        return asyncio.run(_load_with_sigterm(running, photo, concurrency, after_s=2.0))


def checks(results: dict[str, Any]) -> dict[str, bool]:
    ports = results["ports"]
    corpus, load, term = results["corpus"], results["soak"], results["sigterm"]
    answered = {"200", "503"}
    return {
        "port_honoured": all(row.get("readyz") == 200 for row in ports if "skipped" not in row),
        "not_root": all(row["uid"] == SERVICE_UID for row in ports if "skipped" not in row),
        "corpus_survived": corpus["died_at"] is None,
        "corpus_no_failure": not corpus["failures"],
        "soak_survived": load["state"]["running"],
        "soak_no_unexpected": not load["unexpected"],
        "no_oom_kill": all(part.get("memory", {}).get("oom_kills", 1) == 0 for part in (corpus, load)),
        # Refused connections never reached the server; a dropped one (reset, no response) did.
        "in_flight_answered": set(term["sent_before_sigterm"]) <= answered | {"refused"},
        "exit_0_within_10_s": term["exit_code"] == 0 and term["exit_s"] < SIGKILL_AFTER_S,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-build", dest="build", action="store_false", help="check the image already built")
    parser.add_argument("--image", default=IMAGE)
    parser.add_argument(
        "--cpus", default="1", help="the container's CPU quota (the service then takes one inference slot per CPU)"
    )
    parser.add_argument(
        "--env", type=parse_env, action="append", default=[], metavar="NAME=VALUE", help="a service setting for every container"
    )
    parser.add_argument("--soak-requests", type=positive_int, default=600)
    parser.add_argument("--soak-concurrency", type=positive_int, default=32)
    parser.add_argument("--term-concurrency", type=positive_int, default=32)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one request may take")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "container.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    results: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}, "memory_limit": MEMORY}
    env = dict(args.env)
    if args.build:
        log.info("building: %s", " ".join(BUILD))
        results["build"] = build(Path("/tmp") / f"fer-container-build-{os.getpid()}.log")
    results["image"] = image_facts(args.image)
    results["podman"] = podman("--version")
    ports: list[dict[str, Any]] = []
    for port in (8080, free_port()):
        if not port_free(port):
            ports.append({"port": port, "skipped": "taken on this machine"})
            continue
        log.info("PORT=%d", port)
        ports.append(check_port(args.image, port, args.cpus, env))
    results["ports"] = ports
    with container(args.image, free_port(), args.cpus, env) as running:
        log.info("hostile corpus on port %d", running.port)
        corpus = run_corpus(running, args.seed, args.timeout)
        memory = memory_cgroup(running.host_pid) if corpus["died_at"] is None else {}
        results["corpus"] = {"port": running.port, "ready_s": running.ready_s, **corpus, "memory": memory}
    with container(args.image, free_port(), args.cpus, env) as running:  # a fresh one: the corpus may have killed the first
        log.info("soak on port %d", running.port)
        results["soak"] = run_soak(running, args.soak_requests, args.soak_concurrency, args.timeout, args.seed)
        results["soak"]["state"] = state_of(running.name)
        if results["soak"]["state"]["running"]:
            results["soak"]["memory"] = memory_cgroup(running.host_pid)
    log.info("SIGTERM under load")
    results["sigterm"] = sigterm_under_load(args.image, args.term_concurrency, args.cpus, env)
    results["checks"] = verdict = checks(results)
    write_result(args.output, "container", results, command_line("bench.container", argv), machine=describe_host())
    print(json.dumps({"image": results["image"] | {"layers": len(results["image"]["layers"])}, "checks": verdict}, indent=2))
    return 0 if all(verdict.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
