"""The Grafana dashboards: generated, valid against Grafana's schema, and naming only real metrics.

Grafana cannot run here; these tests check the dashboards' JSON. Running every panel query
against a real Prometheus fed by the exporter is the bundle's integration test, which uses
`panel_queries()` and `variable_queries()` from grafana/dashboards.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from exporter.config import HealthConfig
from grafana import dashboards as generator

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = Path(__file__).parent / "fixtures" / "grafana-dashboard-v11.6.jsonschema.json"
ALERT_RULES = ROOT / "prometheus" / "rules" / "llm-alerts.yml"
# `> 0.10` in an alert's expression: its threshold (not `>=`, nor `== 0` of an `unless`).
ABOVE = re.compile(r"(?<![<>=!])>\s*([0-9]+(?:\.[0-9]+)?)(?![0-9.])")
CATALOGUE = ROOT / "docs" / "metrics.md"
ROW = re.compile(r"^\| `([a-z_:]+)` \| (\w+) \| ([^|]*) \|")
METRIC = re.compile(r"llm_[a-z_]+")
# A metric name and its label matchers, if any: `llm_x{a="b", c=~"d"}`.
SELECTOR = re.compile(r"(llm_[a-z_]+)\s*(\{[^}]*\})?")
RANGE = re.compile(r"\[([^\]]*)\]")
RANGE_FUNCTION = re.compile(r"\b(rate|irate|increase)\s*\(")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# The exporter's filters every selector carries, and the labels every aggregation keeps.
EXPORTER_FILTERS = ('cluster=~"$cluster"', 'job=~"$job"', 'instance=~"$instance"')
EXPORTER_LABELS = ("cluster", "job", "instance")
# `by (...)`, `on (...)` and `ignoring (...)` label lists, and aggregations over everything.
GROUPING = re.compile(r"\b(by|on|ignoring) \(([^)]*)\)")
TOTAL = re.compile(r"\b(sum|max|min|avg|count)\(")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

DASHBOARDS = generator.load()


def catalogue() -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (type, label names) from docs/metrics.md."""
    rows = {}
    for line in CATALOGUE.read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match:
            rows[match.group(1)] = (
                match.group(2),
                frozenset(re.findall(r"`(\w+)`", match.group(3))),
            )
    return rows


METRICS = catalogue()
HISTOGRAMS = {name for name, (kind, _) in METRICS.items() if kind == "histogram"}


