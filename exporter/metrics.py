"""Renders snapshots into metric families. Every metric name is declared here, once."""

from __future__ import annotations

import platform
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from . import __version__
from .client import ConnectionStats
from .collector import Collection, ProviderResult
from .gateway import GatewayStats
from .gateway.stats import REJECTED_FULL, REJECTED_TIMEOUT, CacheStats, QueueStats
from .health import Status
from .lifecycle import CAUSES, LifecycleStats
from .multitarget import Probed
from .probes import ProbeStats
from .providers.base import EngineSnapshot, HistogramData, Residence


@dataclass(frozen=True)
class Spec:
    """A metric's name, type, help and label names."""

    name: str
    type: str
    help: str
    labels: tuple[str, ...] = ()

    def family(self) -> Metric:
        """A new, empty metric family for this spec."""
        if self.type == "counter":
            return CounterMetricFamily(
                self.name.removesuffix("_total"), self.help, labels=self.labels
            )
        if self.type == "histogram":
            return HistogramMetricFamily(self.name, self.help, labels=self.labels)
        return GaugeMetricFamily(self.name, self.help, labels=self.labels)


P = ("provider",)
PM = ("provider", "model")
SPECS = {
    s.name: s
    for s in (
        # Providers, read at scrape time.
        Spec("llm_provider_up", "gauge", "1 if the provider answered its status endpoint.", (*P, "kind")),
        Spec("llm_provider_ready", "gauge", "1 if the provider is ready to serve (0 while it loads a model).", P),
        Spec("llm_provider_info", "gauge", "The provider's kind and version (always 1).", (*P, "kind", "version")),
        Spec("llm_provider_response_time_seconds", "gauge", "How long the provider's status endpoint took to answer.", P),
        Spec("llm_exporter_scrape_duration_seconds", "gauge", "How long collecting this provider took.", P),
        Spec("llm_exporter_scrape_success", "gauge", "1 if every request of this provider's collection succeeded.", P),
        Spec("llm_exporter_series_dropped", "gauge", "Label values of the provider dropped or folded into \"other\" in this scrape to keep series bounded, by family (\"all\": the provider was over max_series).", (*P, "family")),
        # Requests the exporter itself made to providers, since it started.
        Spec("llm_provider_requests_total", "counter", "Requests the exporter made to the provider, by endpoint and outcome (success or failure class).", (*P, "endpoint", "outcome")),
        Spec("llm_provider_request_duration_seconds", "histogram", "Duration of the requests the exporter made to the provider.", P),
        Spec("llm_provider_request_retries_total", "counter", "Requests retried on a fresh connection after the provider closed an idle keep-alive one.", (*P, "endpoint")),
        Spec("llm_provider_last_request_timestamp_seconds", "gauge", "When the exporter last finished a request to the provider.", P),
        # Models.
        Spec("llm_model_info", "gauge", "A model the provider knows, with its details (always 1).", (*PM, "family", "parameter_size", "quantization", "format")),
        Spec("llm_model_loaded", "gauge", "1 if the model is loaded in memory, 0 if it is only on disk or asleep (its weights released).", PM),
        Spec("llm_model_size_bytes", "gauge", "Size of the model's file on disk.", PM),
        Spec("llm_model_memory_bytes", "gauge", "Memory the loaded model takes: total, and the part in GPU memory (vram).", (*PM, "memory")),
        Spec("llm_model_context_tokens", "gauge", "Context length the model is served with, in tokens.", PM),
        Spec("llm_model_expiry_timestamp_seconds", "gauge", "When the provider will unload the model if it stays idle.", PM),
        # What the serving engine reports about its own work.
        Spec("llm_requests_running", "gauge", "Requests the provider is processing now.", PM),
        Spec("llm_requests_waiting", "gauge", "Requests queued at the provider, waiting to be processed.", PM),
        Spec("llm_kv_cache_usage_ratio", "gauge", "Share of the KV cache in use, from 0 to 1.", PM),
        Spec("llm_kv_cache_block_size_tokens", "gauge", "Tokens one block of the KV cache holds.", PM),
        Spec("llm_kv_cache_blocks", "gauge", "Blocks of the KV cache on the accelerator.", PM),
        Spec("llm_requests_preempted_total", "counter", "Requests the provider preempted (their KV cache evicted, to be recomputed or swapped back).", PM),
        Spec("llm_requests_rejected_total", "counter", "Requests the provider's own admission limit turned away, by reason (vLLM: max_num_queued_reqs, max_num_queued_tokens; TGI: overloaded).", (*PM, "reason")),
        Spec("llm_slots", "gauge", "The provider's processing slots, by state (busy or idle).", (*PM, "state")),
        Spec("llm_tokens_total", "counter", "Tokens the provider processed, by type (input: every prompt token, cached or not, as OpenTelemetry counts them; output: generated).", (*PM, "type")),
        Spec("llm_input_tokens_cached_total", "counter", "Prompt tokens the provider reused from its cache instead of evaluating.", PM),
        Spec("llm_token_processing_seconds_total", "counter", "Time the provider spent evaluating prompts (input) and generating (output), summed over requests.", (*PM, "type")),
        Spec("llm_tokens_per_second", "gauge", "The provider's own average throughput, by type.", (*PM, "type")),
        Spec("llm_requests_finished_total", "counter", "Requests the provider finished, by reason (vLLM, TensorRT-LLM: stop, length, abort, error; TGI: success or its error class).", (*PM, "reason")),
        Spec("llm_time_to_first_token_seconds", "histogram", "Time to first token of the provider's requests, as the provider measured it.", PM),
        Spec("llm_request_duration_seconds", "histogram", "End-to-end duration of the provider's requests, as the provider measured it.", PM),
        Spec("llm_inter_token_latency_seconds", "histogram", "Time between output tokens of the provider's requests, as the provider measured it.", PM),
        Spec("llm_request_queue_duration_seconds", "histogram", "Time the provider's requests waited in its queue.", PM),
        # Synthetic probes: small streamed generations the exporter sends on a schedule.
        Spec("llm_probe_requests_total", "counter", "Synthetic probe requests sent on a schedule, by outcome (success or failure class, including empty_response).", (*PM, "outcome")),
        Spec("llm_probe_duration_seconds", "histogram", "Total duration of successful synthetic probe requests, sent on a schedule.", PM),
        Spec("llm_probe_time_to_first_token_seconds", "histogram", "Time from sending a synthetic probe request to its first generated token.", PM),
        Spec("llm_probe_time_per_output_token_seconds", "histogram", "Time per generated token after the first, in synthetic probe requests.", PM),
        Spec("llm_probe_tokens_total", "counter", "Tokens of successful synthetic probe requests, by type (input, output), as the provider counted them.", (*PM, "type")),
        Spec("llm_probe_tokens_per_second", "gauge", "Generation speed of the last successful synthetic probe: output tokens after the first per second.", PM),
        Spec("llm_probe_last_run_timestamp_seconds", "gauge", "When the last synthetic probe of the model finished, successful or not.", PM),
        Spec("llm_probe_last_success_timestamp_seconds", "gauge", "When the last successful synthetic probe of the model finished.", PM),
        # Model lifecycle: what the watcher saw load and unload, and what the policy did.
        Spec("llm_model_loads_total", "counter", "Loads of the model the lifecycle watcher saw.", PM),
        Spec("llm_model_unloads_total", "counter", "Unloads of the model the lifecycle watcher saw, by cause (idle: its keep-alive expired; evicted: another model was loaded while it was within its keep-alive; requested: by the policy or a client's keep_alive 0; failed: its server process failed; unknown).", (*PM, "cause")),
        Spec("llm_model_load_failures_total", "counter", "Loads of the model that failed, as the lifecycle watcher saw them.", PM),
        Spec("llm_model_sleeps_total", "counter", "Times the model was put to sleep (its memory released, its server kept), as the lifecycle watcher saw them.", PM),
        Spec("llm_model_wakes_total", "counter", "Times the model woke from sleep, as the lifecycle watcher saw them.", PM),
        Spec("llm_model_sleeping", "gauge", "1 if the model is held asleep, 0 if it is loaded and awake (models not in memory have no series).", PM),
        Spec("llm_model_load_duration_seconds", "histogram", "Time each load of the model took: as the request that waited for it reported (Ollama's load_duration, from a probe or the gateway), else from the watcher's loading to loaded.", PM),
        Spec("llm_model_loaded_timestamp_seconds", "gauge", "When the lifecycle watcher saw the model load (models loaded before the exporter started have no series).", PM),
        Spec("llm_model_last_used_timestamp_seconds", "gauge", "When the last request for the model through the gateway ended.", PM),
        Spec("llm_model_pinned", "gauge", "1 for each model the lifecycle policy keeps loaded (lifecycle.pin).", PM),
        Spec("llm_lifecycle_actions_total", "counter", "Loads and unloads the lifecycle policy asked of the provider, by action (load, unload), reason (pin, preload, idle, max_loaded, max_memory) and outcome (success, failure).", (*P, "action", "reason", "outcome")),
        Spec("llm_lifecycle_reads_total", "counter", "Reads by the lifecycle watcher of which models the provider holds, by outcome (success, failure).", (*P, "outcome")),
        # The measuring gateway: real requests that clients sent through it, since start.
        Spec("llm_gateway_requests_total", "counter", "Requests clients sent through the gateway, by operation, status class the client got (code, \"none\" if it got no answer), outcome (complete, abandoned, upstream_failed, timeout; rejected: turned away by the gateway's queue; cached: answered from the gateway's cache) and client.", (*PM, "operation", "code", "outcome", "client")),
        Spec("llm_gateway_request_duration_seconds", "histogram", "Duration of requests the gateway forwarded to the provider, from the request's arrival (so including any wait in the gateway's queue) to the answer's last byte.", (*PM, "operation")),
        Spec("llm_gateway_time_to_first_token_seconds", "histogram", "Time from a streamed request's arrival at the gateway (so including any wait in its queue) to the first chunk carrying generated output.", (*PM, "operation")),
        Spec("llm_gateway_time_per_output_token_seconds", "histogram", "Time per generated token after the first, in streamed requests through the gateway.", (*PM, "operation")),
        Spec("llm_gateway_tokens_total", "counter", "Tokens of requests through the gateway, by type (input: every prompt token, cached or not; output), source (usage: the provider's own count; stream_chunks: content chunks of a stream without usage, one per token) and client.", (*PM, "type", "source", "client")),
        Spec("llm_gateway_input_tokens_cached_total", "counter", "Prompt tokens of requests through the gateway that the provider reused from its cache (part of the input tokens).", PM),
        Spec("llm_gateway_requests_in_flight", "gauge", "Requests the gateway has forwarded to the provider that have not finished (requests waiting in its queue are in llm_gateway_queue_waiting).", PM),
        Spec("llm_gateway_upstream_retries_total", "counter", "Requests the gateway sent again on a new connection because the provider had closed the pooled one.", P),
        Spec("llm_gateway_unmetered_responses_total", "counter", "Answers relayed whose usage could not be read, by reason (too_large, encoding, invalid_json).", (*P, "reason")),
        Spec("llm_gateway_connections", "gauge", "Client connections open to the gateway.", P),
        Spec("llm_gateway_connections_closed_total", "counter", "Client connections the gateway closed because max_connections were open.", P),
        # The gateway's admission queue (gateway.queue).
        Spec("llm_gateway_queue_waiting", "gauge", "Requests waiting in the gateway's queue for a slot at the provider, by priority.", (*P, "priority")),
        Spec("llm_gateway_queue_running", "gauge", "Requests the gateway's queue has let through to the provider that hold a slot now.", P),
        Spec("llm_gateway_queue_max_concurrent", "gauge", "Slots: requests the gateway lets through to the provider at once (queue.max_concurrent).", P),
        Spec("llm_gateway_queue_max_waiting", "gauge", "Requests that may wait in the gateway's queue (queue.max_waiting).", P),
        Spec("llm_gateway_queue_wait_seconds", "histogram", "Time requests spent in the gateway's queue, by how the wait ended (dispatched, rejected_full, rejected_timeout, cancelled).", (*P, "outcome")),
        Spec("llm_gateway_queue_rejections_total", "counter", "Requests the gateway's queue turned away, by reason (queue_full: max_waiting were waiting; wait_timeout: no slot within max_wait).", (*P, "reason")),
        Spec("llm_gateway_queue_service_rate", "gauge", "Requests per second the provider finishes with every slot busy, estimated from recent service times (max_concurrent over their moving average); the basis of Retry-After.", P),
        # The gateway's response cache (gateway.cache).
        Spec("llm_gateway_cache_lookups_total", "counter", "Generation and embedding requests by what the cache did: hit (answered from it), miss (forwarded, stored if it may be), bypass (not eligible, see llm_gateway_cache_bypasses_total).", (*P, "result")),
        Spec("llm_gateway_cache_bypasses_total", "counter", "Requests that bypassed the cache, by reason (stream, sampling, no_cache, body).", (*P, "reason")),
        Spec("llm_gateway_cache_entries", "gauge", "Answers in the gateway's cache.", P),
        Spec("llm_gateway_cache_bytes", "gauge", "Bytes the gateway's cache holds: answers, their headers and keys, and a fixed cost per entry.", P),
        Spec("llm_gateway_cache_max_entries", "gauge", "Answers the gateway's cache may hold (cache.max_entries).", P),
        Spec("llm_gateway_cache_max_bytes", "gauge", "Bytes the gateway's cache may hold (cache.max_bytes).", P),
        Spec("llm_gateway_cache_evictions_total", "counter", "Answers dropped from the gateway's cache, by reason (expired: older than ttl; max_entries, max_bytes: least recently used, to make room).", (*P, "reason")),
        Spec("llm_gateway_cache_saved_tokens_total", "counter", "Tokens the provider did not have to process because the cache answered, by type (input, output), as the stored answers' usage says.", (*P, "type")),
        Spec("llm_gateway_cache_saved_seconds_total", "counter", "Seconds the provider took for the answers that cache hits repeated.", P),
        # /probe (blackbox_exporter's names): the target's series above, and these.
        Spec("probe_success", "gauge", "1 if the probed target answered its status endpoint (its llm_provider_up).", ()),
        Spec("probe_duration_seconds", "gauge", "How long the probe of the target took.", ()),
        Spec("probe_generation_success", "gauge", "1 if the module's small streamed generation succeeded (module probe settings only).", ("model",)),
        Spec("probe_generation_failures", "gauge", "1 for the failure class of the module's generation when it failed.", ("model", "failure")),
        Spec("probe_generation_duration_seconds", "gauge", "How long the module's generation took, to its last token.", ("model",)),
        Spec("probe_generation_time_to_first_token_seconds", "gauge", "Time from sending the module's generation to its first token.", ("model",)),
        Spec("probe_generation_output_tokens", "gauge", "Tokens the module's generation produced, as the target counted them.", ("model",)),
        # The host.
        Spec("llm_host_cpu_usage_ratio", "gauge", "Share of the host's CPU time in use since the previous collection, from 0 to 1.", ()),
        Spec("llm_host_cpus", "gauge", "Logical CPUs of the host.", ()),
        Spec("llm_host_memory_used_bytes", "gauge", "Host memory in use (total less available).", ()),
        Spec("llm_host_memory_available_bytes", "gauge", "Host memory available to new work without swapping.", ()),
        Spec("llm_host_memory_total_bytes", "gauge", "Host memory in total.", ()),
        Spec("llm_host_boot_time_seconds", "gauge", "When the host booted.", ()),
        Spec("llm_host_disk_used_bytes", "gauge", "Space used on a configured mount point.", ("mountpoint",)),
        Spec("llm_host_disk_total_bytes", "gauge", "Size of a configured mount point.", ("mountpoint",)),
        # Provider processes on this host.
        Spec("llm_provider_process_resident_memory_bytes", "gauge", "Resident memory of the provider's process.", P),
        Spec("llm_provider_process_cpu_seconds_total", "counter", "CPU time (user and system) the provider's process used.", P),
        Spec("llm_provider_process_start_time_seconds", "gauge", "When the provider's process started.", P),
        Spec("llm_provider_process_open_fds", "gauge", "Open file descriptors of the provider's process.", P),
        Spec("llm_provider_process_gpu_memory_bytes", "gauge", "GPU memory the provider's process uses, per GPU.", (*P, "gpu")),
        # GPUs.
        Spec("llm_gpu_info", "gauge", "A GPU's name and UUID (always 1).", ("gpu", "name", "uuid")),
        Spec("llm_gpu_memory_used_bytes", "gauge", "GPU memory in use.", ("gpu",)),
        Spec("llm_gpu_memory_total_bytes", "gauge", "GPU memory in total.", ("gpu",)),
        Spec("llm_gpu_utilization_ratio", "gauge", "Share of time the GPU was busy over the driver's last sample period, from 0 to 1.", ("gpu",)),
        Spec("llm_gpu_temperature_celsius", "gauge", "GPU temperature.", ("gpu",)),
        Spec("llm_gpu_power_watts", "gauge", "GPU power draw.", ("gpu",)),
        # Health and the exporter itself.
        Spec("llm_health_status", "gauge", "Health of a component: 1 for its current state (healthy, degraded, unhealthy), 0 for the others.", ("component", "provider", "state")),
        Spec("llm_exporter_build_info", "gauge", "The exporter's version (always 1).", ("version", "python_version")),
        Spec("llm_exporter_config_last_reload_successful", "gauge", "1 if the last configuration reload succeeded.", ()),
        Spec("llm_exporter_config_last_reload_success_timestamp_seconds", "gauge", "When the configuration was last loaded successfully.", ()),
        Spec("llm_exporter_http_connections", "gauge", "Client connections open to the exporter's HTTP server.", ()),
        Spec("llm_exporter_http_connections_closed_total", "counter", "Client connections closed because --web.max-connections were open (the oldest idle one first).", ()),
        Spec("llm_exporter_http_bad_requests_total", "counter", "Malformed HTTP requests received (answered 400 and logged at debug level).", ()),
    )
}  # fmt: skip


