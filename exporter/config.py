"""Strict YAML configuration, parsed into frozen dataclasses.

Every key is known; an unknown key, a wrong type or a bad value raises
ConfigError naming the key path and the line. Strings may use ${ENV} (and $$ for
a literal $); secrets may come from *_file keys instead of the file itself.
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import math
import os
import re
import ssl
import stat
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml
from yaml.constructor import SafeConstructor

from .errors import ConfigError, ConfigErrors
from .providers import KINDS

DEFAULT_LISTEN_ADDRESS = ":9741"
MAX_CONFIG_BYTES = 1024 * 1024
MAX_KEY_FILE_BYTES = 64 * 1024
MAX_CA_FILE_BYTES = 4 * 1024 * 1024  # a system's whole bundle is well under 1 MiB
# Deeper YAML is refused: no configuration nests more than a few levels, and PyYAML
# composes nested nodes by recursion.
MAX_DEPTH = 32

T = TypeVar("T")


@dataclass(frozen=True)
class TLSConfig:
    """How to verify a provider's certificate."""

    insecure_skip_verify: bool = False
    ca_file: Path | None = None


@dataclass(frozen=True)
class ProcessMatch:
    """How to find a provider's process on this host (first that is set wins)."""

    pid_file: Path | None = None
    name: str | None = None
    port: int | None = None


@dataclass(frozen=True)
class ProbeModel:
    """A model to probe; allow_load lets a probe load it when it is not loaded."""

    name: str
    allow_load: bool = False
    interval: float | None = None  # its own schedule; None: the provider's probes.interval


@dataclass(frozen=True)
class ProbeConfig:
    """Synthetic requests to a provider's models, on a schedule."""

    models: tuple[ProbeModel, ...] = ()  # empty: every loaded model, up to max_models
    max_models: int = 3
    interval: float = 60.0
    jitter: float = 0.1
    timeout: float = 30.0
    prompt: str = "Say hello."
    max_tokens: int = 16


MIN_PRIORITY, MAX_PRIORITY = -10, 10


@dataclass(frozen=True)
class QueueConfig:
    """The gateway's admission queue: how many requests reach the provider at once, how many
    more may wait, for how long, and in which order."""

    max_concurrent: int  # the provider's real parallelism (slots, NUM_PARALLEL, max_num_seqs)
    max_waiting: int = 64
    max_wait: float = 60.0
    overflow_status: int = 429  # or 503
    priority_header: str | None = None  # a header carrying an integer priority
    # Client names (from the gateway's client attribution) to priorities.
    client_priorities: Mapping[str, int] = field(default_factory=dict)
    # Each step of priority counts as this long waited: a request never waits behind one
    # that arrived more than (MAX_PRIORITY - its priority) * aging after it.
    aging: float = 10.0


@dataclass(frozen=True)
class CacheConfig:
    """The gateway's response cache: exact repeats of deterministic requests, per credential."""

    enabled: bool = False
    ttl: float = 600.0
    max_entries: int = 10000
    max_bytes: int = 64 * 1024 * 1024
    # Cache answers to requests that sample (temperature above 0 without a seed) too.
    sampled: bool = False


@dataclass(frozen=True)
class GatewayConfig:
    """A measuring proxy in front of the provider: clients send it what they would send the
    provider, and it forwards every request to the provider's url."""

    listen: str  # [host]:port, as written
    first_byte_timeout: float = 600.0  # a model load or a long prompt comes before the first byte
    idle_timeout: float = 300.0  # between two chunks of a streamed answer
    max_connections: int = 1024
    models: tuple[str, ...] = ()  # kept as model labels besides the provider's own models
    client_header: str | None = None  # a header naming the client, for attribution
    # SHA-256 hex prefixes of API keys (bearer tokens) to client names.
    client_keys: Mapping[str, str] = field(default_factory=dict)
    queue: QueueConfig | None = None
    cache: CacheConfig = CacheConfig()

    @property
    def address(self) -> tuple[str | None, int]:
        """(host or None for every interface, port) to listen on."""
        return parse_listen_address(self.listen)


@dataclass(frozen=True)
class LifecycleConfig:
    """How the exporter watches a provider's models load and unload, and its optional policy
    (off unless one of pin, preload, max_loaded, max_memory or idle_unload is set)."""

    watch: bool = True
    watch_interval: float = 10.0
    pin: tuple[str, ...] = ()  # kept loaded, loaded again after any unload
    preload: tuple[str, ...] = ()  # loaded once when the exporter starts
    max_loaded: int | None = None  # before the gateway lets a model load, unload down to this
    max_memory: int | None = None  # bytes, likewise
    idle_unload: float | None = None  # unload a model after this long without traffic

    @property
    def policy(self) -> bool:
        """Whether the exporter acts on the provider's models, not only watches them."""
        return bool(self.pin or self.preload or self.idle_unload is not None or self.limited)

    @property
    def limited(self) -> bool:
        """Whether loads through the gateway are bounded by max_loaded or max_memory."""
        return self.max_loaded is not None or self.max_memory is not None


@dataclass(frozen=True)
class ProviderConfig:
    """One provider instance to watch."""

    name: str
    kind: str
    url: str
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 5.0
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    tls_config: TLSConfig = TLSConfig()
    process: ProcessMatch | None = None
    max_models: int = 100
    max_series: int = 10000
    probes: ProbeConfig | None = None
    gateway: GatewayConfig | None = None
    lifecycle: LifecycleConfig = LifecycleConfig()
    labels: Mapping[str, str] = field(default_factory=dict)  # added to its /targets entry


@dataclass(frozen=True)
class TargetAllowlist:
    """Which targets /probe may collect with a module: a host listed, an IP address inside a
    network listed, or a URL the pattern matches whole."""

    hosts: tuple[str, ...] = ()  # exact names, or "*.example.com" for any name below it
    cidrs: tuple[IPv4Network | IPv6Network, ...] = ()
    regex: str | None = None


@dataclass(frozen=True)
class ModuleProbe:
    """A small streamed generation each /probe of a module's target sends."""

    model: str
    prompt: str = "Say hello."
    max_tokens: int = 16
    timeout: float = 10.0


@dataclass(frozen=True)
class ModuleConfig:
    """How /probe collects a target that is not a configured provider."""

    kind: str
    targets: TargetAllowlist
    timeout: float = 5.0
    api_key: str | None = field(default=None, repr=False)  # from api_key_file only
    api_key_file: Path | None = None
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    tls_config: TLSConfig = TLSConfig()
    max_models: int = 100
    max_series: int = 10000
    probe: ModuleProbe | None = None  # off: a probe reads state only and costs no GPU time


@dataclass(frozen=True)
class HostConfig:
    """Which host resources to collect."""

    enabled: bool = True
    mounts: tuple[str, ...] = ("/",)
    gpu: bool = True


@dataclass(frozen=True)
class Threshold:
    """A value at which a component turns degraded, and one at which it turns unhealthy."""

    degraded: float | None
    unhealthy: float | None


