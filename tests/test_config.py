"""Tests of the configuration file: every mistake's message, the defaults, the example, the docs."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import certifi
import pytest
import yaml

from exporter.cli import build_parser
from exporter.config import (
    CacheConfig,
    Config,
    GatewayConfig,
    GlobalConfig,
    HealthConfig,
    HostConfig,
    LifecycleConfig,
    ModuleConfig,
    ProbeConfig,
    ProbeModel,
    ProcessMatch,
    ProviderConfig,
    QueueConfig,
    Threshold,
    TLSConfig,
    dump_config,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)
from exporter.errors import ConfigError
from exporter.providers import KINDS

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "llm-exporter.example.yml"
DOCS = REPO / "docs" / "configuration.md"
UNSET = "LLM_EXPORTER_TEST_UNSET_VARIABLE"


def yml(*lines: str) -> str:
    """A YAML file from its lines, so that line N of the file is argument N."""
    return "\n".join(lines) + "\n"


def provider(*extra: str, kind: str = "ollama", url: str = "http://localhost:11434") -> str:
    """One valid provider (lines 1-4) followed by extra lines of the same provider (5 on)."""
    return yml("providers:", "  - name: local", f"    kind: {kind}", f"    url: {url}", *extra)


# (id, file text, the whole message). FILE is the file's path, DIR the directory it is in,
# which also holds empty.key (an empty file) and key (a secret).
INVALID = [
    (
        "gateway without listen",
        provider("    gateway: {idle_timeout: 1m}"),
        "FILE:5: providers[0].gateway.listen: is required",
    ),
    (
        "gateway listen not an address",
        provider("    gateway: {listen: localhost}"),
        'FILE:5: providers[0].gateway.listen: expected [host]:port, got "localhost"',
    ),
    (
        "two gateways on one port",
        provider("    gateway: {listen: '127.0.0.1:11435'}")
        + "  - {name: b, kind: ollama, url: 'http://h:1', gateway: {listen: ':11435'}}\n",
        "FILE:6: providers[1].gateway.listen: port 11435 is already taken by providers[0].gateway",
    ),
    (
        "gateway client key given instead of its digest",
        provider("    gateway:", "      listen: :11435", "      client_keys: {sk-abc123: me}"),
        "FILE:7: providers[0].gateway.client_keys.<prefix>: expected 8 to 64 lower-case hex"
        ' digits of the key\'s SHA-256 (printf %s "$KEY" | sha256sum | cut -c1-12), never the key'
        " itself",
    ),
    (
        "queue without its cap",
        provider("    gateway:", "      listen: :11435", "      queue: {max_waiting: 4}"),
        "FILE:7: providers[0].gateway.queue.max_concurrent: is required: the provider's"
        " parallelism (its slots, OLLAMA_NUM_PARALLEL, max_num_seqs)",
    ),
    (
        "queue overflow status neither 429 nor 503",
        provider(
            "    gateway:",
            "      listen: :1",
            "      queue: {max_concurrent: 1, overflow_status: 500}",
        ),
        "FILE:7: providers[0].gateway.queue.overflow_status: expected 429 or 503, got 500",
    ),
    (
        "queue priority out of range",
        provider(
            "    gateway:",
            "      listen: :1",
            "      client_header: X-Client",
            "      queue: {max_concurrent: 1, client_priorities: {ide: 11}}",
        ),
        "FILE:8: providers[0].gateway.queue.client_priorities.ide: expected a priority from -10"
        " to 10, got 11",
    ),
    (
        "queue priority for a client nobody names",
        provider(
            "    gateway:",
            "      listen: :1",
            "      queue: {max_concurrent: 1, client_priorities: {ide: 1}}",
        ),
        "FILE:7: providers[0].gateway.queue.client_priorities.ide: no such client: name it in"
        " gateway.client_keys, or set gateway.client_header",
    ),
    (
        "lifecycle policy on a kind that cannot load models",
        "providers:\n  - name: v\n    kind: vllm\n    url: http://h:1\n"
        "    lifecycle: {pin: [qwen]}\n",
        "FILE:5: providers[0].lifecycle: kind vllm cannot load or unload models: the lifecycle"
        " policy (pin, preload, max_loaded, max_memory, idle_unload) needs one that can: llamacpp,"
        " lmstudio, ollama",
    ),
    (
        "more models pinned than may be loaded",
        provider("    lifecycle: {pin: [a, b], max_loaded: 1}"),
        "FILE:5: providers[0].lifecycle.max_loaded: 2 models are pinned but at most 1 may be"
        " loaded: raise max_loaded or pin fewer",
    ),
    (
        "a policy without the watcher",
        provider("    lifecycle: {watch: false, idle_unload: 1h}"),
        "FILE:5: providers[0].lifecycle.watch: the policy acts on what the watcher sees:"
        " leave watch on",
    ),
    (
        "a model pinned twice",
        provider("    lifecycle: {pin: [a, a]}"),
        'FILE:5: providers[0].lifecycle.pin[1]: "a" is listed twice',
    ),
    (
        "a module without an allowlist",
        provider() + "modules:\n  vllm: {kind: vllm}\n",
        "FILE:6: modules.vllm.targets: is required: the hosts, networks or URL pattern this"
        " module may probe (the exporter never sends a module's key to any URL someone asks for)",
    ),
    (
        "a module with its key in the file",
        provider() + "modules:\n  vllm:\n    kind: vllm\n    api_key: sk-1\n",
        "FILE:8: modules.vllm.api_key: a module takes its key by reference only: api_key_file",
    ),
    (
        "a module's network is not one",
        provider() + "modules:\n  v:\n    kind: vllm\n    targets: {cidrs: [10.0.0.1/8]}\n",
        "FILE:8: modules.v.targets.cidrs[0]: not a network like 10.0.0.0/8: 10.0.0.1/8 has host"
        " bits set",
    ),
    (
        "a module's probe without its model",
        provider() + "modules:\n  v:\n    kind: vllm\n    targets: {hosts: [h]}\n"
        "    probe: {max_tokens: 4}\n",
        "FILE:9: modules.v.probe.model: is required",
    ),
    (
        "a provider label the exporter sets",
        provider("    labels: {provider: x}"),
        "FILE:5: providers[0].labels.provider: set by the exporter or Prometheus: choose another"
        " name",
    ),
    (
        "cache size without a unit",
        provider(
            "    gateway:", "      listen: :1", "      cache: {enabled: true, max_bytes: 1000}"
        ),
        "FILE:7: providers[0].gateway.cache.max_bytes: expected a size like 64MiB, got 1000"
        " (add a unit, as in 1000B or 1000MiB)",
    ),
    (
        "cache size of nothing",
        provider("    gateway:", "      listen: :1", "      cache: {max_bytes: 0MiB}"),
        "FILE:7: providers[0].gateway.cache.max_bytes: expected a size like 64MiB, got"
        ' "0MiB" (must be above zero)',
    ),
    (
        "probe timeout above the interval",
        provider("    probes:", "      interval: 10s", "      timeout: 20s"),
        "FILE:7: providers[0].probes.timeout: must not be above the interval (10s)",
    ),
    (
        "probe jitter of a whole interval",
        provider("    probes: {jitter: 1}"),
        "FILE:5: providers[0].probes.jitter: expected a fraction of the interval from 0 to 0.99,"
        " got 1",
    ),
    (
        "probe model without a name",
        provider("    probes:", "      models:", "        - allow_load: true"),
        "FILE:7: providers[0].probes.models[0].name: is required",
    ),
    (
        "probe max_tokens zero",
        provider("    probes: {max_tokens: 0}"),
        "FILE:5: providers[0].probes.max_tokens: expected a positive integer, got 0",
    ),
    (
        "probe failures threshold not a count",
        provider() + "health:\n  probe_failures: {degraded: 1.5}\n",
        "FILE:6: health.probe_failures.degraded: expected a positive integer, got 1.5",
    ),
    (
        "unknown top-level key",
        provider() + "scrape_timeout: 10s\n",
        "FILE:5: scrape_timeout: unknown key (known keys: global, health, host, modules, providers)",
    ),
    (
        "unknown provider key (typo)",
        provider("    timout: 5s"),
        'FILE:5: providers[0].timout: unknown key (did you mean "timeout"?)',
    ),
    (
        "unknown provider key, nothing close",
        provider("    colour: red"),
        "FILE:5: providers[0].colour: unknown key (known keys: api_key, api_key_file, gateway, headers,"
        " kind, labels, lifecycle, max_models, max_series, name, probes, process, timeout, tls_config,"
        " url)",
    ),
    (
        "timeout not a duration",
        provider("    timeout: fast"),
        'FILE:5: providers[0].timeout: expected a duration like 5s, got "fast"',
    ),
    (
        "timeout a bare number",
        provider("    timeout: 5"),
        "FILE:5: providers[0].timeout: expected a duration like 5s, got 5 (add a unit, as in 5s)",
    ),
    (
        "timeout zero",
        provider("    timeout: 0s"),
        'FILE:5: providers[0].timeout: expected a duration like 5s, got "0s" (must be above zero)',
    ),
    (
        "timeout with a space",
        provider("    timeout: 5 s"),
        'FILE:5: providers[0].timeout: expected a duration like 5s, got "5 s"',
    ),
    (
        "missing name",
        yml("providers:", "  - kind: ollama", "    url: http://localhost:11434"),
        "FILE:2: providers[0].name: is required",
    ),
    (
        "missing kind",
        yml("providers:", "  - name: local", "    url: http://localhost:11434"),
        "FILE:2: providers[0].kind: is required",
    ),
    (
        "missing url",
        yml("providers:", "  - name: local", "    kind: ollama"),
        "FILE:2: providers[0].url: is required",
    ),
    (
        "url set to nothing",
        yml("providers:", "  - name: local", "    kind: ollama", "    url:"),
        "FILE:2: providers[0].url: is required",
    ),
    (
        "unknown kind",
        provider(kind="llama-cpp"),
        'FILE:3: providers[0].kind: unknown kind "llama-cpp" (did you mean "llamacpp"?),'
        " expected one of " + ", ".join(sorted(KINDS)),
    ),
    (
        "duplicate provider name",
        provider() + yml("  - kind: vllm", "    name: local", "    url: http://localhost:8000"),
        'FILE:6: providers[1].name: "local" is already used by providers[0]',
    ),
    (
        "invalid name characters",
        yml("providers:", "  - name: my llama", "    kind: ollama", "    url: http://h:11434"),
        'FILE:2: providers[0].name: "my llama" is not a valid name: 1-63 letters, digits, "_",'
        ' ".", ":" or "-", starting with a letter or digit',
    ),
    (
        "name starting with a dash",
        yml("providers:", "  - name: -llama", "    kind: ollama", "    url: http://h:11434"),
        'FILE:2: providers[0].name: "-llama" is not a valid name: 1-63 letters, digits, "_",'
        ' ".", ":" or "-", starting with a letter or digit',
    ),
    (
        "name not a string",
        yml("providers:", "  - name: 123", "    kind: ollama", "    url: http://h:11434"),
        "FILE:2: providers[0].name: expected a string, got 123",
    ),
    (
        "url without scheme",
        provider(url="localhost:11434"),
        "FILE:4: providers[0].url: expected an http:// or https:// URL with a host",
    ),
    (
        "url with another scheme",
        provider(url="ftp://localhost:11434"),
        "FILE:4: providers[0].url: expected an http:// or https:// URL with a host",
    ),
    (
        "url with credentials, not repeated",
        provider(url="http://admin:hunter2@localhost:11434"),
        "FILE:4: providers[0].url: credentials in the URL are not allowed: use api_key or headers",
    ),
    (
        "url with query, not repeated",
        provider(url="http://localhost:11434/?token=hunter2"),
        "FILE:4: providers[0].url: expected a URL without query or fragment",
    ),
    (
        "url with port out of range",
        provider(url="http://localhost:99999"),
        "FILE:4: providers[0].url: not a valid URL: the port must be a number from 1 to 65535",
    ),
    (
        "url with a broken IPv6 host",
        provider(url="http://[::1:8080"),
        "FILE:4: providers[0].url: not a valid URL: invalid IPv6 address",
    ),
    (
        "api_key and api_key_file both",
        provider("    api_key: sk-1", "    api_key_file: DIR/key"),
        "FILE:6: providers[0].api_key_file: set api_key or api_key_file, not both",
    ),
    (
        "api_key_file missing",
        provider("    api_key_file: DIR/missing.key"),
        "FILE:5: providers[0].api_key_file: DIR/missing.key: cannot read the file:"
        " No such file or directory",
    ),
    (
        "api_key_file a directory",
        provider("    api_key_file: DIR"),
        "FILE:5: providers[0].api_key_file: DIR: not a regular file"
        " (a pipe, device or directory is refused)",
    ),
    (
        "api_key_file empty",
        provider("    api_key_file: DIR/empty.key"),
        "FILE:5: providers[0].api_key_file: DIR/empty.key is empty",
    ),
    (
        "api_key a number, not repeated",
        provider("    api_key: 123456789"),
        "FILE:5: providers[0].api_key: expected a string: put the key in quotes",
    ),
    (
        "unset environment variable",
        provider("    api_key: ${" + UNSET + "}"),
        f"FILE:5: providers[0].api_key: environment variable {UNSET} is not set",
    ),
    (
        "headers not a mapping",
        provider("    headers:", "      - X-Scope-OrgID: team-a"),
        "FILE:6: providers[0].headers: expected a mapping, got a list",
    ),
    (
        "invalid header name",
        provider("    headers:", "      X-Scope-OrgID: team-a", "      X Team: a"),
        "FILE:7: providers[0].headers.X Team: not a valid HTTP header name",
    ),
    (
        "header value with a line break",
        provider("    headers:", "      Authorization: |", "        Bearer sk-1"),
        "FILE:6: providers[0].headers.Authorization: a header value must not contain line breaks,"
        " NUL or other control characters",
    ),
    (
        "tls_config.ca_file missing",
        provider(
            "    tls_config:", "      insecure_skip_verify: false", "      ca_file: DIR/ca.pem"
        ),
        "FILE:7: providers[0].tls_config.ca_file: DIR/ca.pem is not a readable file",
    ),
    (
        "tls_config.insecure_skip_verify not a boolean",
        provider("    tls_config:", "      insecure_skip_verify: sometimes"),
        'FILE:6: providers[0].tls_config.insecure_skip_verify: expected true or false, got "sometimes"',
    ),
    (
        "process with no keys",
        provider("    process: {}"),
        "FILE:5: providers[0].process: set one of pid_file, name or port",
    ),
    (
        "process.port out of range",
        provider("    process:", "      port: 70000"),
        "FILE:6: providers[0].process.port: expected a port number 1-65535, got 70000",
    ),
    (
        "max_models zero",
        provider("    max_models: 0"),
        "FILE:5: providers[0].max_models: expected a positive integer, got 0",
    ),
    (
        "threshold degraded above unhealthy",
        provider() + yml("health:", "  response_time:", "    degraded: 15s"),
        "FILE:7: health.response_time: degraded (15s) must not be above unhealthy (10s)",
    ),
    (
        "ratio degraded above unhealthy",
        provider() + yml("health:", "  memory_ratio:", "    degraded: 0.99", "    unhealthy: 0.95"),
        "FILE:7: health.memory_ratio: degraded (0.99) must not be above unhealthy (0.95)",
    ),
    (
        "ratio above 1",
        provider() + yml("health:", "  disk_ratio:", "    unhealthy: 95"),
        "FILE:7: health.disk_ratio.unhealthy: expected a ratio between 0 and 1, got 95",
    ),
    (
        "health.max_age not a duration",
        provider() + yml("health:", "  max_age: soon"),
        'FILE:6: health.max_age: expected a duration like 5s, got "soon"',
    ),
    (
        "host.mounts not a list",
        provider() + yml("host:", "  mounts: /"),
        'FILE:6: host.mounts: expected a list, got "/"',
    ),
    (
        "host.mounts item not a string",
        provider() + yml("host:", "  mounts:", "    - /", "    - {path: /data}"),
        "FILE:8: host.mounts[1]: expected a string, got a mapping",
    ),
    (
        "host.enabled not a boolean",
        provider() + yml("host:", "  enabled: 1"),
        "FILE:6: host.enabled: expected true or false, got 1",
    ),
    (
        "global.scrape_timeout not a duration",
        provider() + yml("global:", "  scrape_timeout: 10"),
        "FILE:6: global.scrape_timeout: expected a duration like 5s, got 10 (add a unit, as in 10s)",
    ),
    (
        "providers not a list",
        yml("providers:", "  name: local", "  kind: ollama", "  url: http://localhost:11434"),
        "FILE:2: providers: expected a list, got a mapping",
    ),
    (
        "provider not a mapping",
        yml("providers:", "  - http://localhost:11434"),
        "FILE:2: providers[0]: expected a mapping, got a URL",
    ),
    (
        "nothing to do",
        yml("providers: []", "host:", "  enabled: false"),
        "FILE:1: providers: nothing to do: configure a provider or enable host",
    ),
    (
        "invalid YAML: indentation",
        yml("providers:", "  - name: local", "   kind: ollama"),
        "FILE:3: invalid YAML: the indentation does not match the lines above",
    ),
    (
        "invalid YAML: unquoted colon",
        provider("    timeout: 5s: 10s"),
        'FILE:5: invalid YAML: mapping values are not allowed here (quote a value that contains ": ")',
    ),
    (
        "invalid YAML: tab",
        provider("\ttimeout: 5s"),
        "FILE:5: invalid YAML: a tab cannot indent YAML: use spaces",
    ),
    (
        "invalid YAML: unclosed quote",
        provider('    api_key: "sk-1'),
        "FILE:6: invalid YAML: found unexpected end of stream, while scanning a quoted scalar"
        " started on line 5",
    ),
    (
        "invalid YAML: two documents",
        provider() + "---\n" + provider(),
        "FILE:5: invalid YAML: expected a single document in the stream, but found another document",
    ),
    (
        "duplicate key",
        provider("    url: http://localhost:8080"),
        "FILE:5: providers[0].url: duplicate key (first set on line 4)",
    ),
    (
        "duplicate top-level key",
        provider() + provider(),
        "FILE:5: providers: duplicate key (first set on line 1)",
    ),
    (
        "YAML merge key",
        yml(
            "defaults: &defaults",
            "  kind: ollama",
            "providers:",
            "  - <<: *defaults",
            "    name: local",
            "    url: http://localhost:11434",
        ),
        # Every error at once: the anchor's holder is an unknown key as well.
        "FILE:1: defaults: unknown key (known keys: global, health, host, modules, providers)\n"
        "config error: FILE:4: providers[0]: YAML merge keys (<<) are not supported",
    ),
    (
        "unsupported YAML tag",
        provider("    timeout: !!python/name:os.system"),
        "FILE:5: providers[0].timeout: unsupported YAML tag !!python/name:os.system",
    ),
    (
        "value the YAML tag cannot read",
        provider("    max_models: !!int many"),
        'FILE:5: providers[0].max_models: cannot read "many" as !!int: invalid literal for int()'
        " with base 10: 'many'",
    ),
    ("empty file", "", "FILE: the file is empty: configure at least one provider"),
    (
        "comments only",
        "# providers:\n#   - name: local\n",
        "FILE: the file is empty: configure at least one provider",
    ),
    ("not a mapping", yml("- ollama"), "FILE:1: expected a mapping, got a list"),
]


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """A directory with the files the configurations refer to."""
    (tmp_path / "empty.key").write_text("")
    (tmp_path / "key").write_text("sk-from-file\n")
    return tmp_path


@pytest.mark.parametrize(("text", "message"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_config_message(
    text: str, message: str, config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(UNSET, raising=False)
    file = config_dir / "llm-exporter.yml"
    file.write_text(text.replace("DIR", str(config_dir)), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(file)
    expected = message.replace("FILE", str(file)).replace("DIR", str(config_dir))
    assert str(caught.value) == f"config error: {expected}"
    assert "hunter2" not in str(caught.value)
    assert "sk-1" not in str(caught.value)
    assert "123456789" not in str(caught.value)


def test_invalid_ca_file(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    text = provider("    tls_config:", f"      ca_file: {ca}", url="https://llm.internal")
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "f.yml")
    prefix = f"config error: f.yml:6: providers[0].tls_config.ca_file: cannot load CA certificates from {ca}: "
    assert str(caught.value).startswith(prefix)
    assert "_ssl.c" not in str(caught.value)


def test_error_carries_its_parts() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(provider("    timeout: fast"), "conf.yml")
    assert (caught.value.file, caught.value.line, caught.value.path) == (
        "conf.yml",
        5,
        "providers[0].timeout",
    )
    assert caught.value.reason == 'expected a duration like 5s, got "fast"'


def test_load_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing)
    assert str(caught.value) == (
        f"config error: {missing}: cannot read the file: No such file or directory"
    )


def test_load_non_utf8_file(tmp_path: Path) -> None:
    file = tmp_path / "latin1.yml"
    file.write_bytes(provider("    headers:", "      X-Team: équipe").encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_config(file)
    assert str(caught.value) == f"config error: {file}: the file is not UTF-8 text"


def test_non_utf8_api_key_file(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"\xffsk\n")
    with pytest.raises(ConfigError) as caught:
        parse_config(provider(f"    api_key_file: {key}"), "f.yml")
    assert str(caught.value) == (
        f"config error: f.yml:5: providers[0].api_key_file: {key}: the file is not UTF-8 text"
    )


# Valid configurations


def test_defaults() -> None:
    config = parse_config(provider(), "f.yml")
    (p,) = config.providers
    assert (p.name, p.kind, p.url) == ("local", "ollama", "http://localhost:11434")
    assert p.api_key is None
    assert p.timeout == 5.0
    assert p.headers == {}
    assert p.tls_config == TLSConfig(insecure_skip_verify=False, ca_file=None)
    assert p.process is None
    assert p.max_models == 100
    assert config.host == HostConfig(enabled=True, mounts=("/",), gpu=True)
    assert config.health == HealthConfig(
        response_time=Threshold(degraded=2.0, unhealthy=10.0),
        memory_ratio=Threshold(degraded=0.90, unhealthy=0.97),
        disk_ratio=Threshold(degraded=0.90, unhealthy=0.97),
        cpu_ratio=Threshold(degraded=0.95, unhealthy=None),
        max_age=5.0,
    )
    assert config.global_ == GlobalConfig(scrape_timeout=10.0, scrape_timeout_margin=0.5)


def test_host_only_config() -> None:
    assert parse_config(yml("host:", "  gpu: false"), "f.yml") == Config(host=HostConfig(gpu=False))


def test_null_means_default_and_empty_mounts_mean_none() -> None:
    text = provider("    timeout:", "    process:") + yml(
        "host:", "  mounts:", "health:", "  cpu_ratio:", "    unhealthy:"
    )
    config = parse_config(text, "f.yml")
    assert config.providers[0].timeout == 5.0
    assert config.providers[0].process is None
    assert config.host.mounts == ("/",)
    assert config.health.cpu_ratio == Threshold(degraded=0.95, unhealthy=None)
    assert parse_config(provider() + yml("host:", "  mounts: []"), "f.yml").host.mounts == ()


def test_one_threshold_key_keeps_the_other_default() -> None:
    text = provider() + yml("health:", "  memory_ratio:", "    degraded: 0.5")
    assert parse_config(text, "f.yml").health.memory_ratio == Threshold(0.5, 0.97)


def test_everything_set() -> None:
    ca = Path(certifi.where())
    text = provider(
        "    timeout: 1m30s",
        "    max_models: 7",
        "    headers:",
        "      X-Scope-OrgID: team-a",
        "    tls_config:",
        "      insecure_skip_verify: true",
        f"      ca_file: {ca}",
        "    process:",
        "      pid_file: /run/ollama.pid",
        "      name: ollama",
        "      port: 11434",
        url="https://llm.internal:8443/",
    ) + yml(
        "host:",
        "  enabled: true",
        "  mounts: [/, /models]",
        "  gpu: false",
        "health:",
        "  response_time: {degraded: 500ms, unhealthy: 1s}",
        "  memory_ratio: {degraded: 0.5, unhealthy: 0.6}",
        "  disk_ratio: {degraded: 0.7, unhealthy: 1}",
        "  cpu_ratio: {degraded: 0.8, unhealthy: 0.9}",
        "  max_age: 2s",
        "global:",
        "  scrape_timeout: 30s",
        "  scrape_timeout_margin: 1s",
    )
    config = parse_config(text, "f.yml")
    (p,) = config.providers
    assert p.url == "https://llm.internal:8443"
    assert p.timeout == 90.0
    assert p.max_models == 7
    assert p.headers == {"X-Scope-OrgID": "team-a"}
    assert p.tls_config == TLSConfig(insecure_skip_verify=True, ca_file=ca)
    assert p.process == ProcessMatch(pid_file=Path("/run/ollama.pid"), name="ollama", port=11434)
    assert config.host == HostConfig(enabled=True, mounts=("/", "/models"), gpu=False)
    assert config.health == HealthConfig(
        response_time=Threshold(0.5, 1.0),
        memory_ratio=Threshold(0.5, 0.6),
        disk_ratio=Threshold(0.7, 1.0),
        cpu_ratio=Threshold(0.8, 0.9),
        max_age=2.0,
    )
    assert config.global_ == GlobalConfig(scrape_timeout=30.0, scrape_timeout_margin=1.0)


def test_probes_defaults_and_models() -> None:
    text = provider(
        "    probes:",
        "      models:",
        "        - llama3.2",
        "        - {name: qwen2.5:7b, allow_load: true}",
        "        - {name: phi3, interval: 5m}",
        "      interval: 10s",
    )
    (p,) = parse_config(text).providers
    assert p.probes == ProbeConfig(
        models=(
            ProbeModel("llama3.2"),
            ProbeModel("qwen2.5:7b", allow_load=True),
            ProbeModel("phi3", interval=300.0),
        ),
        interval=10.0,
        timeout=10.0,  # not set: the default 30s would exceed the interval
    )
    (q,) = parse_config(provider("    probes: {}")).providers
    assert q.probes == ProbeConfig()
    (r,) = parse_config(provider()).providers
    assert r.probes is None


def test_env_expansion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_HOST", "gpu-box")
    monkeypatch.setenv("LLM_KEY", "sk-env")
    monkeypatch.setenv("LLM_EMPTY", "")
    text = yml(
        "providers:",
        "  - name: ${LLM_HOST}",
        "    kind: openai",
        "    url: http://${LLM_HOST}:1234/v1",
        "    api_key: ${LLM_KEY}",
        "    headers:",
        '      X-Price: "$$5 ${LLM_EMPTY}$$$$ $HOME ${not-a-name}"',
        "host:",
        '  mounts: ["/srv/${LLM_HOST}"]',
    )
    config = parse_config(text, "f.yml")
    (p,) = config.providers
    assert p.name == "gpu-box"
    assert p.url == "http://gpu-box:1234/v1"
    assert p.api_key == "sk-env"
    assert p.headers == {"X-Price": "$5 $$ $HOME ${not-a-name}"}
    assert config.host.mounts == ("/srv/gpu-box",)


def test_env_value_is_not_expanded_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_KEY", "sk-$${OTHER}")
    config = parse_config(provider("    api_key: ${LLM_KEY}"), "f.yml")
    assert config.providers[0].api_key == "sk-$${OTHER}"


def test_api_key_file_is_read_and_stripped(tmp_path: Path) -> None:
    key = tmp_path / "openai.key"
    key.write_text("  sk-from-file\n\n")
    config = parse_config(provider(f"    api_key_file: {key}", kind="openai"), "f.yml")
    assert config.providers[0].api_key == "sk-from-file"


def test_api_key_file_path_may_use_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "key").write_text("sk-x")
    monkeypatch.setenv("SECRETS", str(tmp_path))
    config = parse_config(provider("    api_key_file: ${SECRETS}/key"), "f.yml")
    assert config.providers[0].api_key == "sk-x"


def test_secrets_not_in_repr(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("sk-secret-from-file")
    for extra in ("    api_key: sk-secret-inline", f"    api_key_file: {key}"):
        text = provider(extra, "    headers:", "      Authorization: Bearer sk-secret-header")
        config = parse_config(text, "f.yml")
        assert config.providers[0].api_key is not None
        assert "sk-secret" not in repr(config.providers[0])
        assert "sk-secret" not in repr(config)
        assert "sk-secret" not in str(config)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("5s", 5.0),
        ("1.5s", 1.5),
        ("1m30s", 90.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1h1m1s", 3661.0),
        ("1s500ms", 1.5),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
    config = parse_config(provider(f"    timeout: {text}"), "f.yml")
    assert config.providers[0].timeout == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "s", "5 s", "5S", "-5s", "5sec", "1m30", ".5s", "5s "])
def test_malformed_durations(text: str) -> None:
    assert parse_duration(text) is None


@pytest.mark.parametrize(
    ("kind", "url", "stored"),
    [
        ("llamacpp", "http://localhost:8080/", "http://localhost:8080"),
        ("ollama", "http://127.0.0.1:11434", "http://127.0.0.1:11434"),
        ("vllm", "http://[::1]:8000", "http://[::1]:8000"),
        ("openai", "http://localhost:1234/v1/", "http://localhost:1234/v1"),
        ("openai", "https://api.openai.com/v1", "https://api.openai.com/v1"),
    ],
)
def test_urls(kind: str, url: str, stored: str) -> None:
    config = parse_config(provider(kind=kind, url=url), "f.yml")
    assert (config.providers[0].kind, config.providers[0].url) == (kind, stored)


def test_several_providers_keep_their_order() -> None:
    text = yml("providers:") + "".join(
        yml(f"  - name: {kind}-1", f"    kind: {kind}", "    url: http://localhost:9")
        for kind in KINDS
    )
    config = parse_config(text, "f.yml")
    assert [p.name for p in config.providers] == [f"{kind}-1" for kind in KINDS]


# The example file


def test_example_parses_with_no_environment_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = load_config(EXAMPLE)
    assert {p.kind for p in config.providers} == set(KINDS)
    by_kind = {p.kind: p for p in config.providers}
    assert by_kind["openai"].url.endswith("/v1")
    assert by_kind["ollama"].probes is not None
    assert all(p.process is not None for p in config.providers if p.kind != "openai")
    assert config.warnings == ()
    # The example says its host, health and global sections are the defaults.
    assert config.host == HostConfig()
    assert config.health == HealthConfig()
    assert config.global_ == GlobalConfig()


# The documentation

_TYPES: dict[str, Callable[[str], Any]] = {
    "duration": parse_duration,
    "ratio": float,
    "integer": int,
    "port": int,
    "boolean": yaml.safe_load,
    "list of strings": lambda text: tuple(yaml.safe_load(text)),
    "mapping of strings": yaml.safe_load,
    "mapping of integers": yaml.safe_load,
    "mapping of mappings": yaml.safe_load,
    "size": parse_size,
    "string": str,
}


def _documented(section: str) -> dict[str, tuple[str, str]]:
    """{key: (type, default)} from the table under the heading naming this section."""
    text = DOCS.read_text()
    heading = re.search(rf"^#+ `?{re.escape(section)}`?\n", text, re.M)
    assert heading is not None, f"docs/configuration.md has no section {section}"
    body = text[heading.end() :].split("\n#", 1)[0]
    table = body.split("| Key | Type | Default | Meaning |\n", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| `([\w.]+)` \| ([^|]+?) \| ([^|]+?) \|", table, re.M)
    return {key: (kind, default) for key, kind, default in rows}


def _code_defaults() -> dict[str, dict[str, Any]]:
    """The default of every documented key, from the dataclasses; None when not set."""
    p = {f.name: f.default for f in fields(ProviderConfig) if f.name not in ("name", "kind", "url")}
    gateway = {f.name: f.default for f in fields(GatewayConfig) if f.name != "listen"}
    gateway.update(client_keys={}, cache=...)
    queue = {f.name: f.default for f in fields(QueueConfig) if f.name != "max_concurrent"}
    p.update(headers={}, api_key_file=None, tls_config=..., process=None, probes=None, gateway=None)
    p.update(lifecycle=..., labels={})
    health: dict[str, Any] = {"max_age": HealthConfig().max_age}
    for name in (
        "response_time",
        "memory_ratio",
        "disk_ratio",
        "cpu_ratio",
        "probe_duration",
        "probe_failures",
    ):
        threshold = getattr(HealthConfig(), name)
        health[f"{name}.degraded"] = threshold.degraded
        health[f"{name}.unhealthy"] = threshold.unhealthy
    return {
        "Top level": {"providers": (), "modules": {}, "host": ..., "health": ..., "global": ...},
        "modules.<name>": {
            f.name: f.default for f in fields(ModuleConfig) if f.name not in ("api_key",)
        }
        | {"tls_config": ..., "headers": {}},
        "global": {f.name: f.default for f in fields(GlobalConfig)},
        "providers[]": p,
        "providers[].tls_config": {f.name: f.default for f in fields(TLSConfig)},
        "providers[].process": {f.name: f.default for f in fields(ProcessMatch)},
        "providers[].probes": {f.name: f.default for f in fields(ProbeConfig)},
        "providers[].gateway": gateway,
        "providers[].gateway.queue": queue | {"client_priorities": {}},
        "providers[].gateway.cache": {f.name: f.default for f in fields(CacheConfig)},
        "providers[].lifecycle": {f.name: f.default for f in fields(LifecycleConfig)},
        "host": {f.name: f.default for f in fields(HostConfig)},
        "health": health,
    }


@pytest.mark.parametrize("section", list(_code_defaults()))
def test_docs_give_every_key_and_its_default(section: str) -> None:
    documented = _documented(section)
    defaults = _code_defaults()[section]
    required = {
        "providers[]": {"name", "kind", "url"},
        "providers[].gateway": {"listen"},
        "providers[].gateway.queue": {"max_concurrent"},
        "modules.<name>": {"kind", "targets"},
    }.get(section, set())
    assert set(documented) == set(defaults) | required
    for key, (kind, cell) in documented.items():
        if key in required:
            assert cell == "required", key
        elif defaults[key] is ...:  # a section of its own, documented in its table
            assert cell.startswith("see "), key
        elif defaults[key] is None:
            assert cell == "not set", key
        elif kind == "list of mappings":
            assert cell == "`[]`" and defaults[key] == (), key
        else:
            assert _TYPES[kind](cell.strip("`")) == defaults[key], key


def _known_keys(text: str) -> set[str]:
    """The keys the parser accepts at the place of the key `bogus` in text."""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "f.yml")
    match = re.search(r"unknown key \(known keys: (.*)\)$", str(caught.value))
    assert match is not None, str(caught.value)
    return set(match.group(1).split(", "))


def test_docs_list_exactly_the_keys_the_parser_knows() -> None:
    bogus = "bogus: 1"
    assert _known_keys(provider() + bogus) == set(_documented("Top level"))
    assert _known_keys(provider() + f"global: {{{bogus}}}") == set(_documented("global"))
    assert _known_keys(
        provider() + f"modules: {{m: {{kind: vllm, targets: {{hosts: [h]}}, {bogus}}}}}"
    ) == set(_documented("modules.<name>"))
    assert _known_keys(provider("    " + bogus)) == set(_documented("providers[]"))
    assert _known_keys(provider(f"    tls_config: {{{bogus}}}")) == set(
        _documented("providers[].tls_config")
    )
    assert _known_keys(provider(f"    process: {{name: x, {bogus}}}")) == set(
        _documented("providers[].process")
    )
    assert _known_keys(provider(f"    probes: {{{bogus}}}")) == set(
        _documented("providers[].probes")
    )
    assert _known_keys(provider(f"    gateway: {{listen: ':1', {bogus}}}")) == set(
        _documented("providers[].gateway")
    )
    assert _known_keys(provider(f"    lifecycle: {{{bogus}}}")) == set(
        _documented("providers[].lifecycle")
    )
    for section in ("queue", "cache"):
        required = "max_concurrent: 1, " if section == "queue" else ""
        text = provider(f"    gateway: {{listen: ':1', {section}: {{{required}{bogus}}}}}")
        assert _known_keys(text) == set(_documented(f"providers[].gateway.{section}"))
    assert _known_keys(provider() + f"host: {{{bogus}}}") == set(_documented("host"))
    health = {key.split(".")[0] for key in _documented("health")}
    assert _known_keys(provider() + f"health: {{{bogus}}}") == health
    assert _known_keys(provider() + f"health: {{cpu_ratio: {{{bogus}}}}}") == {
        "degraded",
        "unhealthy",
    }


def test_docs_list_every_flag() -> None:
    text = DOCS.read_text()
    flags = _documented_flags(text)
    for action in build_parser()._actions:
        for option in action.option_strings:
            assert option in flags, option
        if isinstance(action.default, str) and action.default != argparse.SUPPRESS:
            assert f"| `{action.option_strings[0]}` | `{action.default}` |" in text


def _documented_flags(text: str) -> set[str]:
    body = text.split("## Command-line flags", 1)[1]
    return set(re.findall(r"`(--?[\w.-]+)`", body))


# The command line


def _check(file: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m exporter --config.check` from the repository root."""
    environ = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", UNSET)}
    return subprocess.run(
        [sys.executable, "-m", "exporter", "--config.check", "--config.file", str(file)],
        cwd=REPO,
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_check_valid(tmp_path: Path) -> None:
    file = tmp_path / "llm-exporter.yml"
    file.write_text(provider())
    result = _check(file)
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"{file}: valid, 1 provider(s)\n",
        "",
    )