class _Families:
    """Families created on first use, in declaration order."""

    def __init__(self) -> None:
        self.by_name: dict[str, Metric] = {}

    def __getitem__(self, name: str) -> Any:
        family = self.by_name.get(name)
        if family is None:
            family = self.by_name[name] = SPECS[name].family()
        return family

    def add(self, name: str, labels: Iterable[str], value: float | None) -> None:
        if value is not None:
            self[name].add_metric(list(labels), value)

    def histogram(self, name: str, labels: list[str], data: HistogramData | None) -> None:
        if data is None or not data.buckets:
            return
        buckets = [(_bound(bound), count) for bound, count in data.buckets]
        self[name].add_metric(labels, buckets, data.sum)

    def __iter__(self) -> Iterator[Metric]:
        return (self.by_name[name] for name in SPECS if name in self.by_name)


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))


def _provider(out: _Families, result: ProviderResult) -> None:
    name, snapshot = result.config.name, result.snapshot
    out.add("llm_provider_up", [name, result.config.kind], float(snapshot.up))
    out.add("llm_exporter_scrape_duration_seconds", [name], result.duration_seconds)
    out.add("llm_exporter_scrape_success", [name], float(result.success))
    for family, count in sorted(result.dropped.items()):
        out.add("llm_exporter_series_dropped", [name, family], float(count))
    if not snapshot.up:
        return
    out.add("llm_provider_ready", [name], float(snapshot.ready))
    out.add("llm_provider_info", [name, result.config.kind, snapshot.version], 1.0)
    out.add("llm_provider_response_time_seconds", [name], snapshot.response_time_seconds)
    for model in snapshot.models:
        labels = [name, model.name]
        out.add(
            "llm_model_info",
            [*labels, model.family, model.parameter_size, model.quantization, model.format],
            1.0,
        )
        out.add("llm_model_loaded", labels, None if model.loaded is None else float(model.loaded))
        out.add("llm_model_size_bytes", labels, model.size_bytes)
        out.add("llm_model_memory_bytes", [*labels, "total"], model.memory_bytes)
        out.add("llm_model_memory_bytes", [*labels, "vram"], model.vram_bytes)
        out.add("llm_model_context_tokens", labels, model.context_length)
        out.add("llm_model_expiry_timestamp_seconds", labels, model.expires_at)
    for engine in snapshot.engines:
        _engine(out, name, engine)


