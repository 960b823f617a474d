"""Generate the Grafana dashboards of llm-exporter with grafana-foundation-sdk (11.6 line).

    python grafana/dashboards.py           write grafana/dashboards/*.json
    python grafana/dashboards.py --check   exit 1 if the committed JSON differs from what it writes

Every panel query is a plain PromQL string in `targets[].expr` over the raw metrics of
docs/metrics.md (no recording rules), filtered by the exporter it comes from (`$cluster`,
`$job`, `$instance`) and by the `$provider` and `$model` variables where the series carries
those labels, with `$__rate_interval` in every range function. Aggregations keep cluster,
job and instance, and legends name the instance, so that two exporters that watch
providers of the same name show as two series. `panel_queries()` and `variable_queries()`
list them for the tests that run them.

Numbers that several sources fill (time to first token, request duration, tokens per
second, running requests) take, per provider and model, the provider's own series, else
the measuring gateway's, else the probes', with a `source` label saying which: the choice
of the llm-best-source recording rules, written out so that a dashboard needs no rules.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from grafana_foundation_sdk.builders import (
    bargauge,
    heatmap,
    prometheus,
    stat,
    statetimeline,
    table,
    timeseries,
)
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as builders
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as models
from grafana_foundation_sdk.models.heatmap import HeatmapColorMode, HeatmapColorScale
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

PanelBuilder = TypeVar("PanelBuilder")

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "dashboards"

TAG = "llm"
UIDS = ("llm-overview", "llm-performance", "llm-traffic", "llm-resources", "llm-models")

DATASOURCE = models.DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
# Selectors: every series is filtered by the exporter it comes from (its cluster, job and
# instance: the variables' "All" is `.*`, which also matches a series without the label, as
# every series is without `cluster` where Prometheus sees one cluster), every series with a
# `provider` label by it, and by `model` when it has one.
T = 'cluster=~"$cluster", job=~"$job", instance=~"$instance"'
P = f'{T}, provider=~"$provider"'
PM = f'{P}, model=~"$model"'
# The labels that tell exporters apart. Every aggregation per provider keeps them: two
# exporters (in one cluster or two) that each watch a provider called `ollama` never merge.
EXPORTER = "cluster, job, instance"

GREEN, ORANGE, RED, BLUE = "green", "orange", "red", "blue"
UP_DOWN = ((1, "up"), (0, "down"))
LOADED = ((1, "loaded"), (0, "on disk"))
# A pinned model: loaded, held asleep (its memory released, its server kept), or neither.
PINNED_STATES = (("1", "loaded", GREEN), ("2", "asleep", BLUE), ("0", "not loaded", RED))
# Grafana has no token unit; a custom suffix shows "42.1 tokens/s".
TOKENS_PER_SECOND = "suffix:tokens/s"
# Seconds of work per second of time (the provider's time the gateway's cache saved).
SECONDS_PER_SECOND = "suffix:s/s"
# Events per hour (a model evicted and loaded again).
PER_HOUR = "suffix:/h"
# The thresholds of the lifecycle alerts the Models dashboard names (prometheus/rules/
# llm-alerts.yml; tests/test_dashboards.py compares them): LLMModelThrashing fires when a
# model is evicted and loaded again more than THRASHING times within an hour, and
# LLMModelLoadSlow when the 95th percentile of its loads over an hour passes LOAD_SLOW_SECONDS.
THRASHING = 3
LOAD_SLOW_SECONDS = 30.0
# The gateway's requests the error ratio judges, as LLMGatewayErrorRatioHigh does: not
# those the client abandoned, nor those the gateway's queue turned away (its own 429 or
# 503, not the provider's failure), nor those answered from its cache (the provider never
# saw them).
GATEWAY_JUDGED = 'outcome!~"abandoned|rejected|cached"'
# Of those, the ones that failed: the client got a 5xx, or the provider broke off its
# answer or gave none in time. Each a selector of llm_gateway_requests_total; a series
# that is both (a 504 timeout) is counted once by `or`.
GATEWAY_FAILED = (f'{GATEWAY_JUDGED}, code="5xx"', 'outcome=~"upstream_failed|timeout"')
# Clients the gateway could not name (no client_header, no client_keys) have client="".
UNATTRIBUTED = "(unattributed)"


# --- thresholds ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    """Where a stat of the status bar changes colour, taken from the alert on the same number.

    Orange from the threshold of `alert` in prometheus/rules/llm-alerts.yml (a warning);
    red, if any, from the default `unhealthy` level of the exporter's `health.<health>`
    setting (exporter/config.py), where /health calls it unhealthy. tests/test_dashboards.py
    reads both files and fails when a number here differs from them.
    """

    alert: str
    warning: float
    health: str | None = None
    unhealthy: float | None = None


# One entry per coloured stat, by panel title: change a threshold here and in the rules.
LEVELS: dict[str, Level] = {
    "p95 probe latency": Level("LLMProbeLatencyHigh", 10.0, "probe_duration", 30.0),
    "Exporter error ratio": Level("LLMProviderErrorRatioHigh", 0.10),
    "Host memory used": Level("LLMHostMemoryHigh", 0.90, "memory_ratio", 0.97),
    "Gateway error ratio": Level("LLMGatewayErrorRatioHigh", 0.05),
}


# --- queries -------------------------------------------------------------------------------


def query(
    expr: str, legend: str = "", *, ref: str = "A", instant: bool = False
) -> prometheus.Dataquery:
    """A Prometheus target on the dashboard's datasource variable."""
    target = (
        prometheus.Dataquery()
        .datasource(DATASOURCE)
        .expr(expr)
        .ref_id(ref)
        .legend_format(legend or "__auto")
    )
    return target.instant() if instant else target.range()


def table_query(expr: str, ref: str) -> prometheus.Dataquery:
    """An instant query formatted as a table, one row per series."""
    return query(expr, ref=ref, instant=True).format(PromQueryFormat.TABLE)


def heatmap_query(expr: str) -> prometheus.Dataquery:
    """Histogram buckets formatted for a heatmap panel."""
    return query(expr, "{{le}}").format(PromQueryFormat.HEATMAP)


def quantile(
    q: float,
    metric: str,
    by: str = f"{EXPORTER}, provider, model",
    matchers: str = "",
    base: str = PM,
) -> str:
    """histogram_quantile over a histogram's buckets, filtered by provider and model (and
    matchers); base=P for a histogram without a model label."""
    labels = f"{by}, le" if by else "le"
    selector = f"{base}, {matchers}" if matchers else base
    return (
        f"histogram_quantile({q}, sum by ({labels}) (rate({metric}_bucket{{{selector}}}[{RATE}])))"
    )


def quantiles(
    metric: str, qs: tuple[float, ...] = (0.5, 0.95, 0.99), matchers: str = ""
) -> list[prometheus.Dataquery]:
    """One target per quantile, per provider and model."""
    return [
        query(
            quantile(q, metric, matchers=matchers),
            f"p{round(q * 100)} {{{{instance}}}} {{{{provider}}}}/{{{{model}}}}",
            ref=ref,
        )
        for q, ref in zip(qs, "ABCDEFGH", strict=False)
    ]


def best_of(*sources: tuple[str, str], on: str = "") -> str:
    """The first source that has a series for a provider and model, as the llm-best-source
    recording rules choose: each (source, expr) labelled source="...", joined by `or`.

    `or` keeps the left-hand series and adds a right-hand one only where the left has none
    with the same labels, `source` ignored; with `on`, only where it has none with the same
    values of those labels (on=f"{EXPORTER}, provider": one source for the whole provider).
    """
    join = f" or on ({on}) " if on else " or ignoring (source) "
    return join.join(f'label_replace({expr}, "source", "{name}", "", "")' for name, expr in sources)


def best_quantile(
    q: float, provider: str, gateway: str, probe: str, gateway_matchers: str = ""
) -> str:
    """A quantile per provider and model from the provider's histogram, else the gateway's,
    else the probes'; a source without observations in the window (NaN) gives way."""
    return best_of(
        ("provider", f"{quantile(q, provider)} >= 0"),
        ("gateway", f"{quantile(q, gateway, matchers=gateway_matchers)} >= 0"),
        ("probe", f"{quantile(q, probe)} >= 0"),
    )


def gateway_failed(by: str) -> str:
    """Failed requests per second through the gateway, summed by `by` (GATEWAY_FAILED)."""
    either = " or ".join(
        f"rate(llm_gateway_requests_total{{{PM}, {matchers}}}[{RATE}])"
        for matchers in GATEWAY_FAILED
    )
    return f"sum by ({by}) ({either})" if by else f"sum({either})"


def share(part: str, whole: str) -> str:
    """part / whole, two aggregations by the same labels: 0, not missing, where part has none."""
    return f"({part} or {whole} * 0) / {whole}"


def unattributed(expr: str) -> str:
    """expr with client="" (requests the gateway could not attribute) named UNATTRIBUTED."""
    return f'label_replace({expr}, "client", "{UNATTRIBUTED}", "client", "")'


