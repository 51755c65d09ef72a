"""The Cloud Monitoring alert policies and dashboard in monitoring/, checked with Google's own types.

Each file is parsed strictly (unknown fields, wrong types and unknown enum values raise) into
``google.cloud.monitoring_v3.AlertPolicy`` or ``google.cloud.monitoring_dashboard_v1.Dashboard``,
the messages ``gcloud alpha monitoring policies create --policy-from-file`` and ``gcloud monitoring
dashboards create --config-from-file`` send. Thresholds and filters are checked against what
monitoring/README.md promises, and every ``fer_*`` metric the dashboard queries against the
metrics app/metrics.py really exports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.cloud import monitoring_dashboard_v1, monitoring_v3
from google.protobuf import json_format

from app.metrics import Metrics
from tests.utils.gcloud import real_gcloud, usage_errors

MONITORING = Path(__file__).resolve().parents[1] / "monitoring"
SERVICE = "fer-api"  # the placeholder service name in every file
CHANNEL_PLACEHOLDER = "projects/PROJECT_ID/notificationChannels/CHANNEL_ID"
POLICY_FILES = sorted(MONITORING.glob("alert-*.json"))
GMP_TYPE = re.compile(r"prometheus\.googleapis\.com/(fer_[a-z0-9_]+)/([a-z]+)")
FER_NAME = re.compile(r"\bfer_[a-z0-9_]+")

Condition = monitoring_v3.AlertPolicy.Condition


def load_policy(path: Path) -> monitoring_v3.AlertPolicy:
    # proto-plus's from_json is json_format.Parse with ignore_unknown_fields=False: strict.
    return monitoring_v3.AlertPolicy.from_json(path.read_text())


def load_dashboard(text: str) -> monitoring_dashboard_v1.Dashboard:
    return monitoring_dashboard_v1.Dashboard.from_json(text)


def filter_clauses(expr: str) -> dict[str, str]:
    """``a = "x" AND b = "y"`` -> {"a": "x", "b": "y"}; the filters here are plain conjunctions."""
    clauses = [c.strip() for c in re.split(r"\s+AND\s+", expr)]
    out = {}
    for clause in clauses:
        m = re.fullmatch(r'([\w.]+)\s*=\s*"([^"]*)"', clause)
        assert m, f"unexpected filter clause {clause!r} in {expr!r}"
        out[m.group(1)] = m.group(2)
    return out


def only_condition(policy: monitoring_v3.AlertPolicy) -> Condition:
    assert len(policy.conditions) == 1
    return policy.conditions[0]


# ---------------------------------------------------------------------------- alert policies


def test_there_are_the_three_policies() -> None:
    assert [p.name for p in POLICY_FILES] == ["alert-5xx.json", "alert-cpu.json", "alert-latency.json"]


@pytest.mark.parametrize("path", POLICY_FILES, ids=lambda p: p.name)
def test_policy_parses_and_has_the_common_settings(path: Path) -> None:
    policy = load_policy(path)
    assert policy.display_name.startswith(f"{SERVICE}: ")
    assert policy.enabled is True
    assert policy.combiner == monitoring_v3.AlertPolicy.ConditionCombinerType.OR
    assert list(policy.notification_channels) == [CHANNEL_PLACEHOLDER]
    assert policy.user_labels["service"] == SERVICE
    assert policy.documentation.mime_type == "text/markdown"
    assert policy.documentation.subject and len(policy.documentation.content) > 200
    assert f"monitoring/{path.name}" in policy.documentation.content  # says where to change it
    assert policy.alert_strategy.auto_close.total_seconds() == 1800
    # The service placeholder is in the condition itself, not only in the names.
    condition = only_condition(policy)
    query = condition.condition_threshold.filter or condition.condition_prometheus_query_language.query
    assert SERVICE in query


def test_cpu_policy_is_p99_utilisation_above_80_percent_for_5_minutes() -> None:
    threshold = only_condition(load_policy(MONITORING / "alert-cpu.json")).condition_threshold
    assert filter_clauses(threshold.filter) == {
        "resource.type": "cloud_run_revision",
        "resource.labels.service_name": SERVICE,
        "metric.type": "run.googleapis.com/container/cpu/utilizations",
    }
    assert threshold.comparison == monitoring_v3.ComparisonType.COMPARISON_GT
    assert threshold.threshold_value == pytest.approx(0.8)  # utilizations is a 0..1 fraction
    assert threshold.duration.total_seconds() == 300
    assert threshold.trigger.count == 1
    assert_service_p99(threshold)


def test_latency_policy_is_p99_above_1000_ms_for_5_minutes() -> None:
    threshold = only_condition(load_policy(MONITORING / "alert-latency.json")).condition_threshold
    assert filter_clauses(threshold.filter) == {
        "resource.type": "cloud_run_revision",
        "resource.labels.service_name": SERVICE,
        "metric.type": "run.googleapis.com/request_latencies",
    }
    assert threshold.comparison == monitoring_v3.ComparisonType.COMPARISON_GT
    assert threshold.threshold_value == 1000  # request_latencies is in ms
    assert threshold.duration.total_seconds() == 300
    assert_service_p99(threshold)


def assert_service_p99(threshold: Condition.MetricThreshold) -> None:
    """Both metrics are DELTA distributions: each minute's distribution (ALIGN_DELTA) of all the
    service's revisions merged, then its 99th percentile: one series for the whole service."""
    Aligner, Reducer = monitoring_v3.Aggregation.Aligner, monitoring_v3.Aggregation.Reducer
    (agg,) = threshold.aggregations
    assert agg.alignment_period.total_seconds() == 60
    assert agg.per_series_aligner == Aligner.ALIGN_DELTA
    assert agg.cross_series_reducer == Reducer.REDUCE_PERCENTILE_99
    assert list(agg.group_by_fields) == ["resource.label.service_name"]