def _engine(out: _Families, provider: str, engine: EngineSnapshot) -> None:
    labels = [provider, engine.model]
    out.add("llm_requests_running", labels, engine.requests_running)
    out.add("llm_requests_waiting", labels, engine.requests_waiting)
    out.add("llm_kv_cache_usage_ratio", labels, engine.kv_cache_usage_ratio)
    out.add("llm_kv_cache_block_size_tokens", labels, engine.kv_cache_block_size_tokens)
    out.add("llm_kv_cache_blocks", labels, engine.kv_cache_blocks)
    out.add("llm_requests_preempted_total", labels, engine.preempted_requests_total)
    for reason, count in sorted(engine.rejected_requests.items()):
        out.add("llm_requests_rejected_total", [*labels, reason], count)
    out.add("llm_slots", [*labels, "busy"], engine.slots_busy)
    out.add("llm_slots", [*labels, "idle"], engine.slots_idle)
    out.add("llm_tokens_total", [*labels, "input"], engine.input_tokens_total)
    out.add("llm_tokens_total", [*labels, "output"], engine.output_tokens_total)
    out.add("llm_input_tokens_cached_total", labels, engine.cached_input_tokens_total)
    out.add("llm_token_processing_seconds_total", [*labels, "input"], engine.input_seconds_total)
    out.add("llm_token_processing_seconds_total", [*labels, "output"], engine.output_seconds_total)
    out.add("llm_tokens_per_second", [*labels, "input"], engine.input_tokens_per_second)
    out.add("llm_tokens_per_second", [*labels, "output"], engine.output_tokens_per_second)
    for reason, count in sorted(engine.finished_requests.items()):
        out.add("llm_requests_finished_total", [*labels, reason], count)
    out.histogram("llm_time_to_first_token_seconds", labels, engine.time_to_first_token)
    out.histogram("llm_request_duration_seconds", labels, engine.request_duration)
    out.histogram("llm_inter_token_latency_seconds", labels, engine.inter_token_latency)
    out.histogram("llm_request_queue_duration_seconds", labels, engine.queue_duration)