# --- panels --------------------------------------------------------------------------------


def thresholds(base: str, *steps: tuple[float, str]) -> builders.ThresholdsConfig:
    """Absolute thresholds: a base colour, then (from value, colour) ...

    Grafana reads the first step's value as -Infinity whatever it is; the schema wants a
    number there (not the null Grafana itself saves), so the base step says 0.
    """
    return (
        builders.ThresholdsConfig()
        .mode(models.ThresholdsMode.ABSOLUTE)
        .steps(
            [models.Threshold(value=0, color=base)]
            + [models.Threshold(value=value, color=color) for value, color in steps]
        )
    )


def alert_thresholds(title: str) -> builders.ThresholdsConfig:
    """Green, orange from the alert's threshold, red from /health's unhealthy level (LEVELS)."""
    level = LEVELS[title]
    steps = [(level.warning, ORANGE)]
    if level.unhealthy is not None:
        steps.append((level.unhealthy, RED))
    return thresholds(GREEN, *steps)


def value_map(*entries: tuple[str, str, str]) -> list[models.ValueMapping]:
    """A value-to-text mapping: (value, text, colour) ..."""
    options = {
        value: models.ValueMappingResult(text=text, color=color, index=index)
        for index, (value, text, color) in enumerate(entries)
    }
    return [models.ValueMap(options=options)]


def panel(
    builder: PanelBuilder,
    title: str,
    description: str,
    unit: str,
    targets: list[prometheus.Dataquery],
    *,
    w: int = 12,
    h: int = 8,
) -> PanelBuilder:
    """The settings every panel shares: title, description, unit, datasource, targets, size."""
    settings: Any = builder  # every panel builder has these; each call updates it in place
    settings.title(title).description(description).unit(unit).datasource(DATASOURCE)
    settings.targets(targets).span(w).height(h)
    return builder


def stat_panel(
    title: str, description: str, unit: str, targets: list[prometheus.Dataquery], *, w: int
) -> stat.Panel:
    """A stat of the status bar: last value, coloured by thresholds, with a sparkline."""
    builder = (
        stat.Panel()
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .color_mode(common.BigValueColorMode.VALUE)
        .graph_mode(common.BigValueGraphMode.AREA)
        .text_mode(common.BigValueTextMode.AUTO)
        .justify_mode(common.BigValueJustifyMode.AUTO)
        .orientation(common.VizOrientation.AUTO)
    )
    return panel(builder, title, description, unit, targets, w=w, h=4)


def series_panel(
    title: str,
    description: str,
    unit: str,
    targets: list[prometheus.Dataquery],
    *,
    w: int = 12,
    h: int = 8,
    stacked: bool = False,
) -> timeseries.Panel:
    """A time series with a table legend showing the last and the largest values."""
    builder = (
        timeseries.Panel()
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["lastNotNull", "max"])
        )
        .tooltip(
            common_builders.VizTooltipOptions()
            .mode(common.TooltipDisplayMode.MULTI)
            .sort(common.SortOrder.DESCENDING)
        )
        .line_width(1)
        .fill_opacity(10 if not stacked else 40)
        .span_nulls(False)
    )
    if stacked:
        builder = builder.stacking(
            common_builders.StackingConfig().mode(common.StackingMode.NORMAL)
        )
    if unit == "percentunit":
        builder = builder.min(0).max(1)
    return panel(builder, title, description, unit, targets, w=w, h=h)


def events_panel(
    title: str, description: str, targets: list[prometheus.Dataquery], *, w: int = 12
) -> timeseries.Panel:
    """Events counted in each interval, as stacked bars: a timeline of what happened."""
    return (
        series_panel(title, description, "short", targets, w=w, stacked=True)
        .draw_style(common.GraphDrawStyle.BARS)
        .fill_opacity(80)
    )


def state_panel(
    title: str,
    description: str,
    targets: list[prometheus.Dataquery],
    states: list[models.ValueMapping],
    *,
    w: int = 12,
) -> statetimeline.Panel:
    """A state timeline: one band per series, coloured by the state its value maps to."""
    builder = (
        statetimeline.Panel()
        .show_value(common.VisibilityMode.NEVER)
        .merge_values(True)
        .row_height(0.9)
        .fill_opacity(70)
        .line_width(0)
    )
    return panel(builder, title, description, "none", targets, w=w).mappings(states)


def heatmap_panel(title: str, description: str, expr: str, *, w: int = 12) -> heatmap.Panel:
    """A heatmap of a histogram's buckets: the y axis in seconds, the cells counting observations."""
    builder = (
        heatmap.Panel()
        .calculate(False)
        .y_axis(heatmap.YAxisConfig().unit("s").axis_placement(common.AxisPlacement.LEFT))
        .cell_values(heatmap.CellValues().unit("short"))
        .color(
            heatmap.HeatmapColorOptions()
            .mode(HeatmapColorMode.SCHEME)
            .scheme("Spectral")
            .scale(HeatmapColorScale.EXPONENTIAL)
            .exponent(0.5)
            .steps(64)
            .reverse(False)
            .fill("dark-orange")
        )
        .rows_frame(heatmap.RowsHeatmapOptions().layout(common.HeatmapCellLayout.LE))
        .show_value(common.VisibilityMode.AUTO)
        .show_legend()
        .exemplars_color("rgba(255,0,255,0.7)")
        .filter_values(heatmap.FilterValueRange().le(1e-9))
        .mode(common.TooltipDisplayMode.SINGLE)
        .show_y_histogram()
    )
    # The cells count observations; the y axis (the buckets) is in seconds.
    return panel(builder, title, description, "short", [heatmap_query(expr)], w=w)


def row(title: str) -> builders.Row:
    """An open row: its panels follow it at the top level of the dashboard."""
    return builders.Row(title).collapsed(False)


def merge_table(
    title: str,
    description: str,
    targets: list[prometheus.Dataquery],
    *,
    hide: list[str],
    rename: dict[str, str],
    order: list[str],
    unit: str,
    states: list[models.ValueMapping],
    as_text: tuple[str, ...] = (),
    h: int = 8,
) -> table.Panel:
    """Instant table queries merged into one row per series, Time and helper columns hidden,
    the exporter's columns (cluster where there is one, job, instance) first.

    The dashboard schema only takes objects as field override values, so the table has no
    overrides: one unit for its numeric columns (`as_text` columns are turned into text to
    escape it), and states shown as label values coloured by `states` mappings.
    """
    excluded = {name: True for name in ["Time", *hide]}
    rename = {"cluster": "Cluster", "job": "Job", "instance": "Exporter", **rename}
    order = ["cluster", "job", "instance", *order]
    conversions = [{"targetField": name, "destinationType": "string"} for name in as_text]
    builder = table.Panel().with_transformation(
        models.DataTransformerConfig(id_val="merge", options={})
    )
    if conversions:
        builder = builder.with_transformation(
            models.DataTransformerConfig(
                id_val="convertFieldType", options={"conversions": conversions, "fields": {}}
            )
        )
    builder = (
        builder.with_transformation(
            models.DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": excluded,
                    "renameByName": rename,
                    "indexByName": {name: index for index, name in enumerate(order)},
                },
            )
        )
        .cell_height(common.TableCellHeight.SM)
        .cell_options(common.TableColorTextCellOptions())
        .show_header(True)
        .filterable(True)
        .mappings(states)
        .thresholds(thresholds("text"))
        .color_scheme(builders.FieldColor().mode(models.FieldColorModeId.THRESHOLDS))
    )
    return panel(builder, title, description, unit, targets, w=24, h=h)


def state_label(expr: str, states: tuple[tuple[int, str], ...]) -> str:
    """expr (a 0/1 vector) with a `state` label naming its value, for tables."""
    return " or ".join(
        f'label_replace({expr} == {value}, "state", "{name}", "", "")' for value, name in states
    )


# --- dashboards ----------------------------------------------------------------------------


def variable(name: str, label: str, description: str, query_text: str) -> builders.QueryVariable:
    """A query variable on the datasource: several values or All (`.*`), sorted, refreshed with
    the time range."""
    return (
        builders.QueryVariable(name)
        .label(label)
        .description(description)
        .datasource(DATASOURCE)
        .query(query_text)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(models.VariableOption(text=["All"], value=["$__all"], selected=True))
        .refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(models.VariableSort.ALPHABETICAL_CASE_INSENSITIVE_ASC)
    )