def test_cli_check_example() -> None:
    result = _check(EXAMPLE)
    # One provider of each kind.
    expected = f"{EXAMPLE}: valid, {len(KINDS)} provider(s)\n"
    assert (result.returncode, result.stdout) == (0, expected)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (provider("    timeout: fast"), 'FILE:5: providers[0].timeout: expected a duration like 5s, got "fast"'),
        (provider(url="http://[::1"), "FILE:4: providers[0].url: not a valid URL: invalid IPv6 address"),
        (provider("    timeout: !secret x"), "FILE:5: providers[0].timeout: unsupported YAML tag !secret"),
        (provider("    max_models: !!int lots"), 'FILE:5: providers[0].max_models: cannot read "lots" as !!int: invalid literal for int() with base 10: \'lots\''),
        (provider("   timeout: 5s"), "FILE:5: invalid YAML: the indentation does not match the lines above"),
        ("", "FILE: the file is empty: configure at least one provider"),
    ],
    ids=["bad duration", "bad URL", "unknown tag", "bad !!int", "bad YAML", "empty"],
)  # fmt: skip
def test_cli_check_invalid(text: str, message: str, tmp_path: Path) -> None:
    file = tmp_path / "llm-exporter.yml"
    file.write_text(text)
    result = _check(file)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"config error: {message.replace('FILE', str(file))}\n"