def base_name(name: str) -> str:
    """A histogram series' metric name (`_bucket`, `_sum`, `_count` dropped); others unchanged."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in HISTOGRAMS:
            return name.removesuffix(suffix)
    return name


def every_query() -> list[tuple[str, str, str]]:
    """(dashboard uid, where, PromQL) of every panel target and query variable."""
    found = []
    for uid, dashboard in DASHBOARDS.items():
        found += [
            (uid, f"panel {title!r}", expr) for title, expr in generator.panel_queries(dashboard)
        ]
        found += [(uid, f"variable {name}", q) for name, q in generator.variable_queries(dashboard)]
    return found


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return list(generator.iter_panels(dashboard))


# (a) generated ------------------------------------------------------------------------------


def test_the_committed_json_is_what_the_generator_writes() -> None:
    assert generator.stale() == [], "run: python grafana/dashboards.py"
    assert sorted(DASHBOARDS) == sorted(generator.UIDS)
    built = generator.build_dashboards()
    for name, text in generator.render().items():
        assert text.endswith("}\n") and text.startswith('{\n  "'), f"{name}: 2-space indent"
        assert json.loads(text) == built[name.removesuffix(".json")] == DASHBOARDS[name[:-5]]


def test_the_generator_output_is_deterministic() -> None:
    assert generator.render() == generator.render()


def test_check_exits_1_when_a_dashboard_differs(tmp_path: Path) -> None:
    for name, text in generator.render().items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert generator.stale(tmp_path) == []
    edited = tmp_path / "llm-models.json"
    edited.write_text(edited.read_text(encoding="utf-8").replace("LLM Models", "Models"))
    (tmp_path / "old.json").write_text("{}\n")
    assert generator.stale(tmp_path) == ["llm-models.json", "old.json"]


def test_the_check_flag_of_the_script() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "grafana" / "dashboards.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


# (b) valid against Grafana's schema --------------------------------------------------------


@pytest.mark.parametrize("uid", generator.UIDS)
def test_the_dashboard_validates_against_grafanas_schema(uid: str) -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
        for error in validator.iter_errors(DASHBOARDS[uid])
        for e in (error.context or [error])
    ]
    assert errors == []


# (c) structure -----------------------------------------------------------------------------


def test_uids_titles_and_file_names_are_stable() -> None:
    titles = {uid: d["title"] for uid, d in DASHBOARDS.items()}
    assert titles == {
        "llm-overview": "LLM Overview",
        "llm-performance": "LLM Performance",
        "llm-traffic": "LLM Traffic",
        "llm-resources": "LLM Resources",
        "llm-models": "LLM Models",
    }
    files = sorted(p.name for p in generator.OUT_DIR.glob("*.json"))
    assert files == sorted(f"{uid}.json" for uid in generator.UIDS)


@pytest.mark.parametrize("uid", generator.UIDS)
def test_the_variables(uid: str) -> None:
    """The datasource, then the exporter (cluster, job, instance), then provider and model,
    each offering the values the ones before it allow."""
    variables = {v["name"]: v for v in DASHBOARDS[uid]["templating"]["list"]}
    assert list(variables) == ["datasource", "cluster", "job", "instance", "provider", "model"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    exporter = 'cluster=~"$cluster", job=~"$job", instance=~"$instance"'
    assert {name: v["query"] for name, v in variables.items() if name != "datasource"} == {
        "cluster": "label_values(llm_provider_up, cluster)",
        "job": 'label_values(llm_provider_up{cluster=~"$cluster"}, job)',
        "instance": 'label_values(llm_provider_up{cluster=~"$cluster", job=~"$job"}, instance)',
        "provider": f"label_values(llm_provider_up{{{exporter}}}, provider)",
        "model": f'label_values(llm_model_info{{{exporter}, provider=~"$provider"}}, model)',
    }
    for name, variable in variables.items():
        if name == "datasource":
            continue
        assert variable["type"] == "query"
        assert variable["datasource"] == DATASOURCE
        assert variable["multi"] is True and variable["includeAll"] is True
        # All is `.*`, not the list of the values: for `cluster`, which has no values where
        # the series carry no such label, `cluster=~".*"` still matches every series.
        assert variable["allValue"] == ".*", name
        assert variable["current"]["value"] == ["$__all"], name
        assert variable.get("hide", 0) == 0, name


@pytest.mark.parametrize("uid", generator.UIDS)
def test_every_panel_and_target_uses_the_datasource_variable(uid: str) -> None:
    for panel in panels(DASHBOARDS[uid]):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]


@pytest.mark.parametrize(("uid", "where", "expr"), every_query())
def test_every_range_is_the_rate_interval(uid: str, where: str, expr: str) -> None:
    ranges = RANGE.findall(expr)
    assert all(r == "$__rate_interval" for r in ranges), f"{uid} {where}: {expr}"
    assert len(RANGE_FUNCTION.findall(expr)) <= len(ranges), f"{uid} {where}: {expr}"


@pytest.mark.parametrize("uid", generator.UIDS)
def test_every_panel_has_a_unit(uid: str) -> None:
    for panel in panels(DASHBOARDS[uid]):
        assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]


@pytest.mark.parametrize("uid", generator.UIDS)
def test_panel_ids_are_unique_and_panels_fit_the_grid(uid: str) -> None:
    everything = [p for item in DASHBOARDS[uid]["panels"] for p in (item, *item.get("panels", []))]
    ids = [p["id"] for p in everything]
    assert len(ids) == len(set(ids))
    for panel in everything:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel.get("title")


def test_each_dashboard_links_to_the_others() -> None:
    tagged = {uid for uid, d in DASHBOARDS.items() if "llm" in d["tags"]}
    assert tagged == set(generator.UIDS)
    for uid, dashboard in DASHBOARDS.items():
        links = [link for link in dashboard["links"] if link["type"] == "dashboards"]
        assert [link["tags"] for link in links] == [["llm"]], uid
        assert links[0]["includeVars"] and links[0]["keepTime"], uid


@pytest.mark.parametrize("uid", generator.UIDS)
def test_firing_alerts_are_annotated(uid: str) -> None:
    annotations = DASHBOARDS[uid]["annotations"]["list"]
    exporter = ", ".join(EXPORTER_FILTERS)
    firing = f'ALERTS{{alertstate="firing", {exporter}}}'
    alerts = [a for a in annotations if a.get("expr") == firing]
    assert len(alerts) == 1, uid
    assert alerts[0]["datasource"] == DATASOURCE and alerts[0]["enable"] is True


@pytest.mark.parametrize(("uid", "where", "expr"), every_query())
def test_every_selector_is_filtered_by_provider_and_model(uid: str, where: str, expr: str) -> None:
    if where in ("variable cluster", "variable job", "variable instance", "variable provider"):
        return  # the lists of the exporters and of the providers themselves
    for name, matchers in SELECTOR.findall(expr):
        labels = METRICS[base_name(name)][1]
        if 'component="overall"' in matchers:
            continue  # the overall verdict has provider="": it covers every provider
        if "provider" in labels:
            assert 'provider=~"$provider"' in matchers, f"{uid} {where}: {name} in {expr}"
        if "model" in labels and not where.startswith("variable"):
            assert 'model=~"$model"' in matchers, f"{uid} {where}: {name} in {expr}"


@pytest.mark.parametrize(("uid", "where", "expr"), every_query())
def test_every_selector_is_filtered_by_the_exporter(uid: str, where: str, expr: str) -> None:
    """Every series is chosen by the $cluster, $job and $instance variables too (host-wide
    ones included), each variable's own list by those before it."""
    wanted = {
        "variable cluster": (),
        "variable job": EXPORTER_FILTERS[:1],
        "variable instance": EXPORTER_FILTERS[:2],
    }.get(where, EXPORTER_FILTERS)
    selectors = SELECTOR.findall(expr)
    assert selectors, f"{uid} {where}: {expr}"
    for name, matchers in selectors:
        for matcher in wanted:
            assert matcher in matchers, f"{uid} {where}: {name} without {matcher} in {expr}"