@dataclass(frozen=True)
class HealthConfig:
    """Thresholds of the health verdicts."""

    response_time: Threshold = Threshold(degraded=2.0, unhealthy=10.0)
    memory_ratio: Threshold = Threshold(degraded=0.90, unhealthy=0.97)
    disk_ratio: Threshold = Threshold(degraded=0.90, unhealthy=0.97)
    cpu_ratio: Threshold = Threshold(degraded=0.95, unhealthy=None)
    probe_duration: Threshold = Threshold(degraded=10.0, unhealthy=30.0)
    probe_failures: Threshold = Threshold(degraded=1, unhealthy=3)
    max_age: float = 5.0


@dataclass(frozen=True)
class GlobalConfig:
    """Settings for the whole exporter."""

    scrape_timeout: float = 10.0
    scrape_timeout_margin: float = 0.5
    probe_concurrency: int = 2


@dataclass(frozen=True)
class Config:
    """A whole, valid configuration."""

    providers: tuple[ProviderConfig, ...] = ()
    modules: Mapping[str, ModuleConfig] = field(default_factory=dict)
    host: HostConfig = HostConfig()
    health: HealthConfig = HealthConfig()
    global_: GlobalConfig = GlobalConfig()
    # What is valid but probably not meant, for the log; not part of the configuration.
    warnings: tuple[str, ...] = field(default=(), compare=False)


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_ENV_RE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)\})")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$")
_HEADER_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def parse_listen_address(address: str) -> tuple[str | None, int]:
    """(host or None for all interfaces, port) from [host]:port; ValueError if malformed."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ValueError(f'invalid listen address "{address}": expected [host]:port')
    host = host.removeprefix("[").removesuffix("]")
    return (host or None), int(port_text)


def parse_duration(text: str) -> float | None:
    """Seconds in a Prometheus-style duration such as 5s, 500ms or 1m30s; None if malformed."""
    pos, total = 0, 0.0
    for match in _DURATION_RE.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return total if pos == len(text) and text else None


class _Constructor(SafeConstructor):
    """Builds plain scalars from nodes, so values keep their line numbers until used."""


class _Reader:
    """Reads one YAML mapping strictly, remembering which keys were used."""

    def __init__(
        self, node: yaml.Node, path: str, file: str, errors: list[ConfigError] | None = None
    ) -> None:
        self.path = path
        self.file = file
        # Shared by every reader of one file: each bad key is reported, not only the first.
        self.errors: list[ConfigError] = errors if errors is not None else []
        self.line = node.start_mark.line + 1
        if not isinstance(node, yaml.MappingNode):
            raise self.error(path, f"expected a mapping, got {_describe(node)}", node)
        self.items: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                raise self.error(path, "keys must be strings", key_node)
            if key == "<<" and key_node.tag == "tag:yaml.org,2002:merge":
                raise self.error(path, "YAML merge keys (<<) are not supported", key_node)
            if key in self.items:
                first = self.items[key][0].start_mark.line + 1
                raise self.error(
                    self._sub(key), f"duplicate key (first set on line {first})", key_node
                )
            self.items[key] = (key_node, value_node)
        self.used: set[str] = set()

    def _sub(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, path: str, reason: str, node: yaml.Node | None = None) -> ConfigError:
        line = node.start_mark.line + 1 if node is not None else self.line
        return ConfigError(path, reason, line=line, file=self.file)

    def node(self, key: str) -> yaml.Node | None:
        self.used.add(key)
        entry = self.items.get(key)
        if entry is None or (entry[1].tag == "tag:yaml.org,2002:null"):
            return None
        return entry[1]

    def scalar(
        self,
        key: str,
        convert: Callable[[Any, str, yaml.Node], T],
        default: T,
        *,
        secret: bool = False,
    ) -> T:
        """The key's value converted, or the default (with the error kept) if it is bad.

        A secret's value is never repeated in the error, whatever its tag does to it.
        """
        node = self.node(key)
        if node is None:
            return default
        try:
            if not isinstance(node, yaml.ScalarNode):
                return convert(_Unscalar(node), self._sub(key), node)
            value = _construct(node, self._sub(key), secret=secret)
            return convert(value, self._sub(key), node)
        except ConfigError as exc:
            self.errors.append(exc)
            return default

    def required(self, key: str, convert: Callable[[Any, str, yaml.Node], str]) -> str:
        """The key's value converted; "" with the error kept if it is missing or bad."""
        if self.node(key) is None:
            self.errors.append(self.error(self._sub(key), "is required"))
            return ""
        return self.scalar(key, convert, "")

    def mapping(self, key: str) -> _Reader | None:
        node = self.node(key)
        return None if node is None else _Reader(node, self._sub(key), self.file, self.errors)

    def section(self, key: str, parse: Callable[[_Reader | None], T], default: T) -> T:
        """A sub-mapping parsed by parse; the default, with the error kept, if it is bad."""
        try:
            return parse(self.mapping(key))
        except ConfigError as exc:
            self.errors.append(exc)
            return default

    def sequence(self, key: str) -> Iterator[tuple[yaml.Node, str]]:
        node = self.node(key)
        if node is None:
            return
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(self._sub(key), f"expected a list, got {_describe(node)}", node)
        for index, item in enumerate(node.value):
            yield item, f"{self._sub(key)}[{index}]"

    def finish(self) -> None:
        for key, (key_node, _) in self.items.items():
            if key not in self.used:
                self.errors.append(self.error(self._sub(key), _unknown(key, self.used), key_node))


