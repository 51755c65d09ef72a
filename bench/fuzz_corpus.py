"""Hostile and malformed uploads through the real service, and the memory they make it use.

    python -m bench.fuzz_corpus                                      # the bundled model, default limits
    python -m bench.fuzz_corpus --server-env MAX_IMAGE_PIXELS=4000000

The corpus is ``tests/utils/corpus.py`` (truncated and corrupted files of every allowed format,
decompression bombs, non-images with image content types, polyglots, broken EXIF, extreme sizes
and modes, animations, a crowd of faces), built for the server's MAX_IMAGE_PIXELS and
MAX_UPLOAD_BYTES. One ``uvicorn --factory app.main:serve_app`` process (:func:`bench.service.run_server`) serves
all of it:

* each case alone to ``POST /predict`` (face detection on), then
* all of them again, shuffled (``--seed``) into batches of ``--batch-size``, to
  ``POST /predict/batch`` with ``detect=false``: the other code path, and files mixed.

A case **fails** on a 5xx, a transport error or a timeout (``--timeout``: long, it only catches a
hang), a 4xx whose body is not one of the service's stable ``detail`` strings, a status its case
does not expect, or a batch entry that disagrees with ``/predict`` (another status, or not its
file name). The server must still answer ``/healthz`` at the end. Memory: the server's resident
set (``/proc/<pid>/status``) after one warm-up request, and after the corpus with its peak
(VmHWM, which includes start-up).

Writes ``bench/results/fuzz_corpus.json`` (``--output`` overrides): every case's outcome, the
status counts, the timings and the memory; prints a summary. Exit status 1 if any case failed.
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from app.settings import BUNDLED_MODEL, Settings
from bench.machine import RESULTS_DIR, command_line, memory_mib, write_result
from bench.service import parse_env, run_server
from bench.timing import positive_int
from tests.utils.corpus import FILE_ERRORS, Case, build_corpus

log = logging.getLogger(__name__)

DEFAULTS = {name: Settings.model_fields[name].default for name in ("max_image_pixels", "max_upload_bytes", "max_batch_files")}


def outcome(status: int, body: Any) -> dict[str, Any]:
    """One answer, short: the status, and the detail of an error or the number of faces."""
    if status == 200 and isinstance(body, dict) and isinstance(body.get("faces"), list):
        return {"status": status, "faces": len(body["faces"])}
    detail = body.get("detail") if isinstance(body, dict) else None
    return {"status": status, "detail": detail if isinstance(detail, str) else repr(body)[:200]}


def problems(case: Case, answer: dict[str, Any]) -> list[str]:
    """What is wrong with ``answer`` to ``case`` (empty: nothing)."""
    status = answer["status"]
    if status >= 500 or status < 200:
        return [f"{status} {answer.get('detail')}"]
    found = []
    if status != 200 and answer.get("detail") not in FILE_ERRORS.get(status, set()):
        found.append(f"{status} with an unexpected detail {answer.get('detail')!r}")
    if status not in case.expect:
        found.append(f"{status} ({answer.get('detail', 'ok')}), expected one of {list(case.expect)}")
    return found


def post_one(client: httpx.Client, case: Case) -> dict[str, Any]:
    try:
        r = client.post("/predict", files={"file": (case.upload_name, case.data, case.content_type)})
    except httpx.HTTPError as exc:  # a hang (timeout) or the server gone
        return {"status": 0, "detail": f"{type(exc).__name__}: {exc}"}
    return outcome(r.status_code, _json(r))


def post_batch(client: httpx.Client, cases: list[Case]) -> tuple[int, list[dict[str, Any]]]:
    """The batch's status, and one answer per case (the batch's own error for each if it failed)."""
    parts = [("files", (case.upload_name, case.data, case.content_type)) for case in cases]
    try:
        r = client.post("/predict/batch", files=parts, params={"detect": "false"})
    except httpx.HTTPError as exc:
        return 0, [{"status": 0, "detail": f"{type(exc).__name__}: {exc}"}] * len(cases)
    body = _json(r)
    results = body.get("results") if isinstance(body, dict) else None
    if r.status_code != 200 or not isinstance(results, list) or len(results) != len(cases):
        return r.status_code, [outcome(r.status_code, body)] * len(cases)
    answers = []
    for result in results:
        if "error" in result:
            answer = {"status": result["error"]["status"], "detail": result["error"]["detail"]}
        else:
            answer = {"status": 200, "faces": len(result["faces"])}
        answers.append({**answer, "filename": result.get("filename")})
    return r.status_code, answers


def sent_name(case: Case) -> str:
    """The file name as it goes over the wire: httpx, like browsers (the WHATWG form encoding),
    escapes a double quote and line breaks in it, and the server gets it so."""
    return case.upload_name.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return {"detail": f"not JSON ({response.headers.get('content-type')}): {response.text[:200]!r}"}


def run_corpus(base_url: str, pid: int, cases: list[Case], batch_size: int, timeout: float, seed: int) -> dict[str, Any]:
    """Every case through ``/predict`` and ``/predict/batch`` of the server at ``base_url`` (process ``pid``)."""
    with httpx.Client(base_url=base_url, timeout=timeout) as client:
        warm = client.post("/predict", files={"file": ("warm.jpg", _warm_up_image(cases), "image/jpeg")})
        warm.raise_for_status()
        memory_warm = memory_mib(pid)

        started = time.perf_counter()
        single = [post_one(client, case) for case in cases]
        single_s = time.perf_counter() - started

        order = list(range(len(cases)))
        random.Random(seed).shuffle(order)
        batched: dict[int, dict[str, Any]] = {}
        batch_statuses: Counter[int] = Counter()
        started = time.perf_counter()
        for start in range(0, len(order), batch_size):
            members = order[start : start + batch_size]
            status, answers = post_batch(client, [cases[i] for i in members])
            batch_statuses[status] += 1
            batched.update(zip(members, answers, strict=True))
        batch_s = time.perf_counter() - started

        try:
            alive = client.get("/healthz").status_code == 200
        except httpx.HTTPError:
            alive = False
    memory_after = memory_mib(pid)

    records, failures = [], []
    for i, case in enumerate(cases):
        found = [f"/predict: {p}" for p in problems(case, single[i])]
        found += [f"/predict/batch: {p}" for p in problems(case, batched[i])]
        if batched[i]["status"] != single[i]["status"]:
            found.append(f"/predict/batch answered {batched[i]['status']} for it, /predict {single[i]['status']}")
        if batched[i].get("filename", sent_name(case)) != sent_name(case):
            found.append(f"/predict/batch named it {batched[i].get('filename')!r}, not {sent_name(case)!r}")
        failures += [f"{case.name}: {p}" for p in found]
        records.append(
            {"name": case.name, "bytes": len(case.data), "content_type": case.content_type, "expect": list(case.expect)}
            | {"predict": single[i], "batch": batched[i]}
        )
    if not alive:
        failures.append("the server did not answer /healthz after the corpus")
    return {
        "corpus": {"cases": len(cases), "bytes": sum(len(case.data) for case in cases)},
        "predict": {"statuses": _counts(a["status"] for a in single), "seconds": round(single_s, 2)},
        "batch": {
            "requests": sum(batch_statuses.values()),
            "request_statuses": _counts(batch_statuses.elements()),
            "file_statuses": _counts(a["status"] for a in batched.values()),
            "seconds": round(batch_s, 2),
        },
        "memory": {"after_warm_up": memory_warm, "after_corpus": memory_after},
        "server_alive": alive,
        "failures": failures,
        "cases": records,
    }


def _warm_up_image(cases: list[Case]) -> bytes:
    """The corpus's real photo: the warm-up runs detection and classification once, as a client would."""
    return next(case.data for case in cases if case.name == "jpeg_photo")