def test_cli_check_missing_file(tmp_path: Path) -> None:
    file = tmp_path / "absent.yml"
    result = _check(file)
    assert result.returncode == 2
    assert result.stderr == (
        f"config error: {file}: no such file; llm-exporter.example.yml is a commented example"
        " to start from, and without --config.file the exporter finds providers on this host"
        " itself\n"
    )
    assert "Traceback" not in result.stderr


FULL = """
providers:
  - name: llama
    kind: llamacpp
    url: http://127.0.0.1:8080
    api_key: sk-very-secret
    timeout: 1500ms
    headers: {X-Scope-OrgID: team-$$a, Authorization: Bearer abc}
    tls_config: {insecure_skip_verify: true}
    process: {name: llama-server}
    max_models: 7
    max_series: 500
    probes:
      models: [tiny, {name: big, allow_load: true, interval: 1h30m}]
      interval: 2m
      prompt: "Say $$5."
    gateway:
      listen: 127.0.0.1:11435
      client_keys: {3f2a9c1b7d04: ide}
      queue:
        max_concurrent: 2
        max_waiting: 0
        max_wait: 90s
        overflow_status: 503
        priority_header: X-Priority
        client_priorities: {ide: 5}
        aging: 2500ms
      cache: {enabled: true, ttl: 1h, max_entries: 5, max_bytes: 1536KiB, sampled: true}
    labels: {cluster: eu-1, team: search}
    lifecycle:
      watch_interval: 250ms
      pin: [tiny]
      preload: [big]
      max_loaded: 2
      max_memory: 12GiB
      idle_unload: 30m
modules:
  cluster:
    kind: vllm
    timeout: 2s
    targets: {hosts: ["*.svc", vllm-0], cidrs: [10.0.0.0/8, "fd00::/8"], regex: "https?://.*"}
    probe: {model: tiny, prompt: "Hi.", max_tokens: 4, timeout: 3s}
host: {mounts: [/, /srv]}
health:
  response_time: {degraded: 1s, unhealthy: 3s}
global: {scrape_timeout: 20s, probe_concurrency: 4}
"""