@pytest.mark.parametrize(("uid", "where", "expr"), every_query())
def test_aggregations_keep_the_exporter(uid: str, where: str, expr: str) -> None:
    """Two exporters that watch providers of the same name (in one cluster or two) never
    merge: every `by` and `on` keeps cluster, job and instance (`by (le)` of a heatmap, over
    everything selected, aside), and only the status bar's stats total everything."""
    for keyword, labels in GROUPING.findall(expr):
        names = [label.strip() for label in labels.split(",")]
        if keyword == "ignoring" or names == ["le"]:
            continue
        assert set(EXPORTER_LABELS) <= set(names), f"{uid} {where}: {keyword} ({labels})"
    if TOTAL.search(expr):
        (panel,) = [
            p
            for p in panels(DASHBOARDS[uid])
            if f"panel {p['title']!r}" == where and any(t["expr"] == expr for t in p["targets"])
        ]
        assert panel["type"] == "stat", f"{uid} {where}: a total outside the status bar: {expr}"


@pytest.mark.parametrize("uid", generator.UIDS)
def test_every_legend_that_names_a_provider_names_its_exporter(uid: str) -> None:
    for panel in panels(DASHBOARDS[uid]):
        for target in panel["targets"]:
            legend = target.get("legendFormat", "")
            if "{{provider}}" in legend:
                assert "{{instance}} {{provider}}" in legend, (panel["title"], legend)


def test_no_recording_rules_in_panels() -> None:
    for uid, where, expr in every_query():
        assert not re.search(r"\b[a-z_]+:[a-z_:]+", expr), f"{uid} {where}: {expr}"


# (d) colours follow the alerts -------------------------------------------------------------

# Stats and gauges coloured by something other than an alert's threshold, and why.
OWN_COLOURS = {
    "Providers up": "red when no provider answers, green when any does",
    "Model expiry": "orange when Ollama unloads the model within 5 minutes: no alert",
}