def _unknown(key: str, known: Collection[str]) -> str:
    """An unknown key's reason: the closest known key, else every known key."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f'unknown key (did you mean "{close[0]}"?)'
    return f"unknown key (known keys: {', '.join(sorted(known))})"


class _Unscalar:
    """Marks a list or mapping where a scalar was expected."""

    def __init__(self, node: yaml.Node) -> None:
        self.node = node


def _describe(value: object) -> str:
    """A value as an error shows it: never a URL (a token may be in it), never long."""
    if isinstance(value, _Unscalar):
        value = value.node
    if isinstance(value, yaml.MappingNode):
        return "a mapping"
    if isinstance(value, yaml.SequenceNode):
        return "a list"
    if isinstance(value, yaml.ScalarNode):
        value = value.value
    if isinstance(value, bool):
        return str(value).lower()
    if not isinstance(value, str):
        return _cut(str(value))
    if "://" in value:
        return "a URL"
    if not value.isprintable():
        return "a string with a line break or another control character"
    return f'"{_cut(value)}"'


def _cut(text: str, length: int = 40) -> str:
    return text if len(text) <= length else f"{text[:length]}..."


def _fail(path: str, node: yaml.Node, reason: str) -> ConfigError:
    return ConfigError(path, reason, line=node.start_mark.line + 1)


def _construct(node: yaml.Node, path: str, *, secret: bool = False) -> Any:
    """The Python value of a scalar node; a ConfigError for unknown tags or bad !!int and dates."""
    tag = _cut(node.tag.replace("tag:yaml.org,2002:", "!!"))
    try:
        return _Constructor().construct_object(node)
    except yaml.constructor.ConstructorError:
        raise _fail(path, node, f"unsupported YAML tag {tag}") from None
    except ValueError as exc:
        if secret:  # the exception's text repeats the value too
            raise _fail(path, node, f"cannot read the value as {tag}: remove the tag") from None
        raise _fail(
            path, node, f"cannot read {_describe(node)} as {tag}: {_cut(str(exc), 80)}"
        ) from None


def _expand_env(text: str, path: str, node: yaml.Node) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "$"
        if name not in os.environ:
            raise _fail(path, node, f"environment variable {name} is not set")
        return os.environ[name]

    return _ENV_RE.sub(replace, text)


def _string(value: Any, path: str, node: yaml.Node) -> str:
    if not isinstance(value, str):
        raise _fail(path, node, f"expected a string, got {_describe(value)}")
    return _expand_env(value, path, node)


def _bool(value: Any, path: str, node: yaml.Node) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, node, f"expected true or false, got {_describe(value)}")
    return value


def _duration(value: Any, path: str, node: yaml.Node) -> float:
    seconds = parse_duration(value) if isinstance(value, str) else None
    if seconds is None or not 0 < seconds < math.inf:
        hint = ""
        if isinstance(value, int | float) and not isinstance(value, bool):
            hint = f" (add a unit, as in {value:g}s)"
        elif seconds == 0:
            hint = " (must be above zero)"
        elif seconds is not None:
            hint = " (too long)"
        raise _fail(path, node, f"expected a duration like 5s, got {_describe(value)}{hint}")
    return seconds


def _ratio(value: Any, path: str, node: yaml.Node) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise _fail(path, node, f"expected a ratio between 0 and 1, got {_describe(value)}")
    return float(value)


def _positive_int(value: Any, path: str, node: yaml.Node) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(path, node, f"expected a positive integer, got {_describe(value)}")
    return value


def _non_negative_int(value: Any, path: str, node: yaml.Node) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(path, node, f"expected an integer of 0 or more, got {_describe(value)}")
    return value


_SIZE_RE = re.compile(r"^(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
}
MAX_SIZE_BYTES = 1 << 40


def parse_size(text: str) -> int | None:
    """Bytes from a size as the configuration writes it (512KiB, 64MiB, 1GB); None if not one."""
    match = _SIZE_RE.match(text.strip())
    if match is None:
        return None
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def format_size(size: int) -> str:
    """A size as the configuration writes it, read back exactly."""
    for unit in ("GiB", "MiB", "KiB"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return f"{size}B"


def _size(value: Any, path: str, node: yaml.Node) -> int:
    size = parse_size(value) if isinstance(value, str) else None
    if size is None or not 0 < size <= MAX_SIZE_BYTES:
        hint = ""
        if isinstance(value, int) and not isinstance(value, bool):
            hint = f" (add a unit, as in {value}B or {value}MiB)"
        elif size is not None:
            hint = " (must be above zero)" if size == 0 else " (at most 1TiB)"
        raise _fail(path, node, f"expected a size like 64MiB, got {_describe(value)}{hint}")
    return size


def _port(value: Any, path: str, node: yaml.Node) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise _fail(path, node, f"expected a port number 1-65535, got {_describe(value)}")
    return value


def _path(value: Any, path: str, node: yaml.Node) -> Path:
    return Path(_string(value, path, node))


def _url(value: Any, path: str, node: yaml.Node) -> str:
    # A URL's value is never repeated in a message: its path or query may hold a token.
    if not isinstance(value, str):
        raise _fail(path, node, "expected a URL in a string")
    text = _expand_env(value, path, node)
    bad_port = "not a valid URL: the port must be a number from 1 to 65535"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        reason = "not a valid URL: invalid IPv6 address" if "IPv6" in str(exc) else bad_port
        raise _fail(path, node, reason) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _fail(path, node, "expected an http:// or https:// URL with a host")
    if port == 0:
        raise _fail(path, node, bad_port)
    if parts.username or parts.password:
        raise _fail(path, node, "credentials in the URL are not allowed: use api_key or headers")
    if parts.query or parts.fragment:
        raise _fail(path, node, "expected a URL without query or fragment")
    return text.rstrip("/")


def _secret(value: Any, path: str, node: yaml.Node) -> str:
    if isinstance(value, _Unscalar):
        raise _fail(path, node, f"expected a string, got {_describe(value)}")
    if not isinstance(value, str):  # never repeat a secret in a message
        raise _fail(path, node, "expected a string: put the key in quotes")
    return _printable_secret(_expand_env(value, path, node), path, node)


def _printable_secret(secret: str, path: str, node: yaml.Node) -> str:
    # Sent in a header: a line break would end it there, or split the request.
    if not secret.isprintable():
        raise _fail(path, node, "the key contains a line break or another control character")
    return secret


def _secret_file(value: Any, path: str, node: yaml.Node) -> str:
    file = _path(value, path, node)
    try:
        secret = read_bounded(file, MAX_KEY_FILE_BYTES).strip()
    except ConfigError as exc:
        raise _fail(path, node, f"{file}: {exc.reason}") from None
    if not secret:
        raise _fail(path, node, f"{file} is empty")
    return _printable_secret(secret, path, node)


def read_bounded(file: str | Path, limit: int) -> str:
    """A regular file's text, at most limit bytes; ConfigError for anything else.

    A FIFO, a device or a socket is refused before it is read (a FIFO would block,
    /dev/zero never ends), and at most limit + 1 bytes are ever read.
    """
    try:
        # stat first: merely opening a device can act (rewind a tape, arm a watchdog).
        if not stat.S_ISREG(os.stat(file).st_mode):
            raise ConfigError("", "not a regular file (a pipe, device or directory is refused)")
        descriptor = os.open(file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ConfigError("", f"cannot read the file: {exc.strerror or exc}") from None
    except ValueError:  # a NUL in the path
        raise ConfigError("", "cannot read the file: the path contains a NUL character") from None
    try:
        # fstat again: the path may have been swapped for a FIFO since.
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ConfigError("", "not a regular file (a pipe, device or directory is refused)")
        with os.fdopen(descriptor, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise ConfigError("", f"cannot read the file: {exc.strerror or exc}") from None
    finally:
        os.close(descriptor)
    if len(data) > limit:
        raise ConfigError("", f"larger than {limit // 1024} KiB: refused")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("", "the file is not UTF-8 text") from None


def _scrape_kind(value: Any, path: str, node: yaml.Node) -> str:
    kind = _string(value, path, node)
    if kind not in KINDS:
        close = difflib.get_close_matches(kind, KINDS, n=1, cutoff=0.6)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        raise _fail(
            path,
            node,
            f'unknown kind "{kind[:40]}"{hint}, expected one of {", ".join(sorted(KINDS))}',
        )
    return kind


def _name(value: Any, path: str, node: yaml.Node) -> str:
    name = _string(value, path, node)
    if not _NAME_RE.match(name):
        raise _fail(
            path,
            node,
            f'"{name}" is not a valid name: 1-63 letters, digits, "_", ".", ":" or "-",'
            " starting with a letter or digit",
        )
    return name


def _parse_tls(reader: _Reader | None) -> TLSConfig:
    if reader is None:
        return TLSConfig()
    tls = TLSConfig(
        insecure_skip_verify=reader.scalar("insecure_skip_verify", _bool, False),
        ca_file=reader.scalar("ca_file", _path, None),
    )
    reader.finish()
    if tls.ca_file is not None:
        where = f"{reader.path}.ca_file", reader.items["ca_file"][1]
        if not tls.ca_file.is_file():
            raise reader.error(where[0], f"{tls.ca_file} is not a readable file", where[1])
        if tls.ca_file.stat().st_size > MAX_CA_FILE_BYTES:
            reason = f"{tls.ca_file} is larger than {MAX_CA_FILE_BYTES >> 20} MiB"
            raise reader.error(where[0], reason, where[1])
        try:
            ssl.create_default_context(cafile=str(tls.ca_file))
        except OSError as exc:  # ssl.SSLError included
            detail = re.sub(r"^\[[^\]]*\] | \(_ssl\.c:\d+\)$", "", str(exc.strerror or exc))
            reason = f"cannot load CA certificates from {tls.ca_file}: {detail}"
            raise reader.error(where[0], reason, where[1]) from None
    return tls


def _parse_process(reader: _Reader | None) -> ProcessMatch | None:
    if reader is None:
        return None
    errors_before = len(reader.errors)
    match = ProcessMatch(
        pid_file=reader.scalar("pid_file", _path, None),
        name=reader.scalar("name", _string, None),
        port=reader.scalar("port", _port, None),
    )
    reader.finish()
    if match == ProcessMatch() and len(reader.errors) == errors_before:
        raise reader.error(reader.path, "set one of pid_file, name or port")
    return match


def _parse_headers(reader: _Reader | None) -> dict[str, str]:
    if reader is None:
        return {}
    headers = {}
    for key, (key_node, _) in reader.items.items():
        if not _HEADER_RE.match(key):
            raise reader.error(f"{reader.path}.{key}", "not a valid HTTP header name", key_node)
        headers[key] = reader.scalar(key, _header_value, "", secret=True)
    return headers


def _header_value(value: Any, path: str, node: yaml.Node) -> str:
    if isinstance(value, _Unscalar):
        raise _fail(path, node, f"expected a string, got {_describe(value)}")
    if not isinstance(value, str):  # a header may carry a credential: never repeat it
        raise _fail(path, node, "expected a string: put the value in quotes")
    text = _expand_env(value, path, node)
    # HTAB is allowed in a field value (RFC 9110); any other control character would
    # end the header, split the request or be refused by the HTTP client at run time.
    if not text.replace("\t", " ").isprintable():
        reason = "a header value must not contain line breaks, NUL or other control characters"
        raise _fail(path, node, reason)
    return text


def _parse_provider(
    node: yaml.Node, path: str, file: str, errors: list[ConfigError]
) -> ProviderConfig:
    reader = _Reader(node, path, file, errors)
    api_key = reader.scalar("api_key", _secret, None, secret=True)
    api_key_from_file = reader.scalar("api_key_file", _secret_file, None)
    if api_key is not None and api_key_from_file is not None:
        errors.append(
            reader.error(
                f"{path}.api_key_file",
                "set api_key or api_key_file, not both",
                reader.node("api_key_file"),
            )
        )
    provider = ProviderConfig(
        name=reader.required("name", _name),
        kind=reader.required("kind", _scrape_kind),
        url=reader.required("url", _url),
        api_key=api_key if api_key is not None else api_key_from_file,
        timeout=reader.scalar("timeout", _duration, ProviderConfig.timeout),
        headers=reader.section("headers", _parse_headers, {}),
        tls_config=reader.section("tls_config", _parse_tls, TLSConfig()),
        process=reader.section("process", _parse_process, None),
        max_models=reader.scalar("max_models", _positive_int, ProviderConfig.max_models),
        max_series=reader.scalar("max_series", _positive_int, ProviderConfig.max_series),
        probes=reader.section("probes", _parse_probes, None),
        gateway=reader.section("gateway", _parse_gateway, None),
        lifecycle=reader.section("lifecycle", _parse_lifecycle, LifecycleConfig()),
        labels=reader.section("labels", _parse_labels, {}),
    )
    reader.finish()
    kind = KINDS.get(provider.kind)
    if provider.lifecycle.policy and kind is not None and not hasattr(kind, "unload_model"):
        reason = (
            f"kind {provider.kind} cannot load or unload models: the lifecycle policy"
            " (pin, preload, max_loaded, max_memory, idle_unload) needs one that can: "
            + ", ".join(sorted(name for name, k in KINDS.items() if hasattr(k, "unload_model")))
        )
        errors.append(reader.error(f"{path}.lifecycle", reason, reader.node("lifecycle")))
    return provider


_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# Set by the exporter on every /targets entry, or reserved by Prometheus.
_OWN_LABELS = frozenset(["provider", "kind", "job", "instance"])
MAX_TARGET_LABELS = 32


def _parse_labels(reader: _Reader | None) -> dict[str, str]:
    if reader is None:
        return {}
    labels = {}
    for key, (key_node, _) in reader.items.items():
        if not _LABEL_RE.match(key) or key.startswith("__"):
            reason = "not a Prometheus label name (letters, digits and _, not starting with __)"
            raise reader.error(f"{reader.path}.{key}", reason, key_node)
        if key in _OWN_LABELS:
            reason = "set by the exporter or Prometheus: choose another name"
            raise reader.error(f"{reader.path}.{key}", reason, key_node)
        labels[key] = reader.scalar(key, _label_value, "")
    if len(labels) > MAX_TARGET_LABELS:
        raise reader.error(reader.path, f"at most {MAX_TARGET_LABELS} labels")
    return labels


def _label_value(value: Any, path: str, node: yaml.Node) -> str:
    text = _string(value, path, node)
    if len(text) > 256 or not text.isprintable():
        raise _fail(path, node, "a label value is at most 256 printable characters")
    return text


def _parse_modules(reader: _Reader | None) -> dict[str, ModuleConfig]:
    if reader is None:
        return {}
    modules = {}
    for name, (key_node, _) in reader.items.items():
        path = f"{reader.path}.{name}"
        _name(name, path, key_node)
        module = reader.mapping(name)
        if module is None:
            raise reader.error(path, "expected a mapping", key_node)
        modules[name] = _parse_module(module)
    return modules


def _parse_module(reader: _Reader) -> ModuleConfig:
    if "api_key" in reader.items:
        reason = "a module takes its key by reference only: api_key_file"
        raise reader.error(f"{reader.path}.api_key", reason, reader.items["api_key"][0])
    default = ModuleConfig(kind="", targets=TargetAllowlist())
    key_file = reader.scalar("api_key_file", _path, None)
    module = ModuleConfig(
        kind=reader.required("kind", _scrape_kind),
        targets=reader.section("targets", _parse_allowlist, TargetAllowlist()),
        timeout=reader.scalar("timeout", _duration, default.timeout),
        api_key=reader.scalar("api_key_file", _secret_file, None),
        api_key_file=key_file,
        headers=reader.section("headers", _parse_headers, {}),
        tls_config=reader.section("tls_config", _parse_tls, TLSConfig()),
        max_models=reader.scalar("max_models", _positive_int, default.max_models),
        max_series=reader.scalar("max_series", _positive_int, default.max_series),
        probe=reader.section("probe", _parse_module_probe, None),
    )
    reader.finish()
    allow = module.targets
    if not (allow.hosts or allow.cidrs or allow.regex) and reader.node("targets") is not None:
        return module  # its own error was kept
    if not (allow.hosts or allow.cidrs or allow.regex):
        reason = (
            "is required: the hosts, networks or URL pattern this module may probe"
            " (the exporter never sends a module's key to any URL someone asks for)"
        )
        raise reader.error(f"{reader.path}.targets", reason)
    return module


_HOST_RE = re.compile(
    r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$"
)


def _host_item(node: yaml.Node, path: str) -> str:
    host = _string_item(node, path).lower().rstrip(".")
    if not _HOST_RE.match(host):
        raise _fail(path, node, f"{_describe(host)} is not a host name (or *.domain)")
    return host


def _cidr_item(node: yaml.Node, path: str) -> IPv4Network | IPv6Network:
    text = _string_item(node, path)
    try:
        return ip_network(text, strict=True)
    except ValueError as exc:
        raise _fail(path, node, f"not a network like 10.0.0.0/8: {exc}") from None


def _regex(value: Any, path: str, node: yaml.Node) -> str:
    text = _string(value, path, node)
    try:
        re.compile(text)
    except re.error as exc:
        raise _fail(path, node, f"not a valid regular expression: {exc}") from None
    return text


def _parse_module_probe(reader: _Reader | None) -> ModuleProbe | None:
    if reader is None:
        return None
    default = ModuleProbe(model="")
    probe = ModuleProbe(
        model=reader.required("model", _string),
        prompt=reader.scalar("prompt", _string, default.prompt),
        max_tokens=reader.scalar("max_tokens", _positive_int, default.max_tokens),
        timeout=reader.scalar("timeout", _duration, default.timeout),
    )
    reader.finish()
    return probe


def _parse_allowlist(reader: _Reader | None) -> TargetAllowlist:
    if reader is None:
        return TargetAllowlist()
    allow = TargetAllowlist(
        hosts=tuple(_host_item(node, path) for node, path in reader.sequence("hosts")),
        cidrs=tuple(_cidr_item(node, path) for node, path in reader.sequence("cidrs")),
        regex=reader.scalar("regex", _regex, None),
    )
    reader.finish()
    if not (allow.hosts or allow.cidrs or allow.regex):
        raise reader.error(
            reader.path, "list hosts, cidrs or a regex: an empty allowlist allows nothing"
        )
    return allow


def _model_list(reader: _Reader, key: str) -> tuple[str, ...]:
    models = tuple(_string_item(node, path) for node, path in reader.sequence(key))
    for index, name in enumerate(models):
        if name in models[:index]:
            path = f"{reader.path}.{key}[{index}]"
            raise reader.error(path, f'"{_cut(name)}" is listed twice', reader.node(key))
    return models


def _parse_lifecycle(reader: _Reader | None) -> LifecycleConfig:
    default = LifecycleConfig()
    if reader is None:
        return default
    lifecycle = LifecycleConfig(
        watch=reader.scalar("watch", _bool, default.watch),
        watch_interval=reader.scalar("watch_interval", _duration, default.watch_interval),
        pin=_model_list(reader, "pin"),
        preload=_model_list(reader, "preload"),
        max_loaded=reader.scalar("max_loaded", _positive_int, None),
        max_memory=reader.scalar("max_memory", _size, None),
        idle_unload=reader.scalar("idle_unload", _duration, None),
    )
    reader.finish()
    if lifecycle.max_loaded is not None and len(lifecycle.pin) > lifecycle.max_loaded:
        reason = (
            f"{len(lifecycle.pin)} models are pinned but at most {lifecycle.max_loaded}"
            " may be loaded: raise max_loaded or pin fewer"
        )
        raise reader.error(f"{reader.path}.max_loaded", reason, reader.node("max_loaded"))
    if lifecycle.policy and not lifecycle.watch:
        reason = "the policy acts on what the watcher sees: leave watch on"
        raise reader.error(f"{reader.path}.watch", reason, reader.node("watch"))
    return lifecycle


_KEY_PREFIX_RE = re.compile(r"^[0-9a-f]{8,64}$")
MAX_GATEWAY_CLIENTS = 256


def _listen(value: Any, path: str, node: yaml.Node) -> str:
    text = _string(value, path, node)
    try:
        parse_listen_address(text)
    except ValueError:
        raise _fail(path, node, f"expected [host]:port, got {_describe(text)}") from None
    return text


def _header_name(value: Any, path: str, node: yaml.Node) -> str:
    name = _string(value, path, node)
    if not _HEADER_RE.match(name):
        raise _fail(path, node, f"{_describe(name)} is not a valid HTTP header name")
    return name


def _parse_client_keys(reader: _Reader | None) -> dict[str, str]:
    if reader is None:
        return {}
    keys = {}
    for prefix, (key_node, _) in reader.items.items():
        if not _KEY_PREFIX_RE.match(prefix):
            reason = (
                "expected 8 to 64 lower-case hex digits of the key's SHA-256"
                ' (printf %s "$KEY" | sha256sum | cut -c1-12), never the key itself'
            )
            raise reader.error(f"{reader.path}.<prefix>", reason, key_node)
        keys[prefix] = reader.scalar(prefix, _name, "")
    if len(keys) > MAX_GATEWAY_CLIENTS:
        raise reader.error(reader.path, f"at most {MAX_GATEWAY_CLIENTS} clients")
    for prefix, other in itertools.combinations(sorted(keys), 2):
        if other.startswith(prefix):
            where = f"{reader.path}.{other[:8]}..."
            raise reader.error(where, "one prefix starts with another: which client is it?")
    return keys


def _parse_gateway(reader: _Reader | None) -> GatewayConfig | None:
    if reader is None:
        return None
    default = GatewayConfig(listen="")
    gateway = GatewayConfig(
        listen=reader.required("listen", _listen),
        first_byte_timeout=reader.scalar(
            "first_byte_timeout", _duration, default.first_byte_timeout
        ),
        idle_timeout=reader.scalar("idle_timeout", _duration, default.idle_timeout),
        max_connections=reader.scalar("max_connections", _positive_int, default.max_connections),
        models=tuple(_string_item(node, path) for node, path in reader.sequence("models")),
        client_header=reader.scalar("client_header", _header_name, None),
        client_keys=reader.section("client_keys", _parse_client_keys, {}),
        queue=reader.section("queue", _parse_queue, None),
        cache=reader.section("cache", _parse_cache, default.cache),
    )
    reader.finish()
    if gateway.queue is not None:
        unknown = sorted(set(gateway.queue.client_priorities) - set(gateway.client_keys.values()))
        queue_node = reader.node("queue")
        if unknown and gateway.client_header is None and queue_node is not None:
            raise reader.error(
                f"{reader.path}.queue.client_priorities.{unknown[0]}",
                "no such client: name it in gateway.client_keys, or set gateway.client_header",
                _child(queue_node, "client_priorities", unknown[0]),
            )
    return gateway


def _priority(value: Any, path: str, node: yaml.Node) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, node, f"expected an integer priority, got {_describe(value)}")
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        reason = f"expected a priority from {MIN_PRIORITY} to {MAX_PRIORITY}, got {value}"
        raise _fail(path, node, reason)
    return value


def _overflow_status(value: Any, path: str, node: yaml.Node) -> int:
    if value not in (429, 503) or isinstance(value, bool):
        raise _fail(path, node, f"expected 429 or 503, got {_describe(value)}")
    return int(value)


def _parse_client_priorities(reader: _Reader | None) -> dict[str, int]:
    if reader is None:
        return {}
    priorities = {name: reader.scalar(name, _priority, 0) for name in reader.items}
    if len(priorities) > MAX_GATEWAY_CLIENTS:
        raise reader.error(reader.path, f"at most {MAX_GATEWAY_CLIENTS} clients")
    return priorities


def _parse_queue(reader: _Reader | None) -> QueueConfig | None:
    if reader is None:
        return None
    default = QueueConfig(max_concurrent=1)
    if reader.node("max_concurrent") is None:
        reason = (
            "is required: the provider's parallelism (its slots, OLLAMA_NUM_PARALLEL, max_num_seqs)"
        )
        reader.errors.append(reader.error(f"{reader.path}.max_concurrent", reason))
    queue = QueueConfig(
        max_concurrent=reader.scalar("max_concurrent", _positive_int, 1),
        max_waiting=reader.scalar("max_waiting", _non_negative_int, default.max_waiting),
        max_wait=reader.scalar("max_wait", _duration, default.max_wait),
        overflow_status=reader.scalar("overflow_status", _overflow_status, default.overflow_status),
        priority_header=reader.scalar("priority_header", _header_name, None),
        client_priorities=reader.section("client_priorities", _parse_client_priorities, {}),
        aging=reader.scalar("aging", _duration, default.aging),
    )
    reader.finish()
    return queue


def _parse_cache(reader: _Reader | None) -> CacheConfig:
    default = CacheConfig()
    if reader is None:
        return default
    cache = CacheConfig(
        enabled=reader.scalar("enabled", _bool, default.enabled),
        ttl=reader.scalar("ttl", _duration, default.ttl),
        max_entries=reader.scalar("max_entries", _positive_int, default.max_entries),
        max_bytes=reader.scalar("max_bytes", _size, default.max_bytes),
        sampled=reader.scalar("sampled", _bool, default.sampled),
    )
    reader.finish()
    return cache


def _url_warnings(provider: ProviderConfig, path: str) -> list[str]:
    if provider.kind != "openai" and provider.url.endswith("/v1"):
        return [
            f"{path}.url ends in /v1: kind {provider.kind} takes the server's root"
            f" (the exporter adds /v1 where it needs it)"
        ]
    return []


def _jitter(value: Any, path: str, node: yaml.Node) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise _fail(
            path,
            node,
            f"expected a fraction of the interval from 0 to 0.99, got {_describe(value)}",
        )
    return float(value)


def _probe_model(node: yaml.Node, path: str, parent: _Reader) -> ProbeModel:
    if isinstance(node, yaml.ScalarNode):
        return ProbeModel(name=_string_item(node, path))
    reader = _Reader(node, path, parent.file, parent.errors)
    model = ProbeModel(
        name=reader.required("name", _string),
        allow_load=reader.scalar("allow_load", _bool, False),
        interval=reader.scalar("interval", _duration, None),
    )
    reader.finish()
    return model


def _parse_probes(reader: _Reader | None) -> ProbeConfig | None:
    if reader is None:
        return None
    default = ProbeConfig()
    probes = ProbeConfig(
        models=tuple(_probe_model(node, path, reader) for node, path in reader.sequence("models")),
        max_models=reader.scalar("max_models", _positive_int, default.max_models),
        interval=reader.scalar("interval", _duration, default.interval),
        jitter=reader.scalar("jitter", _jitter, default.jitter),
        timeout=reader.scalar("timeout", _duration, None) or 0.0,
        prompt=reader.scalar("prompt", _string, default.prompt),
        max_tokens=reader.scalar("max_tokens", _positive_int, default.max_tokens),
    )
    reader.finish()
    if not probes.timeout:  # not set: the default, but never beyond the interval
        probes = replace(probes, timeout=min(default.timeout, probes.interval))
    if probes.timeout > probes.interval:
        raise reader.error(
            f"{reader.path}.timeout",
            f"must not be above the interval ({probes.interval:g}s)",
            reader.node("timeout"),
        )
    return probes


def _parse_threshold(
    reader: _Reader | None, default: Threshold, convert: Callable[[Any, str, yaml.Node], float]
) -> Threshold:
    if reader is None:
        return default
    threshold = Threshold(
        degraded=reader.scalar("degraded", convert, default.degraded),
        unhealthy=reader.scalar("unhealthy", convert, default.unhealthy),
    )
    reader.finish()
    low, high = threshold.degraded, threshold.unhealthy
    if low is not None and high is not None and low > high:
        unit = "s" if convert is _duration else ""
        raise reader.error(
            reader.path, f"degraded ({low:g}{unit}) must not be above unhealthy ({high:g}{unit})"
        )
    return threshold


def _parse_health(reader: _Reader | None) -> HealthConfig:
    if reader is None:
        return HealthConfig()
    default = HealthConfig()
    health = HealthConfig(
        response_time=_parse_threshold(
            reader.mapping("response_time"), default.response_time, _duration
        ),
        memory_ratio=_parse_threshold(reader.mapping("memory_ratio"), default.memory_ratio, _ratio),
        disk_ratio=_parse_threshold(reader.mapping("disk_ratio"), default.disk_ratio, _ratio),
        cpu_ratio=_parse_threshold(reader.mapping("cpu_ratio"), default.cpu_ratio, _ratio),
        probe_duration=_parse_threshold(
            reader.mapping("probe_duration"), default.probe_duration, _duration
        ),
        probe_failures=_parse_threshold(
            reader.mapping("probe_failures"), default.probe_failures, _positive_int
        ),
        max_age=reader.scalar("max_age", _duration, default.max_age),
    )
    reader.finish()
    return health


def _parse_host(reader: _Reader | None) -> HostConfig:
    if reader is None:
        return HostConfig()
    mounts = tuple(_string_item(item, path) for item, path in reader.sequence("mounts"))
    host = HostConfig(
        enabled=reader.scalar("enabled", _bool, True),
        mounts=mounts if reader.node("mounts") is not None else HostConfig.mounts,
        gpu=reader.scalar("gpu", _bool, True),
    )
    reader.finish()
    return host


def _string_item(node: yaml.Node, path: str) -> str:
    if not isinstance(node, yaml.ScalarNode):
        raise _fail(path, node, f"expected a string, got {_describe(node)}")
    return _string(_construct(node, path), path, node)


def _parse_global(reader: _Reader | None) -> GlobalConfig:
    if reader is None:
        return GlobalConfig()
    settings = GlobalConfig(
        scrape_timeout=reader.scalar("scrape_timeout", _duration, GlobalConfig.scrape_timeout),
        scrape_timeout_margin=reader.scalar(
            "scrape_timeout_margin", _duration, GlobalConfig.scrape_timeout_margin
        ),
        probe_concurrency=reader.scalar(
            "probe_concurrency", _positive_int, GlobalConfig.probe_concurrency
        ),
    )
    reader.finish()
    return settings


def _yaml_reason(exc: yaml.MarkedYAMLError) -> str:
    """PyYAML's complaint, phrased for someone editing the file."""
    problem = exc.problem or exc.context or "unreadable"
    if problem.startswith("expected <block end>"):
        return "the indentation does not match the lines above"
    if problem == "mapping values are not allowed here":
        return f'{problem} (quote a value that contains ": ")'
    if problem.startswith("found character '\\t'"):
        return "a tab cannot indent YAML: use spaces"
    if exc.context and exc.problem and exc.context_mark is not None:
        if problem.startswith("but "):  # expected a single document ..., but found another
            return f"{exc.context}, {problem}"
        first = exc.context_mark.line + 1
        if exc.context.startswith("found duplicate anchor"):
            return f"{exc.context} on line {first}"
        return f"{problem}, {exc.context} started on line {first}"
    return problem