def _connections(out: _Families, stats: ConnectionStats) -> None:
    for (provider, endpoint), endpoint_stats in sorted(stats.endpoints.items()):
        for outcome, count in sorted(endpoint_stats.outcomes.items()):
            out.add("llm_provider_requests_total", [provider, endpoint, outcome], count)
        retries = float(endpoint_stats.retries)
        out.add("llm_provider_request_retries_total", [provider, endpoint], retries)
    for provider, durations in sorted(stats.durations.items()):
        out.histogram("llm_provider_request_duration_seconds", [provider], durations.data())
    for provider, at in sorted(stats.last_request.items()):
        out.add("llm_provider_last_request_timestamp_seconds", [provider], at)


def _probes(out: _Families, stats: ProbeStats) -> None:
    for (provider, model), probe in sorted(stats.models.items()):
        labels = [provider, model]
        for outcome, count in sorted(probe.outcomes.items()):
            out.add("llm_probe_requests_total", [*labels, outcome], count)
        if not probe.last_success:
            out.add("llm_probe_last_run_timestamp_seconds", labels, probe.last_run)
            continue
        out.histogram("llm_probe_duration_seconds", labels, probe.duration.data())
        out.histogram(
            "llm_probe_time_to_first_token_seconds", labels, probe.time_to_first_token.data()
        )
        out.histogram(
            "llm_probe_time_per_output_token_seconds", labels, probe.time_per_output_token.data()
        )
        out.add("llm_probe_tokens_total", [*labels, "input"], probe.input_tokens)
        out.add("llm_probe_tokens_total", [*labels, "output"], probe.output_tokens)
        out.add("llm_probe_tokens_per_second", labels, probe.tokens_per_second)
        out.add("llm_probe_last_run_timestamp_seconds", labels, probe.last_run)
        out.add("llm_probe_last_success_timestamp_seconds", labels, probe.last_success)


