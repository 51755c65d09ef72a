"""A long mixed load against the real service, looking for wrong answers and leaks; then a burst
far over its limits, looking at how it refuses.

    python -m bench.soak                          # 20,000 requests at concurrency 32, then the burst
    python -m bench.soak --requests 2000          # a shorter soak
    python -m bench.soak --model runs/<run>/best.pt --server-env MAX_QUEUE=128

The real service (``uvicorn --factory app.main:serve_app``, started by :func:`bench.service.run_server`, loopback
only) serves ``--model``. Client and server share this machine's CPUs.

**Soak.** ``--requests`` requests of ``POST /predict`` from ``--concurrency`` asyncio httpx clients,
in a seeded random order, of these kinds (weights ``--mix``):

* ``crop``: the 48x48 face crop of :func:`bench.service.bench_images`, ``detect=false``: 200, one face;
* ``photo``: the 512x512 astronaut photo, with detection: 200, one face;
* bad files, each with the status and ``detail`` the service must answer: ``empty`` (400
  ``empty file``), ``not_an_image`` (415 ``unsupported image format``), ``truncated_png``
  (400 ``corrupt image``), ``pixel_bomb`` (a 7 kB PNG of 8000x8000 pixels: 413 ``image has too
  many pixels``).

Every answer is classified: ``ok`` (the expected status, detail and face count), ``busy_503`` (503
``server busy`` with ``Retry-After``: overload, allowed), or unexpected: any other 5xx, a 503
without ``Retry-After``, a connection error or timeout, a 4xx other than the expected one, a 200
for a bad file or with the wrong number of faces. Reported: counts per kind and outcome, p50/p99
latency of the ``ok`` answers per kind, throughput, the server's resident memory (``VmRSS``) after
``--warmup`` untimed requests and at the end (growth in %, with samples in between), its open
file descriptors and threads, and ERROR lines in its log.

**Overload.** A second server with ``MAX_CONCURRENT_INFERENCES=--overload-slots`` and
``MAX_QUEUE=--overload-queue`` gets ``--overload-requests`` photos from ``--overload-concurrency``
clients at once, while ``/metrics`` is read every ``--sample-interval`` s on another connection.
Checked: some requests are refused, every refusal is a 503 with ``Retry-After``, every accepted
request succeeds, ``fer_inference_admitted`` (running + waiting) never exceeds slots + queue and
is back to 0 afterwards.

Writes ``bench/results/soak.json`` (``--output``) and a markdown summary, ``bench/results/soak.md``
(``--markdown``), also printed. Exit status 1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from app.settings import BUNDLED_MODEL
from bench.machine import RESULTS_DIR, command_line, memory_mib, write_result
from bench.service import bench_images, parse_env, run_server
from bench.timing import latency_summary, positive_int

log = logging.getLogger(__name__)

DEFAULT_MIX = "crop=6,photo=3,bad=1"
BUSY_DETAIL = "server busy"
PIXEL_BOMB_SIDE = 8000  # 64 Mpx, over the service's default MAX_IMAGE_PIXELS (40 Mpx)
MAX_MEMORY_SAMPLES = 60  # kept in the JSON, evenly spaced
MAX_ERROR_LINES = 5


@dataclass(frozen=True)
class Kind:
    """One kind of request and the answer it must get."""

    name: str
    group: str  # "crop", "photo" or "bad": what --mix weighs
    data: bytes
    detect: bool
    status: int
    detail: str | None = None  # the expected error detail
    faces: int | None = None  # the expected number of faces in a 200

    def upload(self) -> tuple[dict[str, str], dict[str, tuple[str, bytes, str]]]:
        return {"detect": "true" if self.detect else "false"}, {"file": (f"{self.name}.png", self.data, "image/png")}


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def request_kinds() -> dict[str, Kind]:
    """The good images of ``bench.service`` and four bad files, by name."""
    images = {image.name: image for image in bench_images()}
    crop, photo = images["crop"], images["photo"]
    kinds = [
        Kind("crop", "crop", crop.data, detect=False, status=200, faces=1),
        Kind("photo", "photo", photo.data, detect=True, status=200, faces=1),
        Kind("empty", "bad", b"", detect=True, status=400, detail="empty file"),
        Kind("not_an_image", "bad", b"this is a text file, not an image\n" * 8, True, 415, "unsupported image format"),
        Kind("truncated_png", "bad", crop.data[: len(crop.data) // 2], detect=False, status=400, detail="corrupt image"),
        # Compresses to a few kB; refused from its header, before decoding.
        Kind("pixel_bomb", "bad", _png(Image.new("1", (PIXEL_BOMB_SIDE,) * 2)), True, 413, "image has too many pixels"),
    ]
    return {kind.name: kind for kind in kinds}


def parse_mix(value: str) -> dict[str, float]:
    """``crop=6,photo=3,bad=1`` -> weights by group."""
    weights: dict[str, float] = {}
    for part in value.split(","):
        name, sep, weight = part.partition("=")
        try:
            weights[name.strip()] = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"NAME=WEIGHT pairs, got {part!r}") from None
        if not sep or weights[name.strip()] < 0:
            raise argparse.ArgumentTypeError(f"NAME=WEIGHT pairs with weights >= 0, got {part!r}")
    unknown = set(weights) - {"crop", "photo", "bad"}
    if unknown or not any(weights.values()):
        raise argparse.ArgumentTypeError(f"weights of crop, photo and bad, not all 0; got {value!r}")
    return weights


def schedule(kinds: dict[str, Kind], weights: dict[str, float], count: int, seed: int) -> list[Kind]:
    """``count`` requests in a seeded random order: each group by its weight, the bad kinds equally."""
    names, probabilities = [], []
    for kind in kinds.values():
        in_group = sum(1 for k in kinds.values() if k.group == kind.group)
        names.append(kind.name)
        probabilities.append(weights.get(kind.group, 0.0) / in_group)
    rng = random.Random(seed)
    return [kinds[name] for name in rng.choices(names, probabilities, k=count)]


# --- one answer ----------------------------------------------------------------------------


def classify(kind: Kind, response: httpx.Response) -> str:
    """``ok``, ``busy_503``, or what is wrong with the answer."""
    status = response.status_code
    detail = _detail(response)
    if status == 503 and detail == BUSY_DETAIL:
        return "busy_503" if response.headers.get("retry-after") else "busy_503_without_retry_after"
    if status >= 500:
        return f"status_{status}"
    if status != kind.status:
        return "wrong_200" if status == 200 else f"wrong_{status}"
    if status == 200:
        try:
            faces = response.json().get("faces")
        except (ValueError, AttributeError):
            return "wrong_body"
        return "ok" if isinstance(faces, list) and len(faces) == kind.faces else "wrong_faces"
    return "ok" if detail == kind.detail else "wrong_detail"


def _detail(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("detail") if isinstance(body, dict) else None


@dataclass
class Tally:
    """Outcomes and latencies (of the ``ok`` answers, and of the 503s) of one phase, by kind."""

    outcomes: dict[str, Counter[str]] = field(default_factory=dict)
    ok_seconds: dict[str, list[float]] = field(default_factory=dict)
    busy_seconds: list[float] = field(default_factory=list)

    def add(self, kind: Kind, outcome: str, seconds: float) -> None:
        self.outcomes.setdefault(kind.name, Counter())[outcome] += 1
        if outcome == "ok":
            self.ok_seconds.setdefault(kind.name, []).append(seconds)
        elif outcome == "busy_503":
            self.busy_seconds.append(seconds)

    def total(self, outcome: str) -> int:
        return sum(counts[outcome] for counts in self.outcomes.values())

    def unexpected(self) -> dict[str, int]:
        """Every outcome other than ``ok`` and ``busy_503``, over all kinds."""
        out: Counter[str] = Counter()
        for counts in self.outcomes.values():
            out.update({k: v for k, v in counts.items() if k not in ("ok", "busy_503")})
        return dict(sorted(out.items()))

    def by_kind(self, order: list[str]) -> dict[str, Any]:
        """Per kind, in ``order``: requests sent, their outcomes, the latency of the ``ok`` ones."""
        return {
            name: {
                "sent": sum(self.outcomes[name].values()),
                "outcomes": dict(sorted(self.outcomes[name].items())),
                "latency": latency_summary(self.ok_seconds.get(name, [])),
            }
            for name in order
            if name in self.outcomes
        }


# --- the server's side ---------------------------------------------------------------------


def process_stats(pid: int) -> dict[str, Any]:
    """Resident memory (and its peak), open file descriptors and threads of process ``pid``."""
    stats: dict[str, Any] = memory_mib(pid)
    stats["open_fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status") as f:
        stats["threads"] = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    return stats


def gauges(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """The values of the unlabelled gauges ``names`` in a ``/metrics`` page."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names:
                out[sample.name] = sample.value
    return out