def test_5xx_policy_is_a_ratio_above_1_percent_for_5_minutes() -> None:
    promql = only_condition(load_policy(MONITORING / "alert-5xx.json")).condition_prometheus_query_language
    assert promql.duration.total_seconds() == 300
    assert promql.evaluation_interval.total_seconds() == 60
    m = re.fullmatch(r"sum\(rate\((.+?)\[5m\]\)\) / sum\(rate\((.+?)\[5m\]\)\) > 0\.01", promql.query)
    assert m, promql.query
    numerator, denominator = m.groups()
    selector = 'run_googleapis_com:request_count{{monitored_resource="cloud_run_revision",service_name="{}"{}}}'
    assert numerator == selector.format(SERVICE, ',response_code_class="5xx"')
    assert denominator == selector.format(SERVICE, "")  # all requests, whatever their class


def test_parse_is_strict_about_unknown_fields() -> None:
    raw = json.loads((MONITORING / "alert-cpu.json").read_text())
    raw["conditions"][0]["conditionThreshold"]["thresholdPercent"] = 80  # no such field
    with pytest.raises(json_format.ParseError, match="thresholdPercent"):
        monitoring_v3.AlertPolicy.from_json(json.dumps(raw))
    # The same through protobuf's own parser, as the brief's alternative spells it.
    with pytest.raises(json_format.ParseError, match="thresholdPercent"):
        json_format.Parse(json.dumps(raw), monitoring_v3.AlertPolicy.pb()())


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (("conditions", 0, "conditionThreshold", "thresholdValue"), "high", "thresholdValue"),
        (("conditions", 0, "conditionThreshold", "comparison"), "COMPARISON_ABOVE", "COMPARISON_ABOVE"),
        (("conditions", 0, "conditionThreshold", "duration"), "5m", "duration"),
        (("enabled",), "yes", "enabled"),
    ],
    ids=["number-as-word", "unknown-enum", "duration-not-in-seconds", "bool-as-string"],
)
def test_parse_is_strict_about_types(path: tuple[Any, ...], value: Any, match: str) -> None:
    raw = json.loads((MONITORING / "alert-cpu.json").read_text())
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(json_format.ParseError, match=match):
        monitoring_v3.AlertPolicy.from_json(json.dumps(raw))