def compose_document(text: str, file: str = "") -> yaml.Node | None:
    """The YAML node tree of a configuration file's text (None if empty), depth-bounded;
    ConfigError, with the line, if it is not YAML."""
    try:
        return _compose(text)
    except ConfigError as exc:
        exc.file = file
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError("", f"invalid YAML: {_yaml_reason(exc)}", line=line, file=file) from None
    except yaml.reader.ReaderError as exc:  # its own message spans lines and names no line
        line = text.count("\n", 0, exc.position) + 1
        reason = f"invalid YAML: unacceptable character #x{exc.character:04x}"
        raise ConfigError("", reason, line=line, file=file) from None
    except yaml.YAMLError:  # whatever else: its message may quote the file, secrets and all
        raise ConfigError("", "invalid YAML", file=file) from None


def parse_config(text: str, file: str = "") -> Config:
    """Parse and validate a whole configuration; raise ConfigError if anything is wrong."""
    root = compose_document(text, file)
    if root is None:
        raise ConfigError("", "the file is empty: configure at least one provider", file=file)
    errors: list[ConfigError] = []
    try:
        config = _parse_root(root, file, errors)
    except ConfigError as exc:
        errors.append(exc)
    raise_found(errors, file)
    return config


def raise_found(errors: list[ConfigError], file: str) -> None:
    """Raise the errors found in a file, if any: one as it is, several together by line."""
    for error in errors:
        error.file = file
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(sorted(errors, key=lambda error: error.line or 0))