def _lifecycle(out: _Families, stats: LifecycleStats) -> None:
    for provider, lifecycle in sorted(stats.providers.items()):
        for model, record in sorted(lifecycle.records.items()):
            labels = [provider, model]
            out.add("llm_model_loads_total", labels, record.loads)
            for cause in CAUSES:
                out.add("llm_model_unloads_total", [*labels, cause], record.unloads.get(cause, 0))
            out.add("llm_model_load_failures_total", labels, record.load_failures)
            out.add("llm_model_sleeps_total", labels, record.sleeps)
            out.add("llm_model_wakes_total", labels, record.wakes)
            if record.residence in (Residence.LOADED, Residence.SLEEPING):
                sleeping = float(record.residence is Residence.SLEEPING)
                out.add("llm_model_sleeping", labels, sleeping)
                out.add("llm_model_loaded_timestamp_seconds", labels, record.loaded_at)
            if record.load_duration.observed:
                out.histogram(
                    "llm_model_load_duration_seconds", labels, record.load_duration.data()
                )
            out.add("llm_model_last_used_timestamp_seconds", labels, record.last_used)
        for model in lifecycle.config.lifecycle.pin:
            out.add("llm_model_pinned", [provider, model], 1.0)
    for (provider, action, reason, outcome), count in sorted(stats.actions.items()):
        out.add("llm_lifecycle_actions_total", [provider, action, reason, outcome], count)
    for (provider, outcome), count in sorted(stats.reads.items()):
        out.add("llm_lifecycle_reads_total", [provider, outcome], count)