def _counts(statuses: Any) -> dict[str, int]:
    return {str(status): n for status, n in sorted(Counter(statuses).items())}


def summary(results: dict[str, Any]) -> str:
    memory = results["memory"]
    lines = [
        f"{results['corpus']['cases']} cases ({results['corpus']['bytes'] / 2**20:.1f} MiB)",
        f"POST /predict:        {results['predict']['statuses']} in {results['predict']['seconds']} s",
        f"POST /predict/batch:  {results['batch']['requests']} requests {results['batch']['request_statuses']}, "
        f"files {results['batch']['file_statuses']} in {results['batch']['seconds']} s",
        f"server RSS: {memory['after_warm_up']['rss_mib']:.0f} MiB after warm-up, "
        f"{memory['after_corpus']['rss_mib']:.0f} MiB after the corpus, peak {memory['after_corpus']['peak_rss_mib']:.0f} MiB",
        f"failures: {len(results['failures'])}",
        *(f"  {failure}" for failure in results["failures"]),
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", type=Path, default=BUNDLED_MODEL, help="checkpoint the service serves (default: the bundled one)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=8, help="files per /predict/batch request")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corruptions and of the batches' shuffle")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one request may take before it counts as a hang")
    parser.add_argument("--server-env", type=parse_env, action="append", default=[], help="KEY=VALUE for the server (repeatable)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "fuzz_corpus.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    server_env: dict[str, str] = dict(args.server_env)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    if not args.model.is_file():
        parser.error(f"--model {args.model}: no such checkpoint")
    limits = {name: int(server_env.get(name.upper(), default)) for name, default in DEFAULTS.items()}
    if args.batch_size > limits["max_batch_files"]:
        parser.error(f"--batch-size {args.batch_size} is over the server's MAX_BATCH_FILES ({limits['max_batch_files']})")
    cases = build_corpus(limits["max_image_pixels"], limits["max_upload_bytes"], seed=args.seed)
    log.info("%d cases; starting the server", len(cases))
    with (
        tempfile.TemporaryDirectory(prefix="bench-fuzz-") as tmp,
        run_server(args.model, Path(tmp) / "server.log", server_env) as server,
    ):
        results = run_corpus(server.base_url, server.process.pid, cases, args.batch_size, args.timeout, args.seed)
    settings = {"model": str(args.model), "batch_size": args.batch_size, "seed": args.seed, "timeout_s": args.timeout}
    results = {"settings": settings | {"server_env": server_env, "limits": limits}, **results}
    write_result(args.output, "fuzz_corpus", results, command_line("bench.fuzz_corpus", argv))
    print(summary(results))
    print(f"\nwritten to {args.output}")
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