def test_dump_config_reads_back_to_the_same_config_with_secrets_masked() -> None:
    config = parse_config(FULL)
    printed = dump_config(config)
    assert "sk-very-secret" not in printed and "Bearer abc" not in printed
    again = parse_config(printed)
    provider = config.providers[0]
    masked = replace(
        provider,
        api_key="<secret>",
        headers={"X-Scope-OrgID": "team-$a", "Authorization": "<secret>"},
    )
    assert again.providers == (masked,)
    assert (again.host, again.health, again.global_) == (config.host, config.health, config.global_)
    assert again.modules == config.modules
    assert parse_config(dump_config(Config())) == Config()


def test_max_series_is_a_positive_integer() -> None:
    assert config_of_text("max_series: 20").providers[0].max_series == 20
    with pytest.raises(ConfigError, match="max_series: expected a positive integer"):
        config_of_text("max_series: 0")


def config_of_text(extra: str) -> Config:
    return parse_config(
        f"providers:\n  - name: a\n    kind: ollama\n    url: http://h:1\n    {extra}\n"
    )


# Hostile files: bounded in size, depth and kind, every failure a config error


def test_deeply_nested_yaml_is_a_config_error_not_a_traceback(tmp_path: Path) -> None:
    for text in (
        "[" * 100_000 + "]" * 100_000,
        "a:\n" + "".join(f"{'  ' * i}b{i}:\n" for i in range(1, 60)),
    ):
        file = tmp_path / "deep.yml"
        file.write_text(text)
        with pytest.raises(ConfigError) as caught:
            load_config(file)
        assert "nested more than 32 levels deep" in str(caught.value)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        parse_config(provider(f"    api_key_file: {fifo}"))


