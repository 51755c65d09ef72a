"""`make observe`'s stack, checked with real parts (container images cannot be pulled here):
compose.yaml against the Compose Specification's schema, and the files it mounts; the alert rules
with promtool (syntax and unit tests: each alert fires on a busy series, not on a calm one); and
Debian's Prometheus, run on compose's own prometheus.yml and alerts.yml, scraping a live service."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
import yaml

from tests.conftest import free_port
from tests.utils.photos import photo_jpeg
from tests.utils.service import clean_service_env, uvicorn_server, write_model
from tests.utils.tools import require_tool

REPO = Path(__file__).parents[1]
LOCAL = REPO / "monitoring" / "local"
COMPOSE = REPO / "compose.yaml"
SCHEMA = Path(__file__).parent / "assets" / "compose-spec" / "compose-spec.json"
ALERTS = {"FerApiHighCpu", "FerApiHighLatency", "FerApi5xx"}
PINNED = re.compile(r"[a-z0-9./-]+:v?\d+(\.\d+)+")  # repository:version, never latest


def require(tool: str) -> str:
    return require_tool(tool, "Debian's prometheus package")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_follows_the_compose_specification() -> None:
    validator = jsonschema_rs.validator_for(json.loads(SCHEMA.read_text()))
    document = compose()
    assert [error.message for error in validator.iter_errors(document)] == []
    document["services"]["api"]["ports"] = "8080"  # the validator does catch a wrong shape
    assert not validator.is_valid(document)


def test_compose_mounts_the_files_the_tests_use_and_pins_its_images() -> None:
    services = compose()["services"]
    mounts = {
        name: {volume.split(":")[1]: (REPO / volume.split(":")[0]).resolve() for volume in service.get("volumes", [])}
        for name, service in services.items()
    }
    for name, files in mounts.items():
        for source in files.values():
            assert source.exists() and LOCAL in source.parents, (name, source)
    assert mounts["prometheus"]["/etc/prometheus/prometheus.yml"] == LOCAL / "prometheus.yml"
    assert mounts["prometheus"]["/etc/prometheus/alerts.yml"] == LOCAL / "alerts.yml"
    assert mounts["otel-collector"]["/etc/otelcol-contrib/collector.yaml"] == LOCAL / "collector.yaml"
    assert "--config=/etc/otelcol-contrib/collector.yaml" in services["otel-collector"]["command"]
    for name, service in services.items():
        if "image" in service and "build" not in service:
            assert PINNED.fullmatch(service["image"]), (name, service["image"])
    assert services["api"]["build"]["dockerfile"] == "api.Dockerfile"


def test_the_services_point_at_each_other() -> None:
    """The service's OTLP endpoint is the collector's HTTP receiver, the collector exports to
    Jaeger's OTLP/gRPC port, Prometheus scrapes the service on its PORT."""
    services = compose()["services"]
    collector = yaml.safe_load((LOCAL / "collector.yaml").read_text())
    receiver_port = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].rsplit(":", 1)[1]
    assert services["api"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://otel-collector:{receiver_port}"
    (exporter,) = collector["service"]["pipelines"]["traces"]["exporters"]
    assert collector["exporters"][exporter]["endpoint"] == "jaeger:4317"
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    prometheus = yaml.safe_load((LOCAL / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"api:{services['api']['environment']['PORT']}"]
    datasource = yaml.safe_load((LOCAL / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_the_grafana_dashboard_queries_metrics_the_service_exports() -> None:
    from app.metrics import Metrics

    exported = {metric.name for metric in Metrics().registry.collect()}
    dashboard = json.loads((LOCAL / "grafana/dashboards/fer-api.json").read_text())
    queried = {target["expr"] for panel in dashboard["panels"] for target in panel["targets"]}
    names = {word for expr in queried for word in _metric_names(expr)}
    assert names, queried
    unknown = {n for n in names if _family(n) not in exported}
    assert unknown == set()
    # Every fer_* metric the Cloud Monitoring dashboard shows is on the local one too.
    cloud = (REPO / "monitoring" / "dashboard.json").read_text()
    assert {_family(n) for n in _metric_names(cloud) if n.startswith("fer_")} <= {_family(n) for n in names}


def _metric_names(text: str) -> set[str]:
    return set(re.findall(r"\b(?:fer|process)_[a-z_]+", text))


def _family(name: str) -> str:
    """A sample's metric family: fer_x_bucket, fer_x_total... -> fer_x (prometheus_client's names)."""
    for suffix in ("_bucket", "_count", "_sum", "_total", "_created"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require("promtool"), *args], capture_output=True, text=True, check=False, cwd=LOCAL)


def test_promtool_accepts_the_configuration_and_the_rules() -> None:
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
        result = promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr
    rules = yaml.safe_load((LOCAL / "alerts.yml").read_text())
    assert {rule["alert"] for group in rules["groups"] for rule in group["rules"]} == ALERTS


def test_each_alert_fires_on_a_busy_series_and_not_on_a_calm_one(tmp_path: Path) -> None:
    result = promtool("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    # The unit tests can fail: with the CPU threshold raised above the busy series, they do.
    for name in ("alerts.yml", "alerts.test.yml"):
        shutil.copy(LOCAL / name, tmp_path / name)
    rules = tmp_path / "alerts.yml"
    rules.write_text(rules.read_text().replace("/ 2 > 0.8", "/ 2 > 0.95"))
    failed = subprocess.run(
        [require("promtool"), "test", "rules", "alerts.test.yml"], capture_output=True, text=True, cwd=tmp_path
    )
    assert failed.returncode != 0 and "FerApiHighCpu" in failed.stdout + failed.stderr


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    clean_service_env(monkeypatch)
    with uvicorn_server(tmp_path / "uvicorn.log", MODEL_URI=str(write_model(tmp_path / "model.onnx"))) as base:
        yield base


@pytest.fixture
def prometheus(tmp_path: Path, service: str) -> Iterator[str]:
    """Debian's Prometheus on compose's prometheus.yml and alerts.yml, the target the live service,
    scraping and evaluating every second; its base URL."""
    config = yaml.safe_load((LOCAL / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(LOCAL / rule) for rule in config["rule_files"]]
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [service.removeprefix("http://")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    args = [
        require("prometheus"),
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with (tmp_path / "prometheus.log").open("wb") as log, subprocess.Popen(args, stdout=log, stderr=log) as process:
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(timeout=30)


def poll(url: str, params: dict[str, str], ready: Any, timeout: float = 60.0) -> dict[str, Any]:
    """GET ``url`` until ``ready(json)`` holds; its JSON. Fails with the last answer at ``timeout``."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(url, params=params, timeout=5).json()
            if ready(last):
                return last
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.2)
    pytest.fail(f"{url} {params}: not ready in {timeout:.0f} s; last answer {last}")


def test_prometheus_scrapes_the_live_service_and_loads_the_alerts(service: str, prometheus: str) -> None:
    for _ in range(3):
        r = httpx.post(f"{service}/predict", files={"file": ("face.jpg", photo_jpeg("astronaut"), "image/jpeg")})
        assert r.status_code == 200, r.text
    query = 'sum(fer_http_requests_total{job="fer-api", route="/predict", status="200"})'
    answer = poll(
        f"{prometheus}/api/v1/query",
        {"query": query},
        lambda a: a["data"]["result"] and float(a["data"]["result"][0]["value"][1]) >= 3,
    )
    assert float(answer["data"]["result"][0]["value"][1]) == 3
    targets = httpx.get(f"{prometheus}/api/v1/targets").json()["data"]["activeTargets"]
    assert [(t["labels"]["job"], t["health"]) for t in targets] == [("fer-api", "up")]

    def evaluated(answer: dict[str, Any]) -> bool:  # health is "unknown" until the group's first evaluation
        rules = [rule for group in answer["data"]["groups"] for rule in group["rules"]]
        return {rule["name"] for rule in rules} == ALERTS and all(rule["health"] == "ok" for rule in rules)

    rules = poll(f"{prometheus}/api/v1/rules", {"type": "alert"}, evaluated)
    loaded = {rule["name"]: rule for group in rules["data"]["groups"] for rule in group["rules"]}
    assert set(loaded) == ALERTS
    assert all(rule["health"] == "ok" and rule["state"] == "inactive" for rule in loaded.values()), loaded


def phoenix_executable() -> str:
    """Arize Phoenix's `phoenix` (FER_PHOENIX, else on PATH): a real OTLP trace backend from PyPI,
    too large (~860 MB with its dependencies) for the project's own locks: installed in a venv of its
    own (docs/operations.md). Skipped without it, except in CI, which installs it (.ci/run)."""
    return os.environ.get("FER_PHOENIX") or require_tool("phoenix", "arize-phoenix, tests/assets/phoenix/")


@pytest.mark.slow
def test_a_requests_spans_reach_a_real_trace_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One POST /predict's spans, exported over OTLP/HTTP as the compose's service exports them,
    arrive in Phoenix whole: one trace, the request span at its root, each step beneath it."""
    port, grpc_port = free_port(), free_port()
    env = {**os.environ, "PHOENIX_WORKING_DIR": str(tmp_path / "phoenix"), "PHOENIX_PORT": str(port)}
    # On loopback only, and nothing fetched from outside (web fonts, telemetry pixels, a WASM download).
    env |= {"PHOENIX_GRPC_PORT": str(grpc_port), "PHOENIX_HOST": "127.0.0.1", "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false"}
    command = [phoenix_executable(), "serve"]
    with (tmp_path / "phoenix.log").open("wb") as log, subprocess.Popen(command, env=env, stdout=log, stderr=log) as phoenix:
        try:
            backend = f"http://127.0.0.1:{port}"
            poll(f"{backend}/v1/projects", {}, lambda a: bool(a["data"]), timeout=120)
            clean_service_env(monkeypatch)
            model = str(write_model(tmp_path / "model.onnx"))
            with uvicorn_server(
                tmp_path / "uvicorn.log",
                MODEL_URI=model,
                OTEL_EXPORTER_OTLP_ENDPOINT=backend,
                OTEL_SERVICE_NAME="fer-api",
                OTEL_BSP_SCHEDULE_DELAY="100",
            ) as service:
                r = httpx.post(f"{service}/predict", files={"file": ("face.jpg", photo_jpeg("astronaut"), "image/jpeg")})
                assert r.status_code == 200, r.text
                steps = {"POST /predict", "decode", "detect_faces", "classify", "batch", "preprocess", "inference"}
                answer = poll(
                    f"{backend}/v1/projects/default/spans", {"limit": "100"}, lambda a: steps <= {s["name"] for s in a["data"]}
                )
        finally:
            phoenix.terminate()
            phoenix.wait(timeout=30)
    spans = answer["data"]
    assert len({s["context"]["trace_id"] for s in spans}) == 1
    (root,) = [s for s in spans if s["parent_id"] is None]
    assert root["name"] == "POST /predict" and root["attributes"]["http.status_code"] == 200
    ids = {s["context"]["span_id"] for s in spans}
    assert all(s["parent_id"] in ids for s in spans if s is not root)