def _gateway(out: _Families, stats: GatewayStats) -> None:
    for provider, traffic in sorted(stats.providers.items()):
        for request_key, count in sorted(traffic.requests.items()):
            out.add("llm_gateway_requests_total", [provider, *request_key], count)
        for (model, operation), latencies in sorted(traffic.latencies.items()):
            labels = [provider, model, operation]
            out.histogram("llm_gateway_request_duration_seconds", labels, latencies.duration.data())
            for name, buckets in (
                ("llm_gateway_time_to_first_token_seconds", latencies.time_to_first_token),
                ("llm_gateway_time_per_output_token_seconds", latencies.time_per_output_token),
            ):
                if buckets.observed:
                    out.histogram(name, labels, buckets.data())
        for tokens_key, count in sorted(traffic.tokens.items()):
            out.add("llm_gateway_tokens_total", [provider, *tokens_key], count)
        for model, count in sorted(traffic.cached_input_tokens.items()):
            out.add("llm_gateway_input_tokens_cached_total", [provider, model], count)
        for model, count in sorted(traffic.in_flight.items()):
            out.add("llm_gateway_requests_in_flight", [provider, model], count)
        out.add("llm_gateway_upstream_retries_total", [provider], traffic.retries)
        for reason, count in sorted(traffic.unmetered.items()):
            out.add("llm_gateway_unmetered_responses_total", [provider, reason], count)
        out.add("llm_gateway_connections", [provider], traffic.connections)
        out.add("llm_gateway_connections_closed_total", [provider], traffic.connections_closed)
        if traffic.queue is not None:
            _queue(out, provider, traffic.queue)
        if traffic.cache is not None:
            _cache(out, provider, traffic.cache)