def test_devices_and_huge_files_are_refused_unread(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config("/dev/zero")
    huge = tmp_path / "huge.yml"
    huge.write_text("providers:\n" + "  - x\n" * 10_000_000)  # 60 MB
    with pytest.raises(ConfigError, match="larger than 1024 KiB"):
        load_config(huge)
    key = tmp_path / "key"
    key.write_text("k" * 100_000)
    with pytest.raises(ConfigError, match="larger than 64 KiB"):
        parse_config(provider(f"    api_key_file: {key}"))


@pytest.mark.parametrize("key", ['"sk-1\\nX-Injected: yes"', '"sk-1\\r"', '"sk-\\u0000"'])
def test_an_api_key_with_a_line_break_is_refused_unrepeated(key: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(provider(f"    api_key: {key}"))
    assert "line break or another control character" in str(caught.value)
    assert "sk-" not in str(caught.value)
    key_file = tmp_path / "key"
    key_file.write_text("sk-1\nsk-2\n")
    with pytest.raises(ConfigError, match="line break"):
        parse_config(provider(f"    api_key_file: {key_file}"))


def test_a_url_is_never_repeated_in_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(provider(url="ftp://host/token-abcdef0123456789"))
    assert "token-abcdef0123456789" not in str(caught.value)


def test_every_error_is_reported_at_once() -> None:
    text = yml(
        "providers:",
        "  - name: a",
        "    kind: olama",
        "    url: http://h:1",
        "    timeout: fast",
        "  - name: b",
        "    kind: vllm",
        "    url: http://h:2",
        "    max_modles: 3",
        "global:",
        "  scrape_timeout: 0s",
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "f.yml")
    assert str(caught.value).splitlines() == [
        'config error: f.yml:3: providers[0].kind: unknown kind "olama" (did you mean "ollama"?),'
        " expected one of " + ", ".join(sorted(KINDS)),
        'config error: f.yml:5: providers[0].timeout: expected a duration like 5s, got "fast"',
        'config error: f.yml:9: providers[1].max_modles: unknown key (did you mean "max_models"?)',
        'config error: f.yml:11: global.scrape_timeout: expected a duration like 5s, got "0s"'
        " (must be above zero)",
    ]
    assert len(caught.value.errors) == 4


def test_a_v1_url_for_a_kind_that_takes_the_root_is_a_warning() -> None:
    config = parse_config(provider(kind="vllm", url="http://localhost:8000/v1"))
    assert config.warnings == (
        "providers[0].url ends in /v1: kind vllm takes the server's root"
        " (the exporter adds /v1 where it needs it)",
    )
    assert parse_config(provider(kind="openai", url="http://localhost:1234/v1")).warnings == ()


def test_an_alias_bomb_is_read_in_bounded_time() -> None:
    # 450 bytes whose aliases name 10**8 nodes: nothing may walk them all.
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 8)]
    started = time.monotonic()
    with pytest.raises(ConfigError, match="a7: unknown key"):
        parse_config(yml(*lines), "f.yml")
    assert time.monotonic() - started < 3