def _compose(text: str) -> yaml.Node | None:
    """The YAML node tree of a text; a ConfigError where it nests too deeply."""
    try:
        return yaml.compose(text, Loader=_BoundedLoader)
    except RecursionError:  # not expected under MAX_DEPTH; a traceback would help no one
        raise ConfigError("", f"invalid YAML: nested more than {MAX_DEPTH} levels deep") from None
    except MemoryError:
        raise ConfigError("", "invalid YAML: too large to read") from None


class _BoundedLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping or list nested deeper than MAX_DEPTH.

    The bound holds while composing: PyYAML composes by recursion, and a walk of the
    finished tree would follow aliases, which can name 10**8 nodes in a few hundred bytes.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    @contextlib.contextmanager
    def _deeper(self) -> Iterator[None]:
        """One level deeper for the node composed within; a ConfigError past MAX_DEPTH."""
        if self.depth >= MAX_DEPTH:
            peek: Callable[[], yaml.Event] = self.peek_event
            mark = peek().start_mark
            line = mark.line + 1 if mark is not None else None
            reason = f"invalid YAML: nested more than {MAX_DEPTH} levels deep"
            raise ConfigError("", reason, line=line)
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def compose_sequence_node(self, anchor: Any) -> yaml.SequenceNode:
        with self._deeper():
            return super().compose_sequence_node(anchor)

    def compose_mapping_node(self, anchor: Any) -> yaml.MappingNode:
        with self._deeper():
            return super().compose_mapping_node(anchor)