GAUGES = ("fer_inference_admitted", "fer_http_requests_in_flight")


class Sampler:
    """Reads the server's gauges (``/metrics``) and resident memory every ``interval`` seconds
    while a phase runs, on its own connection."""

    def __init__(self, base_url: str, pid: int, interval: float, timeout: float) -> None:
        self.base_url, self.pid, self.interval, self.timeout = base_url, pid, interval, timeout
        self.max_gauges: dict[str, float] = {}
        self.scrapes = 0
        self.failed_scrapes = 0
        self.memory: list[tuple[float, float]] = []  # (seconds since start, RSS MiB)
        self._stop = asyncio.Event()

    async def run(self) -> None:
        started = time.perf_counter()
        async with httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout) as client:
            while not self._stop.is_set():
                try:
                    values = gauges((await client.get("/metrics")).text, GAUGES)
                    self.scrapes += 1
                    for name, value in values.items():
                        self.max_gauges[name] = max(value, self.max_gauges.get(name, value))
                except httpx.HTTPError:
                    self.failed_scrapes += 1
                self.memory.append((time.perf_counter() - started, memory_mib(self.pid)["rss_mib"]))
                with contextlib.suppress(asyncio.TimeoutError):  # the interval is over
                    await asyncio.wait_for(self._stop.wait(), self.interval)

    def stop(self) -> None:
        self._stop.set()


