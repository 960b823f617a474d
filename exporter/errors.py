"""The exporter's one exception hierarchy.

ExporterError
├── ConfigError        a configuration file that cannot be used; names the key path and line
│   └── ConfigErrors   several of them, found in one file and reported together
└── ProviderError      a provider request that failed; carries one FailureClass

Nothing else is raised to callers: adapters turn every provider fault into a
ProviderError, and the collector turns every ProviderError into series.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum


class FailureClass(StrEnum):
    """Why a request to a provider failed (OpenTelemetry error.type style)."""

    TIMEOUT = "timeout"
    CONNECT = "connect"
    HTTP_4XX = "http_4xx"
    HTTP_5XX = "http_5xx"
    INVALID_RESPONSE = "invalid_response"
    EMPTY_RESPONSE = "empty_response"  # a probe's answer held no generated token


class ExporterError(Exception):
    """Base class of every error the exporter raises on purpose."""


class ConfigError(ExporterError):
    """A configuration that cannot be used, with where and why."""

    def __init__(self, path: str, reason: str, *, line: int | None = None, file: str = "") -> None:
        self.path = path
        self.reason = reason
        self.line = line
        self.file = file
        super().__init__(str(self))

    @property
    def errors(self) -> tuple[ConfigError, ...]:
        """Every error found in the file: this one."""
        return (self,)

    def describe(self) -> str:
        """FILE:LINE: KEY.PATH: REASON, each part left out when unknown."""
        where = self.file
        if self.line is not None:
            where = f"{where}:{self.line}" if where else f"line {self.line}"
        prefix = f"{where}: " if where else ""
        key = f"{self.path}: " if self.path else ""
        return f"{prefix}{key}{self.reason}"

    def __str__(self) -> str:
        return f"config error: {self.describe()}"


class ConfigErrors(ConfigError):
    """Several errors found in one configuration, reported together; its parts are the first's."""

    shown = 50  # a file of thousands of mistakes still fits on a screen

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        self._errors = tuple(errors)
        first = self._errors[0]
        super().__init__(first.path, first.reason, line=first.line, file=first.file)

    @property
    def errors(self) -> tuple[ConfigError, ...]:
        """Every error found in the file, in the order of their lines."""
        return self._errors

    def __str__(self) -> str:
        lines = [str(error) for error in self._errors[: self.shown]]
        if len(self._errors) > self.shown:
            lines.append(f"config error: {len(self._errors) - self.shown} more errors not shown")
        return "\n".join(lines)


class ProviderError(ExporterError):
    """A failed request to a provider, classified."""

    def __init__(self, failure: FailureClass, message: str, *, endpoint: str = "") -> None:
        self.failure = failure
        self.message = message
        self.endpoint = endpoint
        super().__init__(f"{endpoint}: {failure.value}: {message}" if endpoint else message)