def _parse_root(root: yaml.Node, file: str, errors: list[ConfigError]) -> Config:
    reader = _Reader(root, "", file, errors)
    providers: list[ProviderConfig] = []
    warnings: list[str] = []
    seen: dict[str, int] = {}
    listening: dict[tuple[str | None, int], str] = {}
    for index, (node, path) in enumerate(reader.sequence("providers")):
        try:
            provider = _parse_provider(node, path, file, errors)
        except ConfigError as exc:
            errors.append(exc)
            continue
        if provider.name and provider.name in seen:
            name_node = _Reader(node, path, file).items["name"][1]
            errors.append(
                reader.error(
                    f"{path}.name",
                    f'"{provider.name}" is already used by providers[{seen[provider.name]}]',
                    name_node,
                )
            )
        seen.setdefault(provider.name, index)
        _check_listen(provider, path, node, listening, reader)
        warnings.extend(_url_warnings(provider, path))
        providers.append(provider)
    config = Config(
        providers=tuple(providers),
        modules=reader.section("modules", _parse_modules, {}),
        host=reader.section("host", _parse_host, HostConfig()),
        health=reader.section("health", _parse_health, HealthConfig()),
        global_=reader.section("global", _parse_global, GlobalConfig()),
        warnings=tuple(warnings),
    )
    reader.finish()
    if not providers and not config.host.enabled and not errors:
        errors.append(
            reader.error("providers", "nothing to do: configure a provider or enable host")
        )
    return config