def variables() -> list[builders.QueryVariable]:
    """cluster, job, instance, provider, model: each offers the values the ones before allow."""
    return [
        variable(
            "cluster",
            "Cluster",
            "The `cluster` label of the exporters' series, where Prometheus (or the store it "
            "writes to) sees several clusters. Without such a label it lists nothing, and All "
            "matches every series.",
            "label_values(llm_provider_up, cluster)",
        ),
        variable(
            "job",
            "Job",
            "The Prometheus jobs that scrape the exporters (llm-exporter; a /probe job too).",
            'label_values(llm_provider_up{cluster=~"$cluster"}, job)',
        ),
        variable(
            "instance",
            "Exporter",
            "The exporters (their `instance`: host and port, or the provider of a /probe "
            "target). Two exporters that watch providers of the same name show apart.",
            'label_values(llm_provider_up{cluster=~"$cluster", job=~"$job"}, instance)',
        ),
        variable(
            "provider",
            "Provider",
            "Providers (the configured names) of the selected exporters, from llm_provider_up.",
            f"label_values(llm_provider_up{{{T}}}, provider)",
        ),
        variable(
            "model",
            "Model",
            "Models the selected providers know, from llm_model_info.",
            f"label_values(llm_model_info{{{P}}}, model)",
        ),
    ]


