"""Log setup: one line per event on stderr, as logfmt or JSON, with real fields.

Call sites pass their fields apart from the message, so that Loki and friends can
extract them: ``log.warning("provider down", extra=fields(provider="ollama"))`` gives
``level=warn msg="provider down" provider=ollama``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

LEVELS = ("debug", "info", "warn", "error")
FIELDS = "fields"
# The same line again within this many seconds is counted, not written.
REPEAT_WINDOW_SECONDS = 1.0


def fields(**values: object) -> dict[str, Any]:
    """The `extra` of a log call that carries these fields."""
    return {FIELDS: values}


def _logfmt_value(value: str) -> str:
    if value and not any(ch in value for ch in ' "=\\\n'):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _timestamp(record: logging.LogRecord) -> str:
    moment = time.gmtime(record.created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", moment) + f".{int(record.msecs):03d}Z"


def _fields(record: logging.LogRecord) -> dict[str, str]:
    result = {
        "ts": _timestamp(record),
        "level": record.levelname.lower().replace("warning", "warn"),
        "caller": record.module,
        "msg": record.getMessage(),
    }
    for key, value in getattr(record, FIELDS, {}).items():
        result.setdefault(key, str(value))
    if record.exc_info and record.exc_info[1] is not None:
        result["err"] = repr(record.exc_info[1])
    return result


class LogfmtFormatter(logging.Formatter):
    """ts=... level=info caller=module msg="..." key=value (the Prometheus exporters' default)."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{key}={_logfmt_value(value)}" for key, value in _fields(record).items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record))


class RepeatFilter(logging.Filter):
    """Lets a line through once per window; repeats within it are counted and reported
    with the next line that gets through, so a flood of one error costs one line a second."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.clock = clock
        self._last: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, f"{record.msg} {getattr(record, FIELDS, '')}")
        now = self.clock()
        seen = self._last.get(key)
        if seen is not None and now - seen[0] < REPEAT_WINDOW_SECONDS:
            self._last[key] = (seen[0], seen[1] + 1)
            return False
        if len(self._last) > 1000:  # bounded, whatever the messages are
            self._last.clear()
        self._last[key] = (now, 0)
        if seen is not None and seen[1]:
            extra = dict(getattr(record, FIELDS, {}))
            extra["repeated"] = seen[1]
            setattr(record, FIELDS, extra)
        return True


class BadRequestFilter(logging.Filter):
    """Turns aiohttp's error line for a malformed HTTP request into a debug line, counted."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        # Only the client's malformed request; a handler's own failure keeps its traceback.
        if str(record.msg).startswith("Error handling request") and isinstance(
            error, HttpProcessingError
        ):
            self.count += 1
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info, record.exc_text = None, None
            record.msg, record.args = "malformed HTTP request", ()
        return True


def setup_logging(level: str, fmt: str) -> None:
    """Send every log record to stderr in the chosen format and level."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    threshold = logging.WARNING if level == "warn" else getattr(logging, level.upper())
    # The handler checks the level too: filters below may lower a record's level.
    handler.setLevel(threshold)
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(threshold)
    # aiohttp's access log would put every scrape in the log.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