REJECTION_REASONS = {REJECTED_FULL: "queue_full", REJECTED_TIMEOUT: "wait_timeout"}


def _queue(out: _Families, provider: str, queue: QueueStats) -> None:
    for priority, count in sorted(queue.waiting_by_priority.items()):
        out.add("llm_gateway_queue_waiting", [provider, str(priority)], count)
    out.add("llm_gateway_queue_running", [provider], queue.running)
    out.add("llm_gateway_queue_max_concurrent", [provider], queue.max_concurrent)
    out.add("llm_gateway_queue_max_waiting", [provider], queue.max_waiting)
    for outcome, buckets in queue.wait.items():
        out.histogram("llm_gateway_queue_wait_seconds", [provider, outcome], buckets.data())
    for outcome, reason in REJECTION_REASONS.items():
        out.add(
            "llm_gateway_queue_rejections_total", [provider, reason], queue.wait[outcome].observed
        )
    if queue.service_rate is not None:
        out.add("llm_gateway_queue_service_rate", [provider], queue.service_rate)


def _cache(out: _Families, provider: str, cache: CacheStats) -> None:
    for result, count in cache.lookups.items():
        out.add("llm_gateway_cache_lookups_total", [provider, result], count)
    for reason, count in sorted(cache.bypasses.items()):
        out.add("llm_gateway_cache_bypasses_total", [provider, reason], count)
    out.add("llm_gateway_cache_entries", [provider], cache.entries)
    out.add("llm_gateway_cache_bytes", [provider], cache.bytes)
    out.add("llm_gateway_cache_max_entries", [provider], cache.max_entries)
    out.add("llm_gateway_cache_max_bytes", [provider], cache.max_bytes)
    for reason, count in sorted(cache.evictions.items()):
        out.add("llm_gateway_cache_evictions_total", [provider, reason], count)
    for kind, count in cache.saved_tokens.items():
        out.add("llm_gateway_cache_saved_tokens_total", [provider, kind], count)
    out.add("llm_gateway_cache_saved_seconds_total", [provider], cache.saved_seconds)