def base(uid: str, title: str, description: str) -> builders.Dashboard:
    """What every dashboard has: tags, time, variables, links to the others, the alerts annotation."""
    dashboard = (
        builders.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags([TAG])
        .editable()
        .tooltip(models.DashboardCursorSync.CROSSHAIR)
        .time("now-6h", "now")
        .refresh("30s")
        .timezone("browser")
        .with_variable(
            builders.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
    )
    for query_variable in variables():
        dashboard = dashboard.with_variable(query_variable)
    return dashboard.annotation(
        builders.AnnotationQuery()
        .name("Firing alerts")
        .datasource(DATASOURCE)
        .expr(f'ALERTS{{alertstate="firing", {T}}}')
        .enable(True)
        .hide(False)
        .icon_color(RED)
    ).link(
        builders.DashboardLink("LLM dashboards")
        .type(models.DashboardLinkType.DASHBOARDS)
        .tags([TAG])
        .as_dropdown(False)
        .include_vars(True)
        .keep_time(True)
        .target_blank(False)
        .icon("external link")
        .tooltip("The other llm-exporter dashboards")
    )


def overview() -> builders.Dashboard:
    """LLM Overview: the status bar and the providers."""
    health = stat_panel(
        "Overall health",
        "The exporter's overall health verdict (as on /health): healthy, degraded or unhealthy. "
        "Not filtered by provider: the overall verdict covers every provider.",
        "none",
        [
            query(
                f'max(llm_health_status{{{T}, component="overall", state="degraded"}}'
                f' or llm_health_status{{{T}, component="overall", state="unhealthy"}} * 2)',
                "overall",
            )
        ],
        w=3,
    ).mappings(
        value_map(("0", "healthy", GREEN), ("1", "degraded", ORANGE), ("2", "unhealthy", RED))
    )
    up = stat_panel(
        "Providers up",
        "Providers answering their status endpoint, out of those watched: red when none "
        "answers (LLMProviderDown fires for each provider down).",
        "short",
        [
            query(f"sum(llm_provider_up{{{P}}})", "up", ref="A"),
            query(f"count(llm_provider_up{{{P}}})", "watched", ref="B"),
        ],
        w=3,
    ).thresholds(thresholds(RED, (1, GREEN)))
    # Ollama reports no token counters: for a provider without them, the tokens its
    # gateway counted, else the generation speed of its last probes (averaged over its models).
    tokens = stat_panel(
        "Output tokens/s",
        "Tokens the providers generated per second, as they count them (llama.cpp, vLLM). For a "
        "provider that counts none (Ollama), the tokens of the requests through its gateway; "
        "without a gateway, the speed of its last synthetic probes stands in: what one request "
        "gets, not its throughput.",
        TOKENS_PER_SECOND,
        [
            query(
                f'sum(sum by ({EXPORTER}, provider) (rate(llm_tokens_total{{{PM}, type="output"}}[{RATE}]))'
                f' or sum by ({EXPORTER}, provider) (rate(llm_gateway_tokens_total{{{PM}, type="output"}}[{RATE}]))'
                f" or avg by ({EXPORTER}, provider) (llm_probe_tokens_per_second{{{PM}}}))",
                "output tokens/s",
            )
        ],
        w=3,
    ).color_mode(common.BigValueColorMode.NONE)
    first_token = stat_panel(
        "p95 time to first token",
        "The slowest selected model's 95th percentile time to first token: as the provider "
        "measures it (vLLM), else of the requests through its gateway, else of its synthetic "
        "probes (the LLM Performance dashboard shows each model and its source).",
        "s",
        [
            query(
                "max("
                + best_quantile(
                    0.95,
                    "llm_time_to_first_token_seconds",
                    "llm_gateway_time_to_first_token_seconds",
                    "llm_probe_time_to_first_token_seconds",
                )
                + ")",
                "p95",
            )
        ],
        w=3,
    ).color_mode(common.BigValueColorMode.NONE)
    latency = stat_panel(
        "p95 probe latency",
        "95th percentile of the synthetic probes' total duration, over every selected model: "
        "orange where LLMProbeLatencyHigh fires, red where /health calls it unhealthy.",
        "s",
        [query(quantile(0.95, "llm_probe_duration_seconds", by=""), "p95")],
        w=3,
    ).thresholds(alert_thresholds("p95 probe latency"))
    errors = stat_panel(
        "Exporter error ratio",
        "Share of the exporter's requests to the providers that failed (any outcome but success): "
        "orange where LLMProviderErrorRatioHigh fires.",
        "percentunit",
        [
            query(
                f'(sum(rate(llm_provider_requests_total{{{P}, outcome!~"success|unsupported"}}[{RATE}])) or vector(0))'
                f" / sum(rate(llm_provider_requests_total{{{P}}}[{RATE}]))",
                "errors",
            )
        ],
        w=3,
    ).thresholds(alert_thresholds("Exporter error ratio"))
    queue = stat_panel(
        "Requests running / waiting",
        "Requests the providers are processing now (as llama.cpp and vLLM count them, else the "
        "requests in flight through a provider's gateway), and those queued (llama.cpp and vLLM).",
        "short",
        [
            query(
                f"sum(sum by ({EXPORTER}, provider) (llm_requests_running{{{PM}}})"
                f" or sum by ({EXPORTER}, provider) (llm_gateway_requests_in_flight{{{PM}}}))",
                "running",
                ref="A",
            ),
            query(f"sum(llm_requests_waiting{{{PM}}})", "waiting", ref="B"),
        ],
        w=3,
    ).color_mode(common.BigValueColorMode.NONE)
    memory = stat_panel(
        "Host memory used",
        "Share of the host's memory in use, per exporter host: orange where LLMHostMemoryHigh "
        "fires, red where /health calls it unhealthy.",
        "percentunit",
        [
            query(
                f"llm_host_memory_used_bytes{{{T}}} / llm_host_memory_total_bytes{{{T}}}",
                "{{instance}}",
            )
        ],
        w=3,
    ).thresholds(alert_thresholds("Host memory used"))
    providers = merge_table(
        "Providers",
        "Each provider: up or down, its kind and version, and how many models it has loaded.",
        [
            table_query(
                state_label(
                    f"max by ({EXPORTER}, provider, kind) (llm_provider_up{{{P}}})", UP_DOWN
                ),
                "A",
            ),
            table_query(f"max by ({EXPORTER}, provider, version) (llm_provider_info{{{P}}})", "B"),
            table_query(f"sum by ({EXPORTER}, provider) (llm_model_loaded{{{PM}}})", "C"),
        ],
        hide=["Value #A", "Value #B"],
        rename={
            "provider": "Provider",
            "state": "State",
            "kind": "Kind",
            "version": "Version",
            "Value #C": "Models loaded",
        },
        order=["provider", "state", "kind", "version", "Value #C"],
        unit="short",
        states=value_map(("up", "up", GREEN), ("down", "down", RED)),
    )
    return (
        base(
            "llm-overview",
            "LLM Overview",
            "Status bar of the LLM inference servers llm-exporter watches, and the providers.",
        )
        .with_panel(health)
        .with_panel(up)
        .with_panel(tokens)
        .with_panel(first_token)
        .with_panel(latency)
        .with_panel(errors)
        .with_panel(queue)
        .with_panel(memory)
        .with_panel(providers)
    )


def performance() -> builders.Dashboard:
    """LLM Performance: latency, time to first token, throughput and load."""
    per_model = "{{instance}} {{provider}}/{{model}}"
    return (
        base(
            "llm-performance",
            "LLM Performance",
            "Latency, time to first token, throughput and load of the LLM inference servers.",
        )
        .with_row(row("Synthetic probes"))
        .with_panel(
            series_panel(
                "Probe latency",
                "Percentiles of the synthetic probes' total duration, per model (successful probes).",
                "s",
                quantiles("llm_probe_duration_seconds"),
            )
        )
        .with_panel(
            series_panel(
                "Probe time to first token",
                "Percentiles of the time from sending a probe to its first generated token.",
                "s",
                quantiles("llm_probe_time_to_first_token_seconds"),
            )
        )
        .with_panel(
            heatmap_panel(
                "Probe latency heatmap",
                "Distribution of the synthetic probes' total duration over the selected models.",
                f"sum by (le) (increase(llm_probe_duration_seconds_bucket{{{PM}}}[{RATE}]))",
            )
        )
        .with_panel(
            heatmap_panel(
                "Probe time to first token heatmap",
                "Distribution of the probes' time to first token over the selected models.",
                f"sum by (le) (increase(llm_probe_time_to_first_token_seconds_bucket{{{PM}}}[{RATE}]))",
            )
        )
        .with_panel(
            series_panel(
                "Probe time per output token",
                "Percentiles of the time per generated token after the first, in the probes.",
                "s",
                quantiles("llm_probe_time_per_output_token_seconds", (0.5, 0.95)),
            )
        )
        .with_panel(
            series_panel(
                "Probe generation speed (tokens/s)",
                "Output tokens after the first per second, in the last successful probe of each model.",
                TOKENS_PER_SECOND,
                [query(f"llm_probe_tokens_per_second{{{PM}}}", per_model)],
            )
        )
        .with_row(row("Serving latency: the provider's own, else the gateway's, else the probes'"))
        .with_panel(
            series_panel(
                "Time to first token",
                "Percentiles of the time to first token per model, from the best source it has "
                "(in the legend): the provider's own requests as vLLM measures them, else the "
                "streamed requests through the provider's gateway, else the synthetic probes. A "
                "source without requests in the interval gives way to the next.",
                "s",
                [
                    query(
                        best_quantile(
                            q,
                            "llm_time_to_first_token_seconds",
                            "llm_gateway_time_to_first_token_seconds",
                            "llm_probe_time_to_first_token_seconds",
                        ),
                        f"p{round(q * 100)} {per_model} ({{{{source}}}})",
                        ref=ref,
                    )
                    for q, ref in ((0.5, "A"), (0.95, "B"))
                ],
            )
        )
        .with_panel(
            series_panel(
                "Request duration",
                "Percentiles of the end-to-end duration of requests per model, from the best "
                "source it has (in the legend): the provider's own requests (vLLM), else the "
                "requests through its gateway (model listings left out), else the synthetic probes.",
                "s",
                [
                    query(
                        best_quantile(
                            q,
                            "llm_request_duration_seconds",
                            "llm_gateway_request_duration_seconds",
                            "llm_probe_duration_seconds",
                            gateway_matchers='operation!="other"',
                        ),
                        f"p{round(q * 100)} {per_model} ({{{{source}}}})",
                        ref=ref,
                    )
                    for q, ref in ((0.5, "A"), (0.95, "B"))
                ],
            )
        )
        .with_row(row("Throughput and load"))
        .with_panel(
            series_panel(
                "Tokens/s by type",
                "Tokens processed per second: input (prompt tokens) and output (generated), as the "
                "provider counts them (llama.cpp, vLLM), else as its gateway counted them (source "
                "in the legend).",
                TOKENS_PER_SECOND,
                [
                    query(
                        best_of(
                            (
                                "provider",
                                f"sum by ({EXPORTER}, provider, model, type) (rate(llm_tokens_total{{{PM}}}[{RATE}]))",
                            ),
                            (
                                "gateway",
                                f"sum by ({EXPORTER}, provider, model, type) (rate(llm_gateway_tokens_total{{{PM}}}[{RATE}]))",
                            ),
                        ),
                        f"{per_model} {{{{type}}}} ({{{{source}}}})",
                    )
                ],
            )
        )
        .with_panel(
            series_panel(
                "Requests running vs waiting",
                "Requests the providers are processing and those queued, per model. Running: as "
                "the provider counts them (llama.cpp, vLLM), else the requests in flight through "
                "its gateway (source in the legend); waiting: llama.cpp and vLLM.",
                "short",
                [
                    query(
                        best_of(
                            (
                                "provider",
                                f"sum by ({EXPORTER}, provider, model) (llm_requests_running{{{PM}}})",
                            ),
                            (
                                "gateway",
                                f"sum by ({EXPORTER}, provider, model) (llm_gateway_requests_in_flight{{{PM}}})",
                            ),
                            on=f"{EXPORTER}, provider",
                        ),
                        f"running {per_model} ({{{{source}}}})",
                        ref="A",
                    ),
                    query(
                        f"sum by ({EXPORTER}, provider, model) (llm_requests_waiting{{{PM}}})",
                        f"waiting {per_model}",
                        ref="B",
                    ),
                ],
            )
        )
        .with_panel(
            series_panel(
                "Probe requests by outcome",
                "Synthetic probe requests per second, by outcome (success or failure class).",
                "reqps",
                [
                    query(
                        f"sum by ({EXPORTER}, provider, model, outcome) (rate(llm_probe_requests_total{{{PM}}}[{RATE}]))",
                        f"{per_model} {{{{outcome}}}}",
                    )
                ],
                stacked=True,
            )
        )
        .with_panel(
            series_panel(
                "Exporter request error ratio",
                "Share of the exporter's requests to each provider that failed, from llm_provider_requests_total.",
                "percentunit",
                [
                    query(
                        f'(sum by ({EXPORTER}, provider) (rate(llm_provider_requests_total{{{P}, outcome!~"success|unsupported"}}[{RATE}]))'
                        f" or sum by ({EXPORTER}, provider) (rate(llm_provider_requests_total{{{P}}}[{RATE}])) * 0)"
                        f" / sum by ({EXPORTER}, provider) (rate(llm_provider_requests_total{{{P}}}[{RATE}]))",
                        "{{instance}} {{provider}}",
                    )
                ],
            )
        )
    )


def traffic() -> builders.Dashboard:
    """LLM Traffic: the real requests through the measuring gateway, per model and client,
    and its queue and cache."""
    per_model = "{{instance}} {{provider}}/{{model}}"
    requests = f"llm_gateway_requests_total{{{PM}}}"
    judged = f"llm_gateway_requests_total{{{PM}, {GATEWAY_JUDGED}}}"
    stats = [
        stat_panel(
            "Gateway requests/s",
            "Requests per second clients sent through the gateways of the selected providers.",
            "reqps",
            [query(f"sum(rate({requests}[{RATE}]))", "requests/s")],
            w=4,
        ).color_mode(common.BigValueColorMode.NONE),
        stat_panel(
            "Gateway error ratio",
            "Share of the requests through the gateways that failed: the client got a 5xx, or "
            "the provider broke off its answer or gave none in time. Left out: abandoned "
            "requests, those the gateway's queue turned away and those answered from its cache "
            "(the Queue and Cache rows show them); 4xx are the clients' own. Orange where "
            "LLMGatewayErrorRatioHigh fires.",
            "percentunit",
            [
                query(
                    f"({gateway_failed('')} or vector(0)) / sum(rate({judged}[{RATE}]))",
                    "failed",
                )
            ],
            w=4,
        ).thresholds(alert_thresholds("Gateway error ratio")),
        stat_panel(
            "Gateway p95 time to first token",
            "95th percentile time to first token of the streamed requests through the gateways, "
            "over every selected model.",
            "s",
            [query(quantile(0.95, "llm_gateway_time_to_first_token_seconds", by=""), "p95")],
            w=4,
        ).color_mode(common.BigValueColorMode.NONE),
        stat_panel(
            "Gateway requests in flight",
            "Requests through the gateways that have not finished.",
            "short",
            [query(f"sum(llm_gateway_requests_in_flight{{{PM}}})", "in flight")],
            w=4,
        ).color_mode(common.BigValueColorMode.NONE),
        stat_panel(
            "Gateway output tokens/s",
            "Tokens generated per second for the requests through the gateways.",
            TOKENS_PER_SECOND,
            [
                query(
                    f'sum(rate(llm_gateway_tokens_total{{{PM}, type="output"}}[{RATE}]))',
                    "output tokens/s",
                )
            ],
            w=4,
        ).color_mode(common.BigValueColorMode.NONE),
        stat_panel(
            "Gateway client connections",
            "Client connections open to the gateways of the selected providers.",
            "short",
            [query(f"sum(llm_gateway_connections{{{P}}})", "connections")],
            w=4,
        ).color_mode(common.BigValueColorMode.NONE),
    ]
    dashboard = base(
        "llm-traffic",
        "LLM Traffic",
        "The real requests clients send through llm-exporter's measuring gateway: rates, "
        "failures, latency, time to first token and tokens, per model and per client; its "
        "admission queue and its response cache.",
    )
    for stat_builder in stats:
        dashboard = dashboard.with_panel(stat_builder)
    return (
        dashboard.with_row(row("Requests"))
        .with_panel(
            series_panel(
                "Requests/s by model and status",
                "Requests per second through the gateway, by the status class the client got "
                "(none: the client got no answer).",
                "reqps",
                [
                    query(
                        f"sum by ({EXPORTER}, provider, model, code) (rate({requests}[{RATE}]))",
                        f"{per_model} {{{{code}}}}",
                    )
                ],
                stacked=True,
            )
        )
        .with_panel(
            series_panel(
                "Requests/s by outcome",
                "How requests ended: complete (the provider's whole answer reached the client, "
                "whatever its status), abandoned (the client went away first), upstream_failed "
                "(the provider refused, reset or broke off its answer), timeout (no first byte, "
                "or no next chunk, within the gateway's timeouts), rejected (turned away by the "
                "gateway's queue: 429 or 503 as configured), cached (answered from the gateway's "
                "cache, without the provider).",
                "reqps",
                [
                    query(
                        f"sum by ({EXPORTER}, provider, model, outcome) (rate({requests}[{RATE}]))",
                        f"{per_model} {{{{outcome}}}}",
                    )
                ],
            )
        )
        .with_panel(
            series_panel(
                "Failed and abandoned requests",
                "Per model, the share of requests that failed (as in the error ratio: 5xx, "
                "upstream_failed or timeout, of those neither abandoned, rejected by the queue "
                "nor answered from the cache) and the share the clients abandoned (of all).",
                "percentunit",
                [
                    query(
                        share(
                            gateway_failed(f"{EXPORTER}, provider, model"),
                            f"sum by ({EXPORTER}, provider, model) (rate({judged}[{RATE}]))",
                        ),
                        f"failed {per_model}",
                        ref="A",
                    ),
                    query(
                        share(
                            f'sum by ({EXPORTER}, provider, model) (rate(llm_gateway_requests_total{{{PM}, outcome="abandoned"}}[{RATE}]))',
                            f"sum by ({EXPORTER}, provider, model) (rate({requests}[{RATE}]))",
                        ),
                        f"abandoned {per_model}",
                        ref="B",
                    ),
                ],
            )
        )
        .with_panel(
            series_panel(
                "Requests/s by client",
                "Requests per second by client, as gateway.client_header or gateway.client_keys "
                f"name them; {UNATTRIBUTED}: requests neither names.",
                "reqps",
                [
                    query(
                        unattributed(
                            f"sum by ({EXPORTER}, provider, client, outcome) (rate({requests}[{RATE}]))"
                        ),
                        "{{instance}} {{provider}} {{client}} {{outcome}}",
                    )
                ],
                stacked=True,
            )
        )
        .with_row(row("Latency"))
        .with_panel(
            series_panel(
                "Time to first token",
                "Percentiles of the time from a streamed request's arrival at the gateway to the "
                "first chunk carrying generated output, any wait in the gateway's queue included: "
                "what users wait before text appears.",
                "s",
                quantiles("llm_gateway_time_to_first_token_seconds"),
            )
        )
        .with_panel(
            series_panel(
                "Request duration",
                "Percentiles of the duration of the requests the gateway forwarded, from arrival "
                "(any wait in its queue included) to the answer's last byte (model listings and "
                "other requests left out; answers from the cache are not forwarded).",
                "s",
                quantiles("llm_gateway_request_duration_seconds", matchers='operation!="other"'),
            )
        )
        .with_panel(
            heatmap_panel(
                "Time to first token heatmap",
                "Distribution of the time to first token of the streamed requests through the gateway.",
                f"sum by (le) (increase(llm_gateway_time_to_first_token_seconds_bucket{{{PM}}}[{RATE}]))",
            )
        )
        .with_panel(
            heatmap_panel(
                "Request duration heatmap",
                "Distribution of the duration of the requests through the gateway (model listings and "
                "other requests left out).",
                "sum by (le) (increase(llm_gateway_request_duration_seconds_bucket"
                f'{{{PM}, operation!="other"}}[{RATE}]))',
            )
        )
        .with_row(row("Tokens"))
        .with_panel(
            series_panel(
                "Tokens/s in and out",
                "Tokens per second of the requests through the gateway: input (every prompt "
                "token, cached or not) and output (generated).",
                TOKENS_PER_SECOND,
                [
                    query(
                        f"sum by ({EXPORTER}, provider, model, type) (rate(llm_gateway_tokens_total{{{PM}}}[{RATE}]))",
                        f"{per_model} {{{{type}}}}",
                    )
                ],
                w=8,
            )
        )
        .with_panel(
            series_panel(
                "Tokens/s by client",
                f"Tokens per second by client and type; {UNATTRIBUTED}: requests no client_header "
                "or client_keys names.",
                TOKENS_PER_SECOND,
                [
                    query(
                        unattributed(
                            f"sum by ({EXPORTER}, provider, client, type)"
                            f" (rate(llm_gateway_tokens_total{{{PM}}}[{RATE}]))"
                        ),
                        "{{instance}} {{provider}} {{client}} {{type}}",
                    )
                ],
                w=8,
                stacked=True,
            )
        )
        .with_panel(
            series_panel(
                "Time per output token",
                "Percentiles of the time per generated token after the first, in streamed "
                "requests through the gateway (1 / this is the speed a request gets).",
                "s",
                quantiles("llm_gateway_time_per_output_token_seconds", (0.5, 0.95)),
                w=8,
            )
        )
        .with_panel(
            series_panel(
                "Prompt tokens from the provider's cache",
                "Share of the input tokens of requests through the gateway that the provider "
                "reused from its own prompt cache instead of evaluating (the gateway's response "
                "cache is the Cache row's).",
                "percentunit",
                [
                    query(
                        share(
                            f"sum by ({EXPORTER}, provider, model)"
                            f" (rate(llm_gateway_input_tokens_cached_total{{{PM}}}[{RATE}]))",
                            f"sum by ({EXPORTER}, provider, model)"
                            f' (rate(llm_gateway_tokens_total{{{PM}, type="input"}}[{RATE}]))',
                        ),
                        per_model,
                    )
                ],
                w=8,
            )
        )
        .with_panel(
            series_panel(
                "Output tokens counted from chunks",
                "Share of the output tokens the gateway counted from the chunks of streams "
                "without usage (one chunk, one token: an estimate) rather than from the "
                "provider's own count. Clients can ask for usage (OpenAI: "
                "stream_options.include_usage).",
                "percentunit",
                [
                    query(
                        share(
                            f"sum by ({EXPORTER}, provider, model) (rate(llm_gateway_tokens_total"
                            f'{{{PM}, type="output", source="stream_chunks"}}[{RATE}]))',
                            f"sum by ({EXPORTER}, provider, model)"
                            f' (rate(llm_gateway_tokens_total{{{PM}, type="output"}}[{RATE}]))',
                        ),
                        per_model,
                    )
                ],
                w=8,
            )
        )
        .with_panel(
            series_panel(
                "Retries and unmetered answers",
                "Requests the gateway sent again on a new connection because the provider had "
                "closed the pooled one (the client saw nothing), and answers relayed whose usage "
                "could not be read, by reason (too_large, encoding, invalid_json; 0 while none).",
                "reqps",
                [
                    query(
                        f"sum by ({EXPORTER}, provider) (rate(llm_gateway_upstream_retries_total{{{P}}}[{RATE}]))",
                        "retries {{instance}} {{provider}}",
                        ref="A",
                    ),
                    query(
                        f"sum by ({EXPORTER}, provider, reason)"
                        f" (rate(llm_gateway_unmetered_responses_total{{{P}}}[{RATE}]))"
                        f" or on ({EXPORTER}, provider) sum by ({EXPORTER}, provider)"
                        f" (rate(llm_gateway_upstream_retries_total{{{P}}}[{RATE}])) * 0",
                        "unmetered {{instance}} {{provider}} {{reason}}",
                        ref="B",
                    ),
                ],
                w=8,
            )
        )
        .with_row(row("Load"))
        .with_panel(
            series_panel(
                "Requests in flight",
                "Requests through the gateway that have not finished, per model.",
                "short",
                [
                    query(
                        f"sum by ({EXPORTER}, provider, model) (llm_gateway_requests_in_flight{{{PM}}})",
                        per_model,
                    )
                ],
            )
        )
        .with_panel(
            series_panel(
                "Client connections",
                "Client connections open to each gateway, and those it closed in the interval "
                "because gateway.max_connections were open.",
                "short",
                [
                    query(
                        f"sum by ({EXPORTER}, provider) (llm_gateway_connections{{{P}}})",
                        "open {{instance}} {{provider}}",
                        ref="A",
                    ),
                    query(
                        f"sum by ({EXPORTER}, provider)"
                        f" (increase(llm_gateway_connections_closed_total{{{P}}}[{RATE}]))",
                        "closed at max_connections {{instance}} {{provider}}",
                        ref="B",
                    ),
                ],
            )
        )
        .with_row(row("Queue"))
        .with_panel(
            series_panel(
                "Requests waiting by priority",
                "Requests waiting in each gateway's queue for a slot at the provider, by priority "
                "(-10 to 10, higher first; 0 unless queue.priority_header or "
                "queue.client_priorities say otherwise), and the room for them "
                "(queue.max_waiting): past it requests are turned away, and "
                "LLMGatewayQueueSaturated fires when every priority together has held 90% of it "
                "for 5 minutes.",
                "short",
                [
                    query(
                        f"sum by ({EXPORTER}, provider, priority) (llm_gateway_queue_waiting{{{P}}})",
                        "{{instance}} {{provider}} priority {{priority}}",
                        ref="A",
                    ),
                    query(
                        f"sum by ({EXPORTER}, provider) (llm_gateway_queue_max_waiting{{{P}}})",
                        "max_waiting {{instance}} {{provider}}",
                        ref="B",
                    ),
                ],
                w=8,
            )
        )
        .with_panel(
            series_panel(
                "Slots in use",
                "Requests the gateway's queue has let through that hold a slot at the provider, "
                "against the slots (queue.max_concurrent, the provider's real parallelism). All "
                "slots busy while requests wait: the provider is the bottleneck.",
                "short",
                [
                    query(
                        f"sum by ({EXPORTER}, provider) (llm_gateway_queue_running{{{P}}})",
                        "running {{instance}} {{provider}}",
                        ref="A",
                    ),
                    query(
                        f"sum by ({EXPORTER}, provider) (llm_gateway_queue_max_concurrent{{{P}}})",
                        "max_concurrent {{instance}} {{provider}}",
                        ref="B",
                    ),
                ],
                w=8,
            )
        )
        .with_panel(
            series_panel(
                "Service rate vs arrivals",
                "Requests per second the provider finishes with every slot busy (estimated from "
                "recent service times; the basis of Retry-After), against the requests per second "
                "whose wait in the queue ended (let through, turned away or given up): arrivals "
                "above the service rate fill the queue.",
                "reqps",
                [
                    query(
                        f"sum by ({EXPORTER}, provider) (llm_gateway_queue_service_rate{{{P}}})",
                        "service rate {{instance}} {{provider}}",
                        ref="A",
                    ),
                    query(
                        f"sum by ({EXPORTER}, provider)"
                        f" (rate(llm_gateway_queue_wait_seconds_count{{{P}}}[{RATE}]))",
                        "through the queue {{instance}} {{provider}}",
                        ref="B",
                    ),
                ],
                w=8,
            )
        )
        .with_panel(
            series_panel(
                "Queue wait by outcome",
                "Median and 95th percentile time requests spent in the gateway's queue, by how "
                "the wait ended: dispatched (got a slot; LLMGatewayQueueWaitHigh watches its p95), "
                "rejected_full (turned away at once, the queue full), rejected_timeout (turned "
                "away after queue.max_wait), cancelled (the client left first).",
                "s",
                [
                    query(
                        quantile(
                            q,
                            "llm_gateway_queue_wait_seconds",
                            f"{EXPORTER}, provider, outcome",
                            base=P,
                        ),
                        f"p{round(q * 100)} {{{{instance}}}} {{{{provider}}}} {{{{outcome}}}}",
                        ref=ref,
                    )
                    for q, ref in ((0.5, "A"), (0.95, "B"))
                ],
            )
        )
        .with_panel(
            series_panel(
                "Rejections/s by reason",
                "Requests per second the gateway's queue turned away, by reason: queue_full "
                "(max_waiting were waiting), wait_timeout (no slot within max_wait). Their clients "
                "got queue.overflow_status (429 or 503) with Retry-After. LLMGatewayRequestsRejected "
                "fires when they keep coming for more than 5 minutes.",
                "reqps",
                [
                    query(
                        f"sum by ({EXPORTER}, provider, reason)"
                        f" (rate(llm_gateway_queue_rejections_total{{{P}}}[{RATE}]))",
                        "{{instance}} {{provider}} {{reason}}",
                    )
                ],
                stacked=True,
            )
        )
        .with_row(row("Cache"))
        .with_panel(
            series_panel(
                "Cache hit ratio",
                "Share of the eligible requests the gateway's cache answered: hits of hits and "
                "misses. Requests that bypass the cache (streams, sampling, no-cache) are left out.",
                "percentunit",
                [
                    query(
                        share(
                            f"sum by ({EXPORTER}, provider) (rate(llm_gateway_cache_lookups_total"
                            f'{{{P}, result="hit"}}[{RATE}]))',
                            f"sum by ({EXPORTER}, provider) (rate(llm_gateway_cache_lookups_total"
                            f'{{{P}, result=~"hit|miss"}}[{RATE}]))',
                        ),
                        "{{instance}} {{provider}}",
                    )
                ],
                w=8,
            )
        )
        .with_panel(
            series_panel(
                "Cache lookups/s by result",
                "Generation and embedding requests per second by what the cache did: hit "
                "(answered from it), miss (forwarded, and stored if the answer may be), bypass "
                "(not eligible).",
                "reqps",
                [
                    query(
                        f"sum by ({EXPORTER}, provider, result)"
                        f" (rate(llm_gateway_cache_lookups_total{{{P}}}[{RATE}]))",
                        "{{instance}} {{provider}} {{result}}",
                    )
                ],
                w=8,
                stacked=True,
            )
        )
        .with_panel(
            series_panel(
                "Cache bypasses/s by reason",
                "Requests per second that bypassed the cache, by reason: stream (a streamed answer "
                "is new bytes every time), sampling (temperature above 0 without a seed; "
                "cache.sampled stores those too), no_cache (the client sent Cache-Control "
                "no-cache or no-store), body (not a JSON object, or too large to read whole). "
                "0 while none.",
                "reqps",
                [
                    query(
                        f"sum by ({EXPORTER}, provider, reason)"
                        f" (rate(llm_gateway_cache_bypasses_total{{{P}}}[{RATE}]))"
                        f" or on ({EXPORTER}, provider) sum by ({EXPORTER}, provider) (rate(llm_gateway_cache_lookups_total"
                        f'{{{P}, result="bypass"}}[{RATE}])) * 0',
                        "{{instance}} {{provider}} {{reason}}",
                    )
                ],
                w=8,
                stacked=True,
            )
        )
        .with_panel(
            series_panel(
                "Cache entries",
                "Answers in the gateway's cache, against cache.max_entries (past it the least "
                "recently used go first).",
                "short",
                [
                    query(
                        f"sum by ({EXPORTER}, provider) (llm_gateway_cache_entries{{{P}}})",
                        "entries {{instance}} {{provider}}",
                        ref="A",
                    ),
                    query(
                        f"sum by ({EXPORTER}, provider) (llm_gateway_cache_max_entries{{{P}}})",
                        "max_entries {{instance}} {{provider}}",
                        ref="B",
                    ),
                ],
                w=8,
            )
        )
        .with_panel(
            series_panel(
                "Cache memory",
                "Bytes the gateway's cache holds (answers, their headers and keys, and a fixed "
                "cost per entry), against cache.max_bytes (past it the least recently used go "
                "first).",
                "bytes",
                [
                    query(
                        f"sum by ({EXPORTER}, provider) (llm_gateway_cache_bytes{{{P}}})",
                        "bytes {{instance}} {{provider}}",
                        ref="A",
                    ),
                    query(
                        f"sum by ({EXPORTER}, provider) (llm_gateway_cache_max_bytes{{{P}}})",
                        "max_bytes {{instance}} {{provider}}",
                        ref="B",
                    ),
                ],
                w=8,
            )
        )
        .with_panel(
            series_panel(
                "Cache evictions/s by reason",
                "Answers per second dropped from the cache, by reason: expired (older than "
                "cache.ttl), max_entries and max_bytes (the least recently used, to make room: "
                "frequent ones mean a cache too small for what repeats). 0 while none.",
                "cps",
                [
                    query(
                        f"sum by ({EXPORTER}, provider, reason)"
                        f" (rate(llm_gateway_cache_evictions_total{{{P}}}[{RATE}]))"
                        f" or on ({EXPORTER}, provider) sum by ({EXPORTER}, provider)"
                        f" (llm_gateway_cache_entries{{{P}}}) * 0",
                        "{{instance}} {{provider}} {{reason}}",
                    )
                ],
                w=8,
                stacked=True,
            )
        )
        .with_panel(
            series_panel(
                "Tokens/s saved by the cache",
                "Tokens per second the provider did not have to process because the cache "
                "answered, by type (input, output), as the stored answers' usage says.",
                TOKENS_PER_SECOND,
                [
                    query(
                        f"sum by ({EXPORTER}, provider, type)"
                        f" (rate(llm_gateway_cache_saved_tokens_total{{{P}}}[{RATE}]))",
                        "{{instance}} {{provider}} {{type}}",
                    )
                ],
            )
        )
        .with_panel(
            series_panel(
                "Provider time saved by the cache",
                "Seconds of the provider's time per second that the cache hits spared it: what "
                "the provider took for the answers they repeated (1 s/s: one request's worth of "
                "the provider busy all the time).",
                SECONDS_PER_SECOND,
                [
                    query(
                        f"sum by ({EXPORTER}, provider)"
                        f" (rate(llm_gateway_cache_saved_seconds_total{{{P}}}[{RATE}]))",
                        "{{instance}} {{provider}}",
                    )
                ],
            )
        )
    )


def resources() -> builders.Dashboard:
    """LLM Resources: host, provider processes, GPUs, model memory, KV cache and slots."""
    per_model = "{{instance}} {{provider}}/{{model}}"
    return (
        base(
            "llm-resources",
            "LLM Resources",
            "Host, provider process, GPU and model memory of the LLM inference servers.",
        )
        .with_row(row("Host"))
        .with_panel(
            series_panel(
                "Host CPU",
                "Share of the host's CPU time in use (host-wide: not filtered by provider).",
                "percentunit",
                [query(f"llm_host_cpu_usage_ratio{{{T}}}", "{{instance}}")],
                w=8,
            )
        )
        .with_panel(
            series_panel(
                "Host memory",
                "Host memory in use (total less available) and in total (host-wide).",
                "bytes",
                [
                    query(f"llm_host_memory_used_bytes{{{T}}}", "used {{instance}}", ref="A"),
                    query(f"llm_host_memory_total_bytes{{{T}}}", "total {{instance}}", ref="B"),
                ],
                w=8,
            )
        )
        .with_panel(
            series_panel(
                "Disk used",
                "Share of each configured mount point in use (host-wide).",
                "percentunit",
                [
                    query(
                        f"llm_host_disk_used_bytes{{{T}}} / llm_host_disk_total_bytes{{{T}}}",
                        "{{instance}} {{mountpoint}}",
                    )
                ],
                w=8,
            )
        )
        .with_row(row("Provider processes"))
        .with_panel(
            series_panel(
                "Provider process memory",
                "Resident memory of each provider's process on this host (providers with `process` configured).",
                "bytes",
                [
                    query(
                        f"llm_provider_process_resident_memory_bytes{{{P}}}",
                        "{{instance}} {{provider}}",
                    )
                ],
                w=8,
            )
        )
        .with_panel(
            series_panel(
                "Provider process CPU",
                "CPU time each provider's process uses per second (1 = one full core).",
                "percentunit",
                [
                    query(
                        f"rate(llm_provider_process_cpu_seconds_total{{{P}}}[{RATE}])",
                        "{{instance}} {{provider}}",
                    )
                ],
                w=8,
            )
        )
        .with_panel(
            series_panel(
                "Provider process open fds",
                "Open file descriptors of each provider's process.",
                "short",
                [query(f"llm_provider_process_open_fds{{{P}}}", "{{instance}} {{provider}}")],
                w=8,
            )
        )
        .with_row(row("GPUs"))
        .with_panel(
            series_panel(
                "GPU memory",
                "GPU memory in use and in total, per GPU (NVML; host-wide).",
                "bytes",
                [
                    query(
                        f"llm_gpu_memory_used_bytes{{{T}}}",
                        "used {{instance}} gpu {{gpu}}",
                        ref="A",
                    ),
                    query(
                        f"llm_gpu_memory_total_bytes{{{T}}}",
                        "total {{instance}} gpu {{gpu}}",
                        ref="B",
                    ),
                ],
                w=6,
            )
        )
        .with_panel(
            series_panel(
                "GPU utilization",
                "Share of time each GPU was busy over the driver's last sample period.",
                "percentunit",
                [query(f"llm_gpu_utilization_ratio{{{T}}}", "{{instance}} gpu {{gpu}}")],
                w=6,
            )
        )
        .with_panel(
            series_panel(
                "GPU temperature",
                "Temperature of each GPU.",
                "celsius",
                [query(f"llm_gpu_temperature_celsius{{{T}}}", "{{instance}} gpu {{gpu}}")],
                w=6,
            )
        )
        .with_panel(
            series_panel(
                "GPU power",
                "Power draw of each GPU.",
                "watt",
                [query(f"llm_gpu_power_watts{{{T}}}", "{{instance}} gpu {{gpu}}")],
                w=6,
            )
        )
        .with_row(row("Models and serving"))
        .with_panel(
            series_panel(
                "Model memory: total vs VRAM",
                "Memory each loaded model takes in total, and the part in GPU memory (vram; Ollama).",
                "bytes",
                [query(f"llm_model_memory_bytes{{{PM}}}", f"{per_model} {{{{memory}}}}")],
                w=8,
            )
        )
        .with_panel(
            series_panel(
                "KV cache usage",
                "Share of the KV cache in use (vLLM, and llama.cpp builds that export it).",
                "percentunit",
                [query(f"llm_kv_cache_usage_ratio{{{PM}}}", per_model)],
                w=8,
            )
        )
        .with_panel(
            series_panel(
                "Slots",
                "The provider's processing slots, by state: busy or idle (llama.cpp).",
                "short",
                [
                    query(
                        f"sum by ({EXPORTER}, provider, model, state) (llm_slots{{{PM}}})",
                        f"{per_model} {{{{state}}}}",
                    )
                ],
                w=8,
                stacked=True,
            )
        )
    )


def models_dashboard() -> builders.Dashboard:
    """LLM Models: the inventory, what is loaded, expiry, and the lifecycle row: loads and
    unloads by cause, load times, thrashing, time loaded and idle, VRAM, pins, the policy."""
    per_model = "{{instance}} {{provider}}/{{model}}"
    inventory = merge_table(
        "Model inventory",
        "Every model the providers know, with its details, size on disk, context length and whether it is loaded.",
        [
            table_query(
                f"max by ({EXPORTER}, provider, model, family, parameter_size, quantization, format)"
                f" (llm_model_info{{{PM}}})",
                "A",
            ),
            table_query(
                f"max by ({EXPORTER}, provider, model) (llm_model_size_bytes{{{PM}}})", "B"
            ),
            table_query(
                f"max by ({EXPORTER}, provider, model) (llm_model_context_tokens{{{PM}}})", "C"
            ),
            table_query(
                state_label(
                    f"max by ({EXPORTER}, provider, model) (llm_model_loaded{{{PM}}})", LOADED
                ),
                "D",
            ),
        ],
        hide=["Value #A", "Value #D"],
        rename={
            "provider": "Provider",
            "model": "Model",
            "family": "Family",
            "parameter_size": "Parameters",
            "quantization": "Quantization",
            "format": "Format",
            "Value #B": "Size on disk",
            "Value #C": "Context (tokens)",
            "state": "State",
        },
        order=[
            "provider",
            "model",
            "family",
            "parameter_size",
            "quantization",
            "format",
            "Value #B",
            "Value #C",
            "state",
        ],
        unit="bytes",
        as_text=("Value #C",),
        states=value_map(("loaded", "loaded", GREEN), ("on disk", "on disk", BLUE)),
        h=10,
    )
    loaded = state_panel(
        "Loaded models",
        "Which models are loaded in memory (1) or only on disk (0), over time.",
        [query(f"llm_model_loaded{{{PM}}}", per_model)],
        value_map(("0", "on disk", BLUE), ("1", "loaded", GREEN)),
    )
    expiry = panel(
        bargauge.Panel()
        .display_mode(common.BarGaugeDisplayMode.BASIC)
        .orientation(common.VizOrientation.HORIZONTAL)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .show_unfilled(True)
        .min_viz_height(16)
        .max_viz_height(24),
        "Model expiry",
        "Time left before the provider unloads each idle model (Ollama's expires_at).",
        "s",
        [query(f"llm_model_expiry_timestamp_seconds{{{PM}}} - time()", per_model)],
        w=12,
    ).thresholds(thresholds(ORANGE, (300, GREEN)))
    return (
        base(
            "llm-models",
            "LLM Models",
            "The models the LLM inference servers know and have loaded, their expiry, and their "
            "lifecycle: loads and unloads with their causes, load times, evictions, pins.",
        )
        .with_panel(inventory)
        .with_panel(loaded)
        .with_panel(expiry)
        .with_row(row("Lifecycle"))
        .with_panel(
            events_panel(
                "Loads and unloads",
                "What the lifecycle watcher saw happen to each model in each interval: loads, "
                "unloads by cause (idle: its keep-alive ran out; evicted: another model was "
                "loaded while it was within its keep-alive; requested: by the lifecycle policy "
                "or a client's keep_alive 0; failed: its server process failed; unknown) and "
                "loads that failed. The /models endpoint lists the last 200 of these events.",
                [
                    query(
                        f"sum by ({EXPORTER}, provider, model) (increase(llm_model_loads_total{{{PM}}}[{RATE}]))",
                        f"{per_model} loaded",
                        ref="A",
                    ),
                    query(
                        f"sum by ({EXPORTER}, provider, model, cause)"
                        f" (increase(llm_model_unloads_total{{{PM}}}[{RATE}]))",
                        f"{per_model} unloaded ({{{{cause}}}})",
                        ref="B",
                    ),
                    query(
                        f"sum by ({EXPORTER}, provider, model)"
                        f" (increase(llm_model_load_failures_total{{{PM}}}[{RATE}]))",
                        f"{per_model} load failed",
                        ref="C",
                    ),
                ],
            )
        )
        .with_panel(
            series_panel(
                "Thrashing: evicted and reloaded",
                "How often each model is evicted and loaded again, per hour at the pace of the "
                "interval: the fewer of its evictions and its loads. A model that keeps being "
                "pushed out for another and loaded back makes every request that finds it gone "
                f"wait for a load. LLMModelThrashing fires when it happens more than {THRASHING} "
                "times within an hour.",
                PER_HOUR,
                [
                    query(
                        "3600 * ("
                        f"sum by ({EXPORTER}, provider, model) (rate(llm_model_unloads_total"
                        f'{{{PM}, cause="evicted"}}[{RATE}]))'
                        f" < sum by ({EXPORTER}, provider, model)"
                        f" (rate(llm_model_loads_total{{{PM}}}[{RATE}]))"
                        f" or sum by ({EXPORTER}, provider, model)"
                        f" (rate(llm_model_loads_total{{{PM}}}[{RATE}]))"
                        ")",
                        per_model,
                    )
                ],
            )
        )
        .with_panel(
            series_panel(
                "Model load duration",
                "Median and 95th percentile of the time each load of a model took, one "
                "observation per load the lifecycle watcher saw: as the request that waited for "
                "it reported (Ollama's load_duration, from the gateway or a probe), else from "
                "loading to loaded (llama.cpp in router mode). LLMModelLoadSlow fires when the "
                f"95th percentile over an hour passes {LOAD_SLOW_SECONDS:g} s. (With "
                "lifecycle.watch off: one observation per probe, near 0 when the model was "
                "loaded.)",
                "s",
                quantiles("llm_model_load_duration_seconds", (0.5, 0.95)),
            )
        )
        .with_panel(
            heatmap_panel(
                "Model load duration heatmap",
                "Distribution of the load times over the selected models, one observation per "
                "load the lifecycle watcher saw.",
                f"sum by (le) (increase(llm_model_load_duration_seconds_bucket{{{PM}}}[{RATE}]))",
            )
        )
        .with_panel(
            series_panel(
                "Time loaded",
                "How long each model has been in memory since the lifecycle watcher saw it "
                "load (models loaded before the exporter started are not shown): a saw-tooth "
                "that drops at each reload.",
                "s",
                [query(f"time() - llm_model_loaded_timestamp_seconds{{{PM}}}", per_model)],
                w=8,
            )
        )
        .with_panel(
            series_panel(
                "Time since last use",
                "How long since the last request for each loaded model through the gateway "
                "ended (models used only around the gateway are not shown): candidates for "
                "lifecycle.idle_unload.",
                "s",
                [
                    query(
                        f"(time() - llm_model_last_used_timestamp_seconds{{{PM}}})"
                        f" and on ({EXPORTER}, provider, model) llm_model_loaded{{{PM}}} == 1",
                        per_model,
                    )
                ],
                w=8,
            )
        )
        .with_panel(
            series_panel(
                "VRAM per loaded model",
                "GPU memory each loaded model takes, stacked per provider (Ollama's size_vram; "
                "the LLM Resources dashboard compares it with the model's total).",
                "bytes",
                [
                    query(
                        f'sum by ({EXPORTER}, provider, model) (llm_model_memory_bytes{{{PM}, memory="vram"}})',
                        per_model,
                    )
                ],
                w=8,
                stacked=True,
            )
        )
        .with_panel(
            state_panel(
                "Pinned models",
                "Each model the lifecycle policy pins (lifecycle.pin): loaded, held asleep, or "
                "not loaded. The policy loads a pinned model again whenever it goes; "
                "LLMPinnedModelNotLoaded fires when one stays not loaded for 10 minutes while "
                "its provider is up.",
                [
                    query(
                        f"(max by ({EXPORTER}, provider, model) (llm_model_sleeping{{{PM}}}) == 1) * 2"
                        f" * on ({EXPORTER}, provider, model) max by ({EXPORTER}, provider, model) (llm_model_pinned{{{PM}}})"
                        f" or max by ({EXPORTER}, provider, model) (llm_model_loaded{{{PM}}})"
                        f" * on ({EXPORTER}, provider, model) max by ({EXPORTER}, provider, model) (llm_model_pinned{{{PM}}})"
                        f" or max by ({EXPORTER}, provider, model) (llm_model_pinned{{{PM}}}) * 0",
                        per_model,
                    )
                ],
                value_map(*PINNED_STATES),
                w=8,
            )
        )
        .with_panel(
            series_panel(
                "Policy actions and failed reads",
                "Loads and unloads the lifecycle policy asked of each provider in each interval, "
                "by action, reason (pin, preload, idle, max_loaded, max_memory) and outcome; and "
                "the watcher's reads of what the provider holds that failed (while they fail, no "
                "event is seen; 0 while none).",
                "short",
                [
                    query(
                        f"sum by ({EXPORTER}, provider, action, reason, outcome)"
                        f" (increase(llm_lifecycle_actions_total{{{P}}}[{RATE}]))",
                        "{{instance}} {{provider}} {{action}} {{reason}} {{outcome}}",
                        ref="A",
                    ),
                    query(
                        f"sum by ({EXPORTER}, provider) (increase(llm_lifecycle_reads_total"
                        f'{{{P}, outcome="failure"}}[{RATE}]))'
                        f" or sum by ({EXPORTER}, provider)"
                        f" (increase(llm_lifecycle_reads_total{{{P}}}[{RATE}])) * 0",
                        "{{instance}} {{provider}} failed reads",
                        ref="B",
                    ),
                ],
                w=8,
                stacked=True,
            )
        )
        .with_panel(
            state_panel(
                "Sleeping models",
                "Models held in memory, awake or asleep (vLLM's sleep mode, llama.cpp's router: "
                "the weights released, the server kept; the next request wakes it).",
                [query(f"llm_model_sleeping{{{PM}}}", per_model)],
                value_map(("0", "awake", GREEN), ("1", "asleep", BLUE)),
                w=8,
            )
        )
    )


# --- output --------------------------------------------------------------------------------


def _number_panels(dashboard: dict[str, Any]) -> None:
    """Give every panel (rows and the panels in rows included) a stable id in layout order."""
    next_id = 1
    for item in dashboard.get("panels", []):
        item["id"] = next_id
        next_id += 1
        for inner in item.get("panels", []):
            inner["id"] = next_id
            next_id += 1


def build_dashboards() -> dict[str, dict[str, Any]]:
    """Every dashboard as JSON-ready dicts, by uid."""
    built = {}
    for builder in (overview(), performance(), traffic(), resources(), models_dashboard()):
        dashboard: dict[str, Any] = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
        _number_panels(dashboard)
        built[dashboard["uid"]] = dashboard
    return built


def render() -> dict[str, str]:
    """The file contents to write, by file name: 2-space indent, sorted keys, a final newline."""
    return {
        f"{uid}.json": json.dumps(dashboard, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        for uid, dashboard in build_dashboards().items()
    }


def stale(out_dir: Path = OUT_DIR) -> list[str]:
    """Files in out_dir that differ from what render() gives, are missing or should not be there."""
    wanted = render()
    differ = [
        name
        for name, text in wanted.items()
        if not (out_dir / name).is_file() or (out_dir / name).read_text(encoding="utf-8") != text
    ]
    extra = (
        [p.name for p in out_dir.glob("*.json") if p.name not in wanted] if out_dir.is_dir() else []
    )
    return sorted(differ + extra)


def write(out_dir: Path = OUT_DIR) -> list[Path]:
    """Write every dashboard into out_dir; the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render().items():
        path = out_dir / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def load(out_dir: Path = OUT_DIR) -> dict[str, dict[str, Any]]:
    """The committed dashboards, by uid."""
    loaded = {}
    for path in sorted(out_dir.glob("*.json")):
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        loaded[dashboard["uid"]] = dashboard
    return loaded


# --- helpers for the tests -----------------------------------------------------------------


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that is not a row: top-level ones and those inside (collapsed) rows."""
    for item in dashboard.get("panels", []):
        if item.get("type") == "row":
            yield from item.get("panels", [])
        else:
            yield item


def panel_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every target of every panel."""
    return [
        (item.get("title", ""), target["expr"])
        for item in iter_panels(dashboard)
        for target in item.get("targets", [])
        if "expr" in target
    ]


def variable_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(variable name, query) of every query variable (label_values(...) on the datasource)."""
    return [
        (variable["name"], variable["query"])
        for variable in dashboard.get("templating", {}).get("list", [])
        if variable.get("type") == "query"
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if grafana/dashboards/*.json differ from what this script writes",
    )
    args = parser.parse_args(argv)
    if args.check:
        differ = stale()
        for name in differ:
            print(
                f"out of date: {OUT_DIR / name} (run python grafana/dashboards.py)", file=sys.stderr
            )
        return 1 if differ else 0
    for path in write():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