def _child(node: yaml.Node, *keys: str) -> yaml.Node:
    """The node at keys under a mapping node (the node itself where one is missing)."""
    for key in keys:
        value = dict((k.value, v) for k, v in node.value if isinstance(k, yaml.ScalarNode))
        if key not in value:
            return node
        node = value[key]
    return node


def _check_listen(
    provider: ProviderConfig,
    path: str,
    node: yaml.Node,
    listening: dict[tuple[str | None, int], str],
    reader: _Reader,
) -> None:
    """Refuse a gateway address that another provider's gateway already takes."""
    if provider.gateway is None or not provider.gateway.listen:
        return
    host, port = provider.gateway.address
    if port == 0:  # any free port: never the same as another
        return
    for (other_host, other_port), where in listening.items():
        if port == other_port and (host == other_host or None in (host, other_host)):
            reason = f"port {port} is already taken by {where}"
            listen_node = _child(node, "gateway", "listen")
            reader.errors.append(reader.error(f"{path}.gateway.listen", reason, listen_node))
            return
    listening[(host, port)] = f"{path}.gateway"


def load_config(path: str | Path) -> Config:
    """Read and parse a configuration file (a regular file of at most MAX_CONFIG_BYTES)."""
    file = str(path)
    try:
        text = read_bounded(path, MAX_CONFIG_BYTES)
    except ConfigError as exc:
        exc.file = file
        raise
    return parse_config(text, file)


MASK = "<secret>"
_SECRET_HEADER_RE = re.compile(r"auth|key|token|secret|cookie|session|password", re.IGNORECASE)


