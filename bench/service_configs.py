"""The real service under several configurations side by side: micro-batching off and on (with
several waits), under the same load at the same time.

    python -m bench.service_configs                                  # the default configurations
    python -m bench.service_configs --config off:BATCH_MAX_SIZE=1 --config on:BATCH_MAX_SIZE=16,BATCH_MAX_WAIT_MS=2

Each ``--config NAME:KEY=VALUE,...`` is one service process (``bench.service``'s
``run_server``: its own free port, ``MODEL_URI=--model``, the service's defaults for every variable
not given). All of them are started first and kept running; then, for ``--rounds`` rounds, every
load level (each image of ``bench.service``, the 48x48 crop and the photo, at each
``--concurrency``) is run against every configuration in a new random order per round, with
``--requests`` requests per level and round. Idle servers wait on their sockets, so only the one
under load uses the CPUs, and a machine whose load drifts during the run weighs on all alike.

Reported per configuration, image and concurrency: throughput (200s per second; median over the
rounds), latency p50/p99 over all rounds' 200s, 503s and other failures, faces per forward pass
(from the server's ``fer_inference_batch_size``), the server process's CPU time per request (user +
system, all threads, from ``/proc``: what the work costs, whatever else runs on the machine) and
the ratios of throughput, latency and CPU time to the first configuration's (``--baseline`` names
another). The crop's class probabilities are compared
across configurations (largest absolute difference to the baseline's).

Writes ``bench/results/service_configs.json`` (``--output``) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.settings import BUNDLED_MODEL
from bench.machine import RESULTS_DIR, command_line, write_result
from bench.service import BenchImage, bench_images, load_test, parse_concurrency, run_server, upload, warm_up
from bench.timing import latency_summary, positive_int

log = logging.getLogger(__name__)

# Micro-batching off (each request's faces in a pass of their own, in its inference slot), then on
# (the default) with three waits for company.
DEFAULT_CONFIGS = (
    "off:BATCH_MAX_SIZE=1",
    "batch-0ms:BATCH_MAX_SIZE=32,BATCH_MAX_WAIT_MS=0",
    "batch-2ms:BATCH_MAX_SIZE=32,BATCH_MAX_WAIT_MS=2",
    "batch-5ms:BATCH_MAX_SIZE=32,BATCH_MAX_WAIT_MS=5",
)


def parse_config(value: str) -> tuple[str, dict[str, str]]:
    """``NAME:KEY=VALUE,KEY=VALUE`` (the part after the colon may be empty)."""
    name, sep, rest = value.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"NAME:KEY=VALUE,..., got {value!r}")
    env = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, setting = item.partition("=")
        if not eq or not key:
            raise argparse.ArgumentTypeError(f"KEY=VALUE in {value!r}, got {item!r}")
        env[key] = setting
    return name, env


def batch_counts(base_url: str, timeout: float) -> tuple[float, float]:
    """(forward passes, faces classified) so far, from the server's ``fer_inference_batch_size``."""
    text = httpx.get(f"{base_url}/metrics", timeout=timeout).text
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "fer_inference_batch_size"
        for sample in family.samples
    }
    return values.get("fer_inference_batch_size_count", 0.0), values.get("fer_inference_batch_size_sum", 0.0)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) process ``pid`` has used so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5), in clock ticks
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def crop_scores(base_url: str, image: BenchImage, timeout: float) -> dict[str, float]:
    params, files = upload(image)
    response = httpx.post(f"{base_url}/predict", params=params, files=files, timeout=timeout)
    response.raise_for_status()
    scores: dict[str, float] = response.json()["faces"][0]["scores"]
    return scores