def log_errors(log_path: Path, start: int = 0) -> dict[str, Any]:
    """ERROR (and worse) lines the server logged from byte ``start`` of its log on."""
    lines = log_path.read_bytes()[start:].decode(errors="replace").splitlines()
    errors = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            if "Traceback" in line:
                errors.append(line)
            continue
        if isinstance(entry, dict) and entry.get("severity") in ("ERROR", "CRITICAL"):
            errors.append(str(entry.get("message")))
    return {"count": len(errors), "first": errors[:MAX_ERROR_LINES]}


# --- the client's side ---------------------------------------------------------------------


async def run_phase(
    base_url: str, plan: list[Kind], concurrency: int, timeout: float, sampler: Sampler | None = None
) -> tuple[Tally, float]:
    """Send ``plan`` from ``concurrency`` workers; the tally and the wall-clock seconds it took."""
    tally = Tally()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    sampling = asyncio.create_task(sampler.run()) if sampler is not None else None
    next_index = 0
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:

        async def worker() -> None:
            nonlocal next_index
            while next_index < len(plan):
                kind = plan[next_index]
                next_index += 1  # no await since the check: exact across workers
                params, files = kind.upload()
                start = time.perf_counter()
                try:
                    response = await client.post("/predict", params=params, files=files)
                except httpx.HTTPError as exc:  # refused, reset, timed out
                    tally.add(kind, f"connection_{type(exc).__name__}", time.perf_counter() - start)
                    continue
                tally.add(kind, classify(kind, response), time.perf_counter() - start)

        started = time.perf_counter()
        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            duration = time.perf_counter() - started
            if sampler is not None and sampling is not None:
                sampler.stop()
                await sampling
    return tally, duration


def _growth_pct(before: float, after: float) -> float:
    return round(100.0 * (after - before) / before, 2) if before else 0.0


def _downsample(samples: list[tuple[float, float]], keep: int) -> list[list[float]]:
    if len(samples) <= keep:
        chosen = samples
    else:
        step = (len(samples) - 1) / (keep - 1)
        chosen = [samples[round(i * step)] for i in range(keep)]
    return [[round(t, 2), rss] for t, rss in chosen]


def soak(model: Path, args: argparse.Namespace, kinds: dict[str, Kind], work: Path) -> dict[str, Any]:
    log_path = work / "soak-server.log"
    plan = schedule(kinds, args.mix, args.requests, args.seed)
    warmup = schedule(kinds, args.mix, args.warmup, args.seed + 1)
    with run_server(model, log_path, args.server_env) as server:
        pid = server.process.pid
        log.info("soak: %d warm-up requests", len(warmup))
        warm_tally, _ = asyncio.run(run_phase(server.base_url, warmup, args.concurrency, args.timeout))
        after_warmup = process_stats(pid)
        log_mark = log_path.stat().st_size
        log.info("soak: %d requests at concurrency %d", len(plan), args.concurrency)
        sampler = Sampler(server.base_url, pid, args.memory_interval, args.timeout)
        tally, duration = asyncio.run(run_phase(server.base_url, plan, args.concurrency, args.timeout, sampler))
        end = process_stats(pid)
        after = gauges(httpx.get(f"{server.base_url}/metrics", timeout=args.timeout).text, GAUGES)
        errors = log_errors(log_path, log_mark)
    answered = len(plan) - sum(v for k, v in tally.unexpected().items() if k.startswith("connection_"))
    return {
        "requests": len(plan),
        "concurrency": args.concurrency,
        "warmup_requests": len(warmup),
        "warmup_unexpected": warm_tally.unexpected(),
        "duration_s": round(duration, 3),
        "throughput_rps": round(answered / duration, 2) if duration else 0.0,
        "ok": tally.total("ok"),
        "busy_503": tally.total("busy_503"),
        "unexpected": tally.unexpected(),
        "kinds": tally.by_kind(list(kinds)),
        "server": {
            "after_warmup": after_warmup,
            "end": end,
            "rss_growth_pct": _growth_pct(after_warmup["rss_mib"], end["rss_mib"]),
            "rss_samples": _downsample(sampler.memory, MAX_MEMORY_SAMPLES),
            "max_gauges": sampler.max_gauges,
            "gauges_after": after,
            "log_errors": errors,
        },
    }