# ---------------------------------------------------------------------------- dashboard


def exported_metrics() -> tuple[set[str], set[str], set[str]]:
    """The app's ``fer_*`` metrics: (family names, PromQL series names, Managed Prometheus types)."""
    families, series, types = set(), set(), set()
    for family in Metrics().registry.collect():
        if not family.name.startswith("fer_"):
            continue
        families.add(family.name)
        if family.type == "counter":
            series.add(family.name + "_total")
            types.add(f"prometheus.googleapis.com/{family.name}_total/counter")
        elif family.type == "histogram":
            series |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
            types.add(f"prometheus.googleapis.com/{family.name}/histogram")
        elif family.type == "gauge":
            series.add(family.name)
            types.add(f"prometheus.googleapis.com/{family.name}/gauge")
        else:
            raise AssertionError(f"{family.name}: add the Managed Prometheus naming of a {family.type} here")
    return families, series, types


def queries(node: Any) -> tuple[list[str], list[str]]:
    """(PromQL queries, Monitoring filters) anywhere in a dashboard's JSON."""
    promql: list[str] = []
    filters: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "prometheusQuery":
                promql.append(value)
            elif key == "filter":
                filters.append(value)
            else:
                p, f = queries(value)
                promql += p
                filters += f
    elif isinstance(node, list):
        for item in node:
            p, f = queries(item)
            promql += p
            filters += f
    return promql, filters


def unknown_metric_names(dashboard_text: str) -> list[str]:
    """Every ``fer_*`` name the dashboard uses that app/metrics.py does not export."""
    families, series, types = exported_metrics()
    promql, filters = queries(json.loads(dashboard_text))
    problems = [f"PromQL {name}" for q in promql for name in FER_NAME.findall(q) if name not in series]
    for f in filters:
        problems += [f"metric type {m.group(0)}" for m in GMP_TYPE.finditer(f) if m.group(0) not in types]
    # Titles and text name metrics too: a family or a series name, never a stale one.
    problems += [f"text {name}" for name in FER_NAME.findall(dashboard_text) if name not in families | series]
    return sorted(set(problems))


def dashboard_text() -> str:
    return (MONITORING / "dashboard.json").read_text()


def test_dashboard_parses_and_tiles_fit_the_grid() -> None:
    dashboard = load_dashboard(dashboard_text())
    assert dashboard.display_name.startswith(SERVICE)
    layout = dashboard.mosaic_layout
    assert layout.columns == 48
    cells: set[tuple[int, int]] = set()
    for tile in layout.tiles:
        assert tile.x_pos + tile.width <= layout.columns, tile.widget.title
        area = {(x, y) for x in range(tile.x_pos, tile.x_pos + tile.width) for y in range(tile.y_pos, tile.y_pos + tile.height)}
        assert not cells & area, f"{tile.widget.title} overlaps another tile"
        cells |= area
        for data_set in tile.widget.xy_chart.data_sets:
            query = data_set.time_series_query
            assert query.prometheus_query or query.time_series_filter.filter, tile.widget.title


def test_dashboard_parse_is_strict() -> None:
    raw = json.loads(dashboard_text())
    raw["mosaicLayout"]["tiles"][1]["widget"]["xyChart"]["dataSets"][0]["plotType"] = "PIE"
    with pytest.raises(json_format.ParseError, match="PIE"):
        load_dashboard(json.dumps(raw))
    raw = json.loads(dashboard_text())
    raw["mosaicLayout"]["tiles"][1]["widget"]["chart"] = {}
    with pytest.raises(json_format.ParseError, match="chart"):
        load_dashboard(json.dumps(raw))