def level_summary(rows: list[dict[str, Any]], passes: float, faces: float, cpu_s: float) -> dict[str, Any]:
    """One configuration at one load level, over all rounds."""
    seconds = [s for row in rows for s in row.pop("seconds")]
    ok = sum(row["ok"] for row in rows)
    return {
        "rounds": len(rows),
        "requests": sum(row["requests"] for row in rows),
        "ok": sum(row["ok"] for row in rows),
        "busy_503": sum(row["busy_503"] for row in rows),
        "other_failures": sum(sum(row["other_non_200"].values()) + sum(row["transport_errors"].values()) for row in rows),
        "throughput_rps": statistics.median(row["throughput_rps"] for row in rows),
        "throughput_rps_rounds": [row["throughput_rps"] for row in rows],
        "latency": latency_summary(seconds),
        "faces_per_forward_pass": faces / passes if passes else None,
        "server_cpu_ms_per_request": cpu_s * 1000 / ok if ok else None,
    }


def compare(
    model: Path, configs: dict[str, dict[str, str]], images: list[BenchImage], args: argparse.Namespace, log_path: Path
) -> dict[str, Any]:
    """Start every configuration's server, then run the interleaved rounds."""
    levels = [(image, c) for image in images for c in args.concurrency]
    raw: dict[tuple[str, str, int], list[dict[str, Any]]] = {(n, i.name, c): [] for n in configs for i, c in levels}
    counts: dict[tuple[str, str, int], list[float]] = {key: [0.0, 0.0, 0.0] for key in raw}  # passes, faces, CPU s
    servers: dict[str, str] = {}
    pids: dict[str, int] = {}
    out: dict[str, Any] = {"configs": {}}
    with contextlib.ExitStack() as stack:
        for name, env in configs.items():
            server = stack.enter_context(run_server(model, log_path, env))
            servers[name] = server.base_url
            pids[name] = server.process.pid
            warm_up(server.base_url, images, args.warmup, args.timeout)
            out["configs"][name] = {"env": env, "ready_s": server.ready_s, "crop_scores": {}}
            log.info("%s: ready after %.1f s (%s)", name, server.ready_s, env or "defaults")
        for name, url in servers.items():
            out["configs"][name]["crop_scores"] = crop_scores(url, images[0], args.timeout)
        rng = random.Random(args.seed)
        for round_ in range(1, args.rounds + 1):
            for image, concurrency in levels:
                order = list(servers)
                rng.shuffle(order)
                for name in order:
                    url = servers[name]
                    before = batch_counts(url, args.timeout)
                    cpu_before = cpu_seconds(pids[name])
                    row = load_test(url, image, concurrency, args.requests, args.max_duration, args.timeout, keep_seconds=True)
                    cpu_after = cpu_seconds(pids[name])
                    after = batch_counts(url, args.timeout)
                    key = (name, image.name, concurrency)
                    counts[key][0] += after[0] - before[0]
                    counts[key][1] += after[1] - before[1]
                    counts[key][2] += cpu_after - cpu_before
                    raw[key].append(row)
                    log.info(
                        "round %d: %s %s x%d: %.1f req/s, p50 %.1f ms",
                        round_,
                        name,
                        image.name,
                        concurrency,
                        row["throughput_rps"],
                        row["latency"].get("p50_ms", float("nan")),
                    )
    out["levels"] = [
        {"config": name, "image": image, "concurrency": c, **level_summary(rows, *counts[(name, image, c)])}
        for (name, image, c), rows in raw.items()
    ]
    return out