def overload(model: Path, args: argparse.Namespace, kinds: dict[str, Kind], work: Path) -> dict[str, Any]:
    log_path = work / "overload-server.log"
    env = {**args.server_env, "MAX_CONCURRENT_INFERENCES": str(args.overload_slots), "MAX_QUEUE": str(args.overload_queue)}
    bound = args.overload_slots + args.overload_queue
    plan = [kinds["photo"]] * args.overload_requests
    with run_server(model, log_path, env) as server:
        log.info("overload: %d photos at concurrency %d, bound %d", len(plan), args.overload_concurrency, bound)
        sampler = Sampler(server.base_url, server.process.pid, args.sample_interval, args.timeout)
        tally, duration = asyncio.run(run_phase(server.base_url, plan, args.overload_concurrency, args.timeout, sampler))
        after = gauges(httpx.get(f"{server.base_url}/metrics", timeout=args.timeout).text, GAUGES)
        errors = log_errors(log_path)
    return {
        "server_env": env,
        "bound": bound,
        "requests": len(plan),
        "concurrency": args.overload_concurrency,
        "duration_s": round(duration, 3),
        "ok": tally.total("ok"),
        "busy_503": tally.total("busy_503"),
        "unexpected": tally.unexpected(),
        "latency_ok": latency_summary(tally.ok_seconds.get("photo", [])),
        "latency_busy": latency_summary(tally.busy_seconds),
        "metrics_scrapes": sampler.scrapes,
        "failed_scrapes": sampler.failed_scrapes,
        "max_admitted": sampler.max_gauges.get("fer_inference_admitted"),
        "admitted_after": after.get("fer_inference_admitted"),
        "log_errors": errors,
    }


def checks(results: dict[str, Any]) -> dict[str, bool]:
    """Each property the run must have; a skipped phase has none."""
    out: dict[str, bool] = {}
    if "soak" in results:
        s = results["soak"]
        out["soak: no unexpected answers or connection errors"] = not s["unexpected"] and not s["warmup_unexpected"]
        out["soak: no ERROR in the server log"] = s["server"]["log_errors"]["count"] == 0
        out["soak: nothing admitted once done"] = s["server"]["gauges_after"].get("fer_inference_admitted") == 0
    if "overload" in results:
        o = results["overload"]
        out["overload: some requests refused (503)"] = o["busy_503"] > 0
        out["overload: every 503 has Retry-After, every accepted request succeeded"] = not o["unexpected"]
        out["overload: admitted never above slots + queue"] = o["max_admitted"] is not None and o["max_admitted"] <= o["bound"]
        out["overload: nothing admitted once done"] = o["admitted_after"] == 0
        out["overload: no ERROR in the server log"] = o["log_errors"]["count"] == 0
    return out


# --- report --------------------------------------------------------------------------------


def _ms(latency: dict[str, Any], key: str) -> str:
    return f"{latency[key]:.1f}" if key in latency else "-"