def alert_expressions() -> dict[str, list[str]]:
    """alert name -> the expressions of its rules in prometheus/rules/llm-alerts.yml."""
    found: dict[str, list[str]] = {}
    for group in yaml.safe_load(ALERT_RULES.read_text(encoding="utf-8"))["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                found.setdefault(rule["alert"], []).append(rule["expr"])
    return found


def threshold_steps(panel: dict[str, Any]) -> list[tuple[float, str]]:
    """(value, colour) of a panel's threshold steps."""
    steps = panel["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [])
    return [(step["value"], step["color"]) for step in steps]


def test_the_levels_are_the_alerts_thresholds() -> None:
    alerts = alert_expressions()
    health = HealthConfig()
    assert generator.LEVELS
    for title, level in generator.LEVELS.items():
        (expr,) = alerts[level.alert]
        assert [float(n) for n in ABOVE.findall(expr)] == [level.warning], (title, expr)
        if level.health is None:
            assert level.unhealthy is None, title
            continue
        default = getattr(health, level.health)
        # The alert and /health's `degraded` agree (the rules file says so), and red is
        # where /health calls it unhealthy.
        assert (default.degraded, default.unhealthy) == (level.warning, level.unhealthy), title


def test_the_status_bar_turns_orange_where_the_alert_fires() -> None:
    panels_by_title = {p["title"]: p for d in DASHBOARDS.values() for p in panels(d)}
    for title, level in generator.LEVELS.items():
        red = [] if level.unhealthy is None else [(level.unhealthy, "red")]
        expected = [(0, "green"), (level.warning, "orange"), *red]
        assert threshold_steps(panels_by_title[title]) == expected, title
        assert panels_by_title[title]["options"]["colorMode"] == "value", title


def test_every_coloured_stat_or_gauge_follows_an_alert_or_says_why_not() -> None:
    coloured = {
        panel["title"]
        for dashboard in DASHBOARDS.values()
        for panel in panels(dashboard)
        if panel["type"] in ("stat", "gauge", "bargauge") and len(threshold_steps(panel)) > 1
    }
    assert coloured == set(generator.LEVELS) | set(OWN_COLOURS)


def test_the_gateway_error_ratio_judges_the_requests_its_alert_judges() -> None:
    """The stat and the panel count as failed what LLMGatewayErrorRatioHigh counts, and leave
    out what it leaves out (abandoned, turned away by the queue, answered from the cache)."""
    (expr,) = alert_expressions()["LLMGatewayErrorRatioHigh"]
    assert expr.count(generator.GATEWAY_JUDGED) == 2, "the failed 5xx and the whole"
    assert all(selector in expr for selector in generator.GATEWAY_FAILED), expr
    # The stat, and the panel's failed share (its abandoned share is of all requests).
    queries = [
        query
        for title, query in generator.panel_queries(DASHBOARDS["llm-traffic"])
        if title in ("Gateway error ratio", "Failed and abandoned requests")
    ]
    assert len(queries) == 3
    assert sum(generator.GATEWAY_JUDGED in query for query in queries) == 2
    for query in queries:
        assert 'outcome!="abandoned"' not in query, query


def test_providers_up_is_red_at_zero_and_green_above() -> None:
    (panel,) = [p for p in panels(DASHBOARDS["llm-overview"]) if p["title"] == "Providers up"]
    assert threshold_steps(panel) == [(0, "red"), (1, "green")]
    assert panel["options"]["colorMode"] == "value"


def test_tokens_per_second_have_a_unit() -> None:
    titled = [
        panel
        for dashboard in DASHBOARDS.values()
        for panel in panels(dashboard)
        if "tokens/s" in panel["title"].lower()
    ]
    assert len(titled) >= 3
    for panel in titled:
        assert panel["fieldConfig"]["defaults"]["unit"] == "suffix:tokens/s", panel["title"]


def test_output_tokens_take_the_counters_else_the_gateway_else_the_probes() -> None:
    (panel,) = [p for p in panels(DASHBOARDS["llm-overview"]) if p["title"] == "Output tokens/s"]
    (target,) = panel["targets"]
    expr = target["expr"]
    assert expr.startswith("sum(") and expr.endswith(")")
    counters, gateway, probes = expr[len("sum(") : -1].split(" or ")
    per_provider = "sum by (cluster, job, instance, provider)"
    assert counters.startswith(f"{per_provider} (rate(llm_tokens_total{{")
    assert gateway.startswith(f"{per_provider} (rate(llm_gateway_tokens_total{{")
    assert 'type="output"' in counters and 'type="output"' in gateway
    assert probes.startswith(
        "avg by (cluster, job, instance, provider) (llm_probe_tokens_per_second{"
    )


# (uid, panel title): the metric of each source, in the order they are preferred.
BEST_SOURCE = {
    ("llm-overview", "p95 time to first token"): (
        "llm_time_to_first_token_seconds",
        "llm_gateway_time_to_first_token_seconds",
        "llm_probe_time_to_first_token_seconds",
    ),
    ("llm-performance", "Time to first token"): (
        "llm_time_to_first_token_seconds",
        "llm_gateway_time_to_first_token_seconds",
        "llm_probe_time_to_first_token_seconds",
    ),
    ("llm-performance", "Request duration"): (
        "llm_request_duration_seconds",
        "llm_gateway_request_duration_seconds",
        "llm_probe_duration_seconds",
    ),
    ("llm-performance", "Tokens/s by type"): ("llm_tokens_total", "llm_gateway_tokens_total"),
    ("llm-performance", "Requests running vs waiting"): (
        "llm_requests_running",
        "llm_gateway_requests_in_flight",
    ),
}


@pytest.mark.parametrize(("uid", "title"), sorted(BEST_SOURCE))
def test_best_source_panels_prefer_the_provider_then_the_gateway_then_the_probes(
    uid: str, title: str
) -> None:
    """As the llm-best-source recording rules: each source labelled, joined by `or`."""
    (panel,) = [p for p in panels(DASHBOARDS[uid]) if p["title"] == title]
    expr = panel["targets"][0]["expr"]
    parts = re.split(r" or (?:ignoring \(source\)|on \(cluster, job, instance, provider\)) ", expr)
    sources = ("provider", "gateway", "probe")[: len(BEST_SOURCE[uid, title])]
    assert len(parts) == len(sources), expr
    for part, source, metric in zip(parts, sources, BEST_SOURCE[uid, title], strict=True):
        assert f'"source", "{source}", "", "")' in part, part
        assert {base_name(n) for n in METRIC.findall(part)} == {metric}, part
    if len(sources) == 3 and "ignoring" in expr:
        # A quantile without observations (NaN) gives way to the next source.
        assert expr.count(">= 0") == 3, expr


# (e) every metric is catalogued ------------------------------------------------------------


@pytest.mark.parametrize(("uid", "where", "expr"), every_query())
def test_every_metric_is_in_the_catalogue(uid: str, where: str, expr: str) -> None:
    names = {base_name(name) for name in METRIC.findall(expr)}
    assert names, f"{uid} {where}: no llm_ metric in {expr}"
    assert sorted(names - set(METRICS)) == [], f"{uid} {where}: {expr}"


def test_the_brief_metrics_are_all_on_a_dashboard() -> None:
    used = {base_name(n) for _, _, expr in every_query() for n in METRIC.findall(expr)}
    wanted = {
        "llm_health_status", "llm_provider_up", "llm_provider_info", "llm_model_loaded",
        "llm_tokens_total", "llm_probe_duration_seconds", "llm_provider_requests_total",
        "llm_requests_running", "llm_requests_waiting", "llm_host_memory_used_bytes",
        "llm_probe_time_to_first_token_seconds", "llm_time_to_first_token_seconds",
        "llm_request_duration_seconds", "llm_probe_tokens_per_second",
        "llm_probe_time_per_output_token_seconds", "llm_probe_requests_total",
        "llm_host_cpu_usage_ratio", "llm_host_disk_used_bytes",
        "llm_provider_process_resident_memory_bytes", "llm_provider_process_cpu_seconds_total",
        "llm_provider_process_open_fds", "llm_gpu_memory_used_bytes", "llm_gpu_utilization_ratio",
        "llm_gpu_temperature_celsius", "llm_gpu_power_watts", "llm_model_memory_bytes",
        "llm_kv_cache_usage_ratio", "llm_slots", "llm_model_info", "llm_model_size_bytes",
        "llm_model_context_tokens", "llm_model_load_duration_seconds",
        "llm_model_expiry_timestamp_seconds",
    }  # fmt: skip
    assert sorted(wanted - used) == []


def test_every_lifecycle_metric_is_on_the_models_dashboard() -> None:
    """The lifecycle row: loads and unloads by cause, failures, load times, time loaded and
    since last use, pins, sleep, the policy's actions and the watcher's failed reads."""
    queries = generator.panel_queries(DASHBOARDS["llm-models"])
    used = {base_name(n) for _, expr in queries for n in METRIC.findall(expr)}
    lifecycle = {
        "llm_model_loads_total", "llm_model_unloads_total", "llm_model_load_failures_total",
        "llm_model_sleeping", "llm_model_load_duration_seconds",
        "llm_model_loaded_timestamp_seconds", "llm_model_last_used_timestamp_seconds",
        "llm_model_pinned", "llm_lifecycle_actions_total", "llm_lifecycle_reads_total",
        "llm_model_memory_bytes",
    }  # fmt: skip
    assert lifecycle <= set(METRICS)
    assert sorted(lifecycle - used) == []


def test_the_lifecycle_panels_say_what_the_lifecycle_alerts_do() -> None:
    """The thresholds the Models dashboard quotes are the rules' (THRASHING: both counts of
    LLMModelThrashing; LOAD_SLOW_SECONDS: LLMModelLoadSlow's), and the Pinned models panel
    calls loaded what LLMPinnedModelNotLoaded does: loaded, or held asleep."""
    alerts = alert_expressions()
    (thrashing,) = alerts["LLMModelThrashing"]
    assert [float(n) for n in ABOVE.findall(thrashing)] == [generator.THRASHING] * 2, thrashing
    assert 'cause="evicted"' in thrashing
    (slow,) = alerts["LLMModelLoadSlow"]
    assert [float(n) for n in ABOVE.findall(slow)] == [generator.LOAD_SLOW_SECONDS], slow
    (pinned,) = alerts["LLMPinnedModelNotLoaded"]
    by_title = dict(generator.panel_queries(DASHBOARDS["llm-models"]))
    for metric in ("llm_model_pinned", "llm_model_loaded", "llm_model_sleeping"):
        assert metric in pinned and metric in by_title["Pinned models"], metric
    descriptions = {p["title"]: p["description"] for p in panels(DASHBOARDS["llm-models"])}
    assert (
        f"more than {generator.THRASHING} times" in descriptions["Thrashing: evicted and reloaded"]
    )
    assert f"passes {generator.LOAD_SLOW_SECONDS:g} s" in descriptions["Model load duration"]


def test_every_gateway_metric_is_on_the_traffic_dashboard() -> None:
    gateway = {name for name in METRICS if name.startswith("llm_gateway_")}
    queries = generator.panel_queries(DASHBOARDS["llm-traffic"])
    used = {base_name(n) for _, expr in queries for n in METRIC.findall(expr)}
    assert gateway and sorted(gateway - used) == []


def test_clients_the_gateway_cannot_name_are_shown_as_unattributed() -> None:
    by_client = [
        expr
        for title, expr in generator.panel_queries(DASHBOARDS["llm-traffic"])
        if "by client" in title
    ]
    assert len(by_client) == 2
    for expr in by_client:
        assert expr.startswith("label_replace(") and expr.endswith(
            f', "client", "{generator.UNATTRIBUTED}", "client", "")'
        ), expr


# the helpers the integration test uses -----------------------------------------------------


def test_panel_and_variable_queries_list_every_target() -> None:
    for uid, dashboard in DASHBOARDS.items():
        targets = sum(len(p["targets"]) for p in panels(dashboard))
        queries = generator.panel_queries(dashboard)
        assert len(queries) == targets > 0, uid
        assert all(isinstance(t, str) and isinstance(e, str) for t, e in queries)
        assert [name for name, _ in generator.variable_queries(dashboard)] == [
            "cluster",
            "job",
            "instance",
            "provider",
            "model",
        ]


def test_the_provisioning_matches_the_compose_mounts() -> None:
    yaml = pytest.importorskip("yaml")
    datasources = yaml.safe_load(
        (ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    (source,) = datasources["datasources"]
    assert (source["uid"], source["type"], source["url"], source["isDefault"]) == (
        "prometheus",
        "prometheus",
        "http://prometheus:9090",
        True,
    )
    providers = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/llm.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["folder"] == "LLM"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool")
def test_promtool_parses_every_query(tmp_path: Path) -> None:
    """Each query, with the dashboard variables filled in, is PromQL that promtool accepts."""
    rules = []
    for index, (_, _, expr) in enumerate(every_query()):
        if expr.startswith("label_values("):
            continue
        filled = expr.replace("$__rate_interval", "1m")
        for name in ("cluster", "job", "instance", "provider", "model"):
            filled = filled.replace(f"${name}", ".*")
        rules.append({"record": f"dashboard_query_{index}", "expr": filled})
    path = tmp_path / "queries.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