def format_duration(seconds: float) -> str:
    """A duration as the configuration writes it (500ms, 5s, 1m30s, 2h), read back exactly."""
    millis = round(seconds * 1000)
    if millis % 1000:
        text = f"{millis}ms"
    else:
        text, rest = "", millis // 1000
        for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
            if rest >= size:
                text += f"{rest // size}{unit}"
                rest %= size
    if text and parse_duration(text) == seconds:
        return text
    # Not a whole number of milliseconds: repr is the shortest decimal that reads back
    # as the same float, and parse_duration reads "{it}s" as exactly that.
    return f"{Decimal(repr(seconds)):f}s"


def _threshold(threshold: Threshold, form: Callable[[float], object]) -> dict[str, object]:
    values = {"degraded": threshold.degraded, "unhealthy": threshold.unhealthy}
    return {key: form(value) for key, value in values.items() if value is not None}


def _connection_document(headers: Mapping[str, str], tls_config: TLSConfig) -> dict[str, object]:
    """headers (secret-looking values masked) and tls_config, as a provider or module has them."""
    document: dict[str, object] = {}
    if headers:
        document["headers"] = {
            name: MASK if _SECRET_HEADER_RE.search(name) else value
            for name, value in headers.items()
        }
    if tls_config != TLSConfig():
        tls: dict[str, object] = {"insecure_skip_verify": tls_config.insecure_skip_verify}
        if tls_config.ca_file is not None:
            tls["ca_file"] = str(tls_config.ca_file)
        document["tls_config"] = tls
    return document


def _provider_document(provider: ProviderConfig) -> dict[str, object]:
    document: dict[str, object] = {
        "name": provider.name,
        "kind": provider.kind,
        "url": provider.url,
    }
    if provider.api_key is not None:
        document["api_key"] = MASK
    document["timeout"] = format_duration(provider.timeout)
    document |= _connection_document(provider.headers, provider.tls_config)
    if provider.process is not None:
        process = provider.process
        document["process"] = {
            key: str(value) if isinstance(value, Path) else value
            for key, value in (("pid_file", process.pid_file), ("name", process.name), ("port", process.port))
            if value is not None
        }  # fmt: skip
    document["max_models"] = provider.max_models
    document["max_series"] = provider.max_series
    if provider.probes is not None:
        probes = provider.probes
        document["probes"] = {
            "models": [
                {"name": m.name, "allow_load": m.allow_load}
                | ({"interval": format_duration(m.interval)} if m.interval is not None else {})
                for m in probes.models
            ],
            "max_models": probes.max_models,
            "interval": format_duration(probes.interval),
            "jitter": probes.jitter,
            "timeout": format_duration(probes.timeout),
            "prompt": probes.prompt,
            "max_tokens": probes.max_tokens,
        }
    if provider.gateway is not None:
        gateway = provider.gateway
        section: dict[str, object] = {
            "listen": gateway.listen,
            "first_byte_timeout": format_duration(gateway.first_byte_timeout),
            "idle_timeout": format_duration(gateway.idle_timeout),
            "max_connections": gateway.max_connections,
            "models": list(gateway.models),
        }
        if gateway.client_header is not None:
            section["client_header"] = gateway.client_header
        if gateway.client_keys:
            section["client_keys"] = dict(gateway.client_keys)
        if gateway.queue is not None:
            queue = gateway.queue
            section["queue"] = {
                "max_concurrent": queue.max_concurrent,
                "max_waiting": queue.max_waiting,
                "max_wait": format_duration(queue.max_wait),
                "overflow_status": queue.overflow_status,
                **({"priority_header": queue.priority_header} if queue.priority_header else {}),
                "client_priorities": dict(queue.client_priorities),
                "aging": format_duration(queue.aging),
            }
        cache = gateway.cache
        section["cache"] = {
            "enabled": cache.enabled,
            "ttl": format_duration(cache.ttl),
            "max_entries": cache.max_entries,
            "max_bytes": format_size(cache.max_bytes),
            "sampled": cache.sampled,
        }
        document["gateway"] = section
    if provider.labels:
        document["labels"] = dict(provider.labels)
    lifecycle = provider.lifecycle
    section = {
        "watch": lifecycle.watch,
        "watch_interval": format_duration(lifecycle.watch_interval),
    }
    section |= {"pin": list(lifecycle.pin), "preload": list(lifecycle.preload)}
    if lifecycle.max_loaded is not None:
        section["max_loaded"] = lifecycle.max_loaded
    if lifecycle.max_memory is not None:
        section["max_memory"] = format_size(lifecycle.max_memory)
    if lifecycle.idle_unload is not None:
        section["idle_unload"] = format_duration(lifecycle.idle_unload)
    document["lifecycle"] = section
    return document


def _module_document(module: ModuleConfig) -> dict[str, object]:
    allow = module.targets
    targets: dict[str, object] = {}
    if allow.hosts:
        targets["hosts"] = list(allow.hosts)
    if allow.cidrs:
        targets["cidrs"] = [str(network) for network in allow.cidrs]
    if allow.regex is not None:
        targets["regex"] = allow.regex
    document: dict[str, object] = {"kind": module.kind, "targets": targets}
    document["timeout"] = format_duration(module.timeout)
    if module.api_key_file is not None:
        document["api_key_file"] = str(module.api_key_file)
    document |= _connection_document(module.headers, module.tls_config)
    document["max_models"] = module.max_models
    document["max_series"] = module.max_series
    if module.probe is not None:
        probe = module.probe
        document["probe"] = {
            "model": probe.model,
            "prompt": probe.prompt,
            "max_tokens": probe.max_tokens,
            "timeout": format_duration(probe.timeout),
        }
    return document


def dump_config(config: Config) -> str:
    """The configuration as YAML that parse_config reads back, with secrets (api_key, and
    header values whose names suggest one) replaced by <secret>."""
    health = config.health
    document = {
        "providers": [_provider_document(p) for p in config.providers],
        "modules": {name: _module_document(m) for name, m in config.modules.items()},
        "host": {"enabled": config.host.enabled, "mounts": list(config.host.mounts), "gpu": config.host.gpu},
        "health": {
            "response_time": _threshold(health.response_time, format_duration),
            "memory_ratio": _threshold(health.memory_ratio, float),
            "disk_ratio": _threshold(health.disk_ratio, float),
            "cpu_ratio": _threshold(health.cpu_ratio, float),
            "probe_duration": _threshold(health.probe_duration, format_duration),
            "probe_failures": _threshold(health.probe_failures, int),
            "max_age": format_duration(health.max_age),
        },
        "global": {
            "scrape_timeout": format_duration(config.global_.scrape_timeout),
            "scrape_timeout_margin": format_duration(config.global_.scrape_timeout_margin),
            "probe_concurrency": config.global_.probe_concurrency,
        },
    }  # fmt: skip
    return yaml.safe_dump(_escaped(document), sort_keys=False, allow_unicode=True, width=100)


def _escaped(value: object) -> object:
    """String values with $ written as $$, which reads back as $ (keys are read as they are)."""
    if isinstance(value, str):
        return value.replace("$", "$$")
    if isinstance(value, dict):
        return {key: _escaped(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_escaped(item) for item in value]
    return value