def _resources(out: _Families, collection: Collection) -> None:
    host = collection.resources.host
    if host is not None:
        out.add("llm_host_cpu_usage_ratio", [], host.cpu_usage_ratio)
        out.add("llm_host_cpus", [], float(host.cpu_count))
        out.add("llm_host_memory_used_bytes", [], host.memory_used_bytes)
        out.add("llm_host_memory_available_bytes", [], host.memory_available_bytes)
        out.add("llm_host_memory_total_bytes", [], host.memory_total_bytes)
        out.add("llm_host_boot_time_seconds", [], host.boot_time_seconds)
        for disk in host.disks:
            out.add("llm_host_disk_used_bytes", [disk.mountpoint], disk.used_bytes)
            out.add("llm_host_disk_total_bytes", [disk.mountpoint], disk.total_bytes)
    pids = {}
    for name, process in sorted(collection.resources.processes.items()):
        pids[process.pid] = name
        out.add("llm_provider_process_resident_memory_bytes", [name], process.resident_memory_bytes)
        out.add("llm_provider_process_cpu_seconds_total", [name], process.cpu_seconds_total)
        out.add("llm_provider_process_start_time_seconds", [name], process.start_time_seconds)
        out.add("llm_provider_process_open_fds", [name], process.open_fds)
    for gpu in collection.resources.gpus:
        index = str(gpu.index)
        out.add("llm_gpu_info", [index, gpu.name, gpu.uuid], 1.0)
        out.add("llm_gpu_memory_used_bytes", [index], gpu.memory_used_bytes)
        out.add("llm_gpu_memory_total_bytes", [index], gpu.memory_total_bytes)
        out.add("llm_gpu_utilization_ratio", [index], gpu.utilization_ratio)
        out.add("llm_gpu_temperature_celsius", [index], gpu.temperature_celsius)
        out.add("llm_gpu_power_watts", [index], gpu.power_watts)
        for pid, used in sorted(gpu.process_memory_bytes.items()):
            if pid in pids:
                out.add("llm_provider_process_gpu_memory_bytes", [pids[pid], index], used)


def _health(out: _Families, collection: Collection) -> None:
    components = [*collection.health.components]
    for component in components:
        for state in Status:
            labels = [component.component, component.provider, state.value]
            out.add("llm_health_status", labels, float(component.status is state))
    for state in Status:
        out.add(
            "llm_health_status",
            ["overall", "", state.value],
            float(collection.health.status is state),
        )


@dataclass(frozen=True)
class ReloadState:
    """Whether the last configuration reload worked, and when a configuration last loaded."""

    successful: bool
    success_timestamp: float


@dataclass(frozen=True)
class HttpState:
    """The exporter's HTTP server: connections open, closed at the limit, malformed requests."""

    connections: int = 0
    connections_closed: int = 0
    bad_requests: int = 0


def render_probe(probed: Probed) -> list[Metric]:
    """The families of one /probe answer: the target's series, whether it answered and how
    long the probe took, and what its generation did, if it sent one."""
    out = _Families()
    _provider(out, probed.result)
    out.add("probe_success", [], float(probed.result.snapshot.up))
    out.add("probe_duration_seconds", [], probed.seconds)
    generation = probed.generation
    if generation is not None:
        labels, measured = [generation.model], generation.measurement
        out.add("probe_generation_success", labels, float(measured is not None))
        if measured is None:
            out.add("probe_generation_failures", [*labels, generation.failure], 1.0)
        else:
            out.add("probe_generation_duration_seconds", labels, measured.duration)
            first = measured.time_to_first_token
            out.add("probe_generation_time_to_first_token_seconds", labels, first)
            out.add("probe_generation_output_tokens", labels, measured.output_tokens)
    return list(out)


def render(
    collection: Collection,
    stats: ConnectionStats,
    probes: ProbeStats,
    reload: ReloadState,
    http: HttpState | None = None,
    gateway: GatewayStats | None = None,
    lifecycle: LifecycleStats | None = None,
) -> list[Metric]:
    """All metric families of one scrape."""
    out = _Families()
    for result in collection.providers:
        _provider(out, result)
    _connections(out, stats)
    _probes(out, probes)
    if lifecycle is not None:
        _lifecycle(out, lifecycle)
    if gateway is not None:
        _gateway(out, gateway)
    _resources(out, collection)
    _health(out, collection)
    out.add("llm_exporter_build_info", [__version__, platform.python_version()], 1.0)
    out.add("llm_exporter_config_last_reload_successful", [], float(reload.successful))
    out.add(
        "llm_exporter_config_last_reload_success_timestamp_seconds", [], reload.success_timestamp
    )
    if http is not None:
        out.add("llm_exporter_http_connections", [], float(http.connections))
        out.add("llm_exporter_http_connections_closed_total", [], float(http.connections_closed))
        out.add("llm_exporter_http_bad_requests_total", [], float(http.bad_requests))
    return list(out)