def add_ratios(results: dict[str, Any], baseline: str) -> None:
    """Throughput and latency of each level relative to the baseline configuration's at that level."""
    base = {(row["image"], row["concurrency"]): row for row in results["levels"] if row["config"] == baseline}
    for row in results["levels"]:
        ref = base[(row["image"], row["concurrency"])]
        lat, ref_lat = row["latency"], ref["latency"]
        cpu, ref_cpu = row["server_cpu_ms_per_request"], ref["server_cpu_ms_per_request"]
        row["vs_baseline"] = {
            "throughput": row["throughput_rps"] / ref["throughput_rps"] if ref["throughput_rps"] else None,
            "server_cpu_per_request": cpu / ref_cpu if cpu and ref_cpu else None,
            "p50": lat["p50_ms"] / ref_lat["p50_ms"] if "p50_ms" in lat and "p50_ms" in ref_lat else None,
            "p99": lat["p99_ms"] / ref_lat["p99_ms"] if "p99_ms" in lat and "p99_ms" in ref_lat else None,
        }
    ref_scores = results["configs"][baseline]["crop_scores"]
    for config in results["configs"].values():
        scores = config["crop_scores"]
        config["crop_scores_max_abs_diff"] = max(abs(scores[c] - ref_scores[c]) for c in ref_scores)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(results: dict[str, Any], baseline: str) -> str:
    lines = [
        f"Ratios are to `{baseline}` at the same level (throughput: higher is better; latency: lower is better).",
        "",
        "| image | concurrency | config | req/s | p50 ms | p99 ms | 503 | faces per pass | server CPU ms per req "
        "| req/s ratio | p50 ratio | p99 ratio | CPU ratio |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sorted(results["levels"], key=lambda r: (r["image"], r["concurrency"])):
        lat, ratio = row["latency"], row["vs_baseline"]
        per_pass = row["faces_per_forward_pass"]
        lines.append(
            f"| {row['image']} | {row['concurrency']} | {row['config']} | {row['throughput_rps']:.1f} "
            f"| {lat.get('p50_ms', float('nan')):.1f} | {lat.get('p99_ms', float('nan')):.1f} | {row['busy_503']} "
            f"| {'-' if per_pass is None else f'{per_pass:.2f}'} | {_ratio(row['server_cpu_ms_per_request'])} "
            f"| {_ratio(ratio['throughput'])} | {_ratio(ratio['p50'])} | {_ratio(ratio['p99'])} "
            f"| {_ratio(ratio['server_cpu_per_request'])} |"
        )
    lines += ["", "| config | environment | crop: largest probability difference to the baseline |", "|---|---|---:|"]
    for name, config in results["configs"].items():
        env = ", ".join(f"{k}={v}" for k, v in config["env"].items()) or "(defaults)"
        lines.append(f"| {name} | {env} | {config['crop_scores_max_abs_diff']:.1e} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL, help="checkpoint every server serves")
    parser.add_argument(
        "--config", type=parse_config, action="append", default=[], help="NAME:KEY=VALUE,... (repeatable; default: see above)"
    )
    parser.add_argument("--baseline", help="configuration the ratios are to (default: the first)")
    parser.add_argument("--concurrency", type=parse_concurrency, default=[1, 8, 32], help="load levels, e.g. 1,8,32")
    parser.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds")
    parser.add_argument("--requests", type=positive_int, default=100, help="requests per level, configuration and round")
    parser.add_argument("--max-duration", type=float, default=30.0, help="most seconds per level, configuration and round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed requests per image for each server first")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds one request may take")
    parser.add_argument("--seed", type=int, default=0, help="seed of the order shuffles")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "service_configs.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request costs the client CPU
    configs = dict(args.config or [parse_config(c) for c in DEFAULT_CONFIGS])
    if len(configs) != len(args.config or DEFAULT_CONFIGS):
        parser.error("configuration names must be unique")
    baseline = args.baseline or next(iter(configs))
    if baseline not in configs:
        parser.error(f"--baseline {baseline}: no such configuration")
    if not args.model.is_file():
        parser.error(f"--model {args.model}: no such checkpoint")
    load_before = os.getloadavg()  # other work on the machine, for the record
    images = bench_images()
    with tempfile.TemporaryDirectory(prefix="bench-configs-") as tmp:
        results = compare(args.model, configs, images, args, Path(tmp) / "server.log")
    results["settings"] = {
        "model": str(args.model),
        "baseline": baseline,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "requests": args.requests,
        "max_duration_s": args.max_duration,
        "warmup": args.warmup,
        "timeout_s": args.timeout,
        "seed": args.seed,
        "load_average_1_5_15min": {"start": load_before, "end": os.getloadavg()},
    }
    add_ratios(results, baseline)
    write_result(args.output, "service_configs", results, command_line("bench.service_configs", argv))
    print(markdown(results, baseline))
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