def test_nesting_is_refused_where_it_passes_the_bound() -> None:
    # Bounded while the YAML is composed, so Python's recursion limit is never reached.
    for text in ("[\n" * 100_000, "".join(f"{'  ' * i}k{i}:\n" for i in range(100))):
        with pytest.raises(ConfigError) as caught:
            parse_config(text, "f.yml")
        assert (
            str(caught.value)
            == "config error: f.yml:33: invalid YAML: nested more than 32 levels deep"
        )
    with pytest.raises(ConfigError) as caught:  # 32 levels are read, and judged on their merits
        parse_config("[" * 32 + "]" * 32, "f.yml")
    assert str(caught.value) == "config error: f.yml:1: expected a mapping, got a list"


@pytest.mark.parametrize(
    "extra",
    [
        "    headers: {X-Api-Key: 123456789}",
        "    headers: {X-Api-Key: !!int sk-1-hunter2}",
        "    headers: {X-Api-Key: [sk-1]}",
        "    api_key: !!int sk-1-hunter2",
        "    api_key: !!float sk-1-hunter2",
    ],
)
def test_a_secret_is_never_repeated_in_an_error(extra: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(provider(extra), "f.yml")
    for secret in ("123456789", "sk-1", "hunter2"):
        assert secret not in str(caught.value)


@pytest.mark.parametrize("value", ['"a\\x01b"', '"a\\x7fb"', '"a\\eb"', '"a\\x85b"'])
def test_a_header_value_with_a_control_character_is_refused(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(provider("    headers:", f"      X-Team: {value}"), "f.yml")
    assert str(caught.value) == (
        "config error: f.yml:6: providers[0].headers.X-Team: a header value must not contain"
        " line breaks, NUL or other control characters"
    )
    tab = parse_config(provider("    headers:", '      X-Team: "a\\tb"'), "f.yml")
    assert tab.providers[0].headers == {"X-Team": "a\tb"}  # HTAB is allowed in a header value


def test_a_url_is_not_repeated_where_a_provider_was_expected() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(yml("providers:", "  - https://llm.internal/token-abc123"), "f.yml")
    assert str(caught.value) == "config error: f.yml:2: providers[0]: expected a mapping, got a URL"


def test_a_long_value_is_cut_in_an_error() -> None:
    for value in ("f" * 100_000, "9" * 100_000):
        with pytest.raises(ConfigError) as caught:
            parse_config(provider(f"    timeout: {value}"), "f.yml")
        assert len(str(caught.value)) < 250
    assert str(caught.value).startswith(
        f'config error: f.yml:5: providers[0].timeout: cannot read "{"9" * 40}..." as !!int'
    )


def test_an_unacceptable_character_is_one_line_with_its_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(provider("    timeout: 5s\0"), "f.yml")
    assert str(caught.value) == "config error: f.yml:5: invalid YAML: unacceptable character #x0000"


def test_a_ca_file_is_bounded_in_size(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    with ca.open("wb") as handle:
        handle.truncate(64 << 20)  # sparse: 64 MiB that take no room
    text = provider("    tls_config:", f"      ca_file: {ca}", url="https://llm.internal")
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "f.yml")
    assert str(caught.value) == (
        f"config error: f.yml:6: providers[0].tls_config.ca_file: {ca} is larger than 4 MiB"
    )


@pytest.mark.parametrize(
    "duration", ["500ms", "1.2345s", "0.5ms", "1h30m15.5s", "2d", "1.1s", "0.1s", "7m"]
)
def test_dump_config_writes_every_duration_so_it_reads_back(duration: str) -> None:
    text = provider(
        f"    timeout: {duration}",
        "    probes:",
        f"      models: [{{name: m, interval: {duration}}}]",
        f"      interval: {duration}",
    ) + yml("health:", f"  max_age: {duration}")
    config = parse_config(text, "f.yml")
    assert parse_config(dump_config(config), "f.yml") == config


def test_a_nul_in_a_file_path_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="NUL"):
        parse_config(provider('    api_key_file: "/run/key\\0"'))
    with pytest.raises(ConfigError, match="NUL"):
        load_config("/etc/llm\0exporter.yml")