def test_dashboard_shows_cloud_run_metrics_of_the_service() -> None:
    _, filters = queries(json.loads(dashboard_text()))
    run_metrics = set()
    for f in filters:
        clauses = filter_clauses(f)
        if clauses["metric.type"].startswith("run.googleapis.com/"):
            assert clauses["resource.type"] == "cloud_run_revision"
            assert clauses["resource.labels.service_name"] == SERVICE
            run_metrics.add(clauses["metric.type"].removeprefix("run.googleapis.com/"))
        else:  # the app's own metrics, from the Managed Prometheus sidecar: namespace = service
            assert clauses["resource.type"] == "prometheus_target"
            assert clauses["resource.labels.namespace"] == SERVICE
    assert run_metrics == {
        "request_count",
        "request_latencies",
        "container/instance_count",
        "container/cpu/utilizations",
        "container/memory/utilizations",
    }


def test_dashboard_shows_the_service_metrics_that_exist() -> None:
    assert unknown_metric_names(dashboard_text()) == []
    promql, filters = queries(json.loads(dashboard_text()))
    used = {name for q in promql for name in FER_NAME.findall(q)} | {m.group(1) for f in filters for m in GMP_TYPE.finditer(f)}
    for wanted in [
        "fer_http_requests_total",
        "fer_http_request_duration_seconds_bucket",
        "fer_inference_duration_seconds_bucket",
        "fer_inference_duration_seconds",  # the heatmap, by its Managed Prometheus type
        "fer_inference_queue_wait_seconds_bucket",
        "fer_predictions_total",
        "fer_model_info",
    ]:
        assert wanted in used, wanted
    for q in promql:  # one service's series only
        for selector in re.findall(r"fer_[a-z0-9_]+\{([^}]*)\}", q):
            assert f'namespace="{SERVICE}"' in selector, q


def test_a_renamed_metric_is_caught() -> None:
    renamed = dashboard_text().replace("fer_predictions_total", "fer_prediction_total")
    assert unknown_metric_names(renamed) == ["PromQL fer_prediction_total", "text fer_prediction_total"]
    retyped = dashboard_text().replace("fer_inference_duration_seconds/histogram", "fer_inference_duration_seconds/gauge")
    assert unknown_metric_names(retyped) == ["metric type prometheus.googleapis.com/fer_inference_duration_seconds/gauge"]


def test_dashboard_thresholds_match_the_alerts() -> None:
    dashboard = load_dashboard(dashboard_text())
    lines = {t.value for tile in dashboard.mosaic_layout.tiles for t in tile.widget.xy_chart.thresholds}
    cpu = only_condition(load_policy(MONITORING / "alert-cpu.json")).condition_threshold.threshold_value
    latency = only_condition(load_policy(MONITORING / "alert-latency.json")).condition_threshold.threshold_value
    ratio = float(
        only_condition(load_policy(MONITORING / "alert-5xx.json")).condition_prometheus_query_language.query.split(">")[-1]
    )
    assert lines == {cpu, latency, ratio}


# ---------------------------------------------------------------------------- apply.sh