def markdown(results: dict[str, Any], command: str) -> str:
    lines = [f"# Soak: `{command}`", ""]
    if "soak" in results:
        s = results["soak"]
        server = s["server"]
        lines += [
            f"{s['requests']} requests at concurrency {s['concurrency']} (after {s['warmup_requests']} warm-up), "
            f"{s['duration_s']:.1f} s, **{s['throughput_rps']:.1f} answers/s**; {s['ok']} as expected, "
            f"{s['busy_503']} busy 503s, unexpected: {s['unexpected'] or 'none'}.",
            "",
            "| kind | sent | as expected | other outcomes | p50 ms | p99 ms |",
            "|---|---:|---:|---|---:|---:|",
        ]
        for name, row in s["kinds"].items():
            other = {k: v for k, v in row["outcomes"].items() if k != "ok"}
            latency = row["latency"]
            lines.append(
                f"| {name} | {row['sent']} | {row['outcomes'].get('ok', 0)} | {other or ''} "
                f"| {_ms(latency, 'p50_ms')} | {_ms(latency, 'p99_ms')} |"
            )
        warm, end = server["after_warmup"], server["end"]
        lines += [
            "",
            f"Server RSS {warm['rss_mib']:.1f} MiB after warm-up, {end['rss_mib']:.1f} MiB at the end "
            f"(**{server['rss_growth_pct']:+.2f} %**, peak {end['peak_rss_mib']:.1f} MiB); open files "
            f"{warm['open_fds']} -> {end['open_fds']}, threads {warm['threads']} -> {end['threads']}; "
            f"ERROR log lines: {server['log_errors']['count']}.",
        ]
    if "overload" in results:
        o = results["overload"]
        lines += [
            "",
            f"Overload: {o['requests']} photos at concurrency {o['concurrency']} against "
            f"MAX_CONCURRENT_INFERENCES={o['server_env']['MAX_CONCURRENT_INFERENCES']}, "
            f"MAX_QUEUE={o['server_env']['MAX_QUEUE']} (bound {o['bound']}): {o['ok']} served "
            f"(p50 {_ms(o['latency_ok'], 'p50_ms')} ms), {o['busy_503']} refused with 503 + Retry-After "
            f"(p50 {_ms(o['latency_busy'], 'p50_ms')} ms), unexpected: {o['unexpected'] or 'none'}; "
            f"fer_inference_admitted at most {o['max_admitted']} over {o['metrics_scrapes']} scrapes, "
            f"{o['admitted_after']} afterwards.",
        ]
    lines += ["", "| check | result |", "|---|---|"]
    lines += [f"| {name} | {'pass' if ok else '**FAIL**'} |" for name, ok in results["checks"].items()]
    return "\n".join(lines) + "\n"


# --- command line --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL, help="checkpoint the service serves")
    parser.add_argument("--requests", type=positive_int, default=20_000, help="soak requests")
    parser.add_argument("--concurrency", type=positive_int, default=32, help="soak clients")
    parser.add_argument("--warmup", type=int, default=200, help="untimed requests before the memory baseline")
    parser.add_argument("--mix", type=parse_mix, default=parse_mix(DEFAULT_MIX), help=f"weights (default {DEFAULT_MIX})")
    parser.add_argument("--seed", type=int, default=0, help="order of the requests")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds one request may take")
    parser.add_argument("--memory-interval", type=float, default=1.0, help="seconds between soak samples")
    parser.add_argument("--server-env", type=parse_env, action="append", default=[], help="KEY=VALUE for both servers")
    parser.add_argument("--overload-requests", type=int, default=400, help="photos in the burst (0: no overload phase)")
    parser.add_argument("--overload-concurrency", type=positive_int, default=128)
    parser.add_argument("--overload-slots", type=positive_int, default=1, help="MAX_CONCURRENT_INFERENCES")
    parser.add_argument("--overload-queue", type=int, default=4, help="MAX_QUEUE")
    parser.add_argument("--sample-interval", type=float, default=0.02, help="seconds between /metrics reads in the burst")
    parser.add_argument("--no-soak", dest="soak", action="store_false", help="only the overload phase")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "soak.json")
    parser.add_argument("--markdown", type=Path, default=RESULTS_DIR / "soak.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.server_env = dict(args.server_env)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    if not args.model.is_file():
        parser.error(f"--model {args.model}: no such checkpoint")
    if args.overload_queue < 0 or args.overload_requests < 0 or args.warmup < 0:
        parser.error("--overload-queue, --overload-requests and --warmup must be >= 0")
    kinds = request_kinds()
    results: dict[str, Any] = {
        "settings": {
            "model": str(args.model),
            "mix": args.mix,
            "seed": args.seed,
            "timeout_s": args.timeout,
            "server_env": args.server_env,
            "kinds": {
                k.name: {"bytes": len(k.data), "detect": k.detect, "status": k.status, "detail": k.detail, "faces": k.faces}
                for k in kinds.values()
            },
        }
    }
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        if args.soak:
            results["soak"] = soak(args.model, args, kinds, Path(tmp))
        if args.overload_requests:
            results["overload"] = overload(args.model, args, kinds, Path(tmp))
    results["checks"] = checks(results)
    results["passed"] = all(results["checks"].values())
    command = command_line("bench.soak", argv)
    write_result(args.output, "soak", results, command)
    summary = markdown(results, command)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(summary)
    print(summary)
    print(f"written to {args.output} and {args.markdown}")
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