def run_apply(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(MONITORING / "apply.sh")],
        env={**os.environ, "OUT_DIR": str(tmp_path / "out"), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def recording_gcloud(tmp_path: Path) -> Path:
    """A ``gcloud`` on PATH that appends its argv (JSON, one line per call) to $FAKE_LOG and answers
    every ``list`` with $FAKE_EXISTING: what the script does, without a Google Cloud project.
    Whether the real gcloud accepts those command lines is :func:`test_apply_commands_parse_in_the_real_gcloud`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "gcloud"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "with open(os.environ['FAKE_LOG'], 'a') as log:\n"
        "    log.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "if 'list' in sys.argv:\n"
        "    print(os.environ.get('FAKE_EXISTING', ''), end='')\n"
    )
    script.chmod(0o755)
    return bin_dir


def apply_with(tmp_path: Path, recording_gcloud: Path, existing: str = "") -> list[list[str]]:
    """Runs apply.sh with :func:`recording_gcloud`; the gcloud command lines it ran."""
    log = tmp_path / "gcloud.log"
    log.unlink(missing_ok=True)
    env = {"PATH": f"{recording_gcloud}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log), "FAKE_EXISTING": existing}
    result = run_apply(tmp_path, **env, PROJECT_ID="p", CHANNEL_ID="9")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("python3") is None, reason="needs bash and python3")
def test_apply_creates_then_updates(tmp_path: Path, recording_gcloud: Path) -> None:
    out = tmp_path / "out"
    calls = apply_with(tmp_path, recording_gcloud)
    create_policy = ["alpha", "monitoring", "policies", "create", "--project=p"]
    assert [c for c in calls if "create" in c] == [
        *([*create_policy, f"--policy-from-file={out / f.name}"] for f in POLICY_FILES),
        ["monitoring", "dashboards", "create", "--project=p", f"--config-from-file={out / 'dashboard.json'}"],
    ]
    list_cpu = ["alpha", "monitoring", "policies", "list", "--project=p"]
    list_cpu += ['--filter=displayName="fer-api: CPU utilisation above 80%"', "--format=value(name)"]
    assert list_cpu in calls

    calls = apply_with(tmp_path, recording_gcloud, existing="projects/p/alertPolicies/42")
    assert not [c for c in calls if "create" in c]
    assert sum(c[:5] == ["alpha", "monitoring", "policies", "update", "projects/p/alertPolicies/42"] for c in calls) == 3
    assert sum(c[:3] == ["monitoring", "dashboards", "update"] for c in calls) == 1


@pytest.mark.slow
@pytest.mark.skipif(real_gcloud() is None, reason="needs the Google Cloud CLI (Debian: google-cloud-cli)")
def test_apply_commands_parse_in_the_real_gcloud(tmp_path: Path, recording_gcloud: Path) -> None:
    """Every command line apply.sh runs, on both paths (create, update), is one the installed
    gcloud accepts: command groups on the right release track, flags that exist, files it can read."""
    gcloud = real_gcloud()
    assert gcloud is not None
    calls = apply_with(tmp_path, recording_gcloud)
    calls += apply_with(tmp_path, recording_gcloud, existing="projects/p/alertPolicies/42")
    assert usage_errors(gcloud, calls) == []
    # The check can fail: the GA track has no alert policies in gcloud 528.
    (policy_list, *_) = calls
    assert policy_list[:4] == ["alpha", "monitoring", "policies", "list"]
    (error,) = usage_errors(gcloud, [policy_list[1:]])
    assert "Invalid choice: 'policies'" in error


def test_apply_refuses_odd_values(tmp_path: Path) -> None:
    result = run_apply(tmp_path, DRY_RUN="1", PROJECT_ID="p", SERVICE="x/g;s")
    assert result.returncode == 2 and "unexpected characters" in result.stderr
    assert run_apply(tmp_path, DRY_RUN="1", PROJECT_ID="").returncode != 0  # required


@pytest.mark.parametrize("channel", ["9", ""], ids=["channel", "no-channel"])
def test_rendered_files_parse_for_the_project_and_service(tmp_path: Path, channel: str) -> None:
    out = tmp_path / "rendered"
    argv = ["--project", "p", "--service", "fer-staging", "--channel-id", channel, "--out-dir", str(out)]
    result = subprocess.run([sys.executable, str(MONITORING / "render.py"), *argv], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == str(out), result.stderr
    for path in POLICY_FILES:
        policy = load_policy(out / path.name)  # Google's own types, strict: still a valid policy
        assert list(policy.notification_channels) == (["projects/p/notificationChannels/9"] if channel else [])
        assert policy.display_name.startswith("fer-staging: ") and SERVICE not in (out / path.name).read_text()
    dashboard = (out / "dashboard.json").read_text()
    assert load_dashboard(dashboard).display_name.startswith("fer-staging") and SERVICE not in dashboard


def test_apply_creates_only_the_committed_policies(tmp_path: Path, recording_gcloud: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "alert-old.json").write_text('{"displayName": "a policy since deleted"}')  # an earlier run's
    calls = apply_with(tmp_path, recording_gcloud)
    assert not [c for c in calls if any("alert-old" in arg for arg in c)]


def test_render_keeps_the_committed_files() -> None:
    result = subprocess.run(
        [sys.executable, str(MONITORING / "render.py"), "--project", "p", "--out-dir", str(MONITORING)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "not the folder of the committed files" in result.stderr
