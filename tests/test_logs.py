"""Log lines: real fields for Loki and friends, and no flood of one repeated line."""

from __future__ import annotations

import json
import logging

from aiohttp.http_exceptions import BadHttpMessage

from exporter.logs import BadRequestFilter, JsonFormatter, LogfmtFormatter, RepeatFilter, fields


def record(msg: str, **values: object) -> logging.LogRecord:
    made = logging.LogRecord("exporter.test", logging.WARNING, __file__, 1, msg, (), None)
    made.__dict__.update(fields(**values))
    return made


def test_fields_are_fields_in_logfmt_and_json() -> None:
    line = LogfmtFormatter().format(record("provider down", provider="ollama", reason="a b"))
    assert ' msg="provider down" provider=ollama reason="a b"' in line
    document = json.loads(JsonFormatter().format(record("provider down", provider="ollama")))
    assert document["provider"] == "ollama" and document["msg"] == "provider down"


def test_a_repeated_line_is_written_once_a_second_then_with_its_count() -> None:
    now = [0.0]
    repeats = RepeatFilter(clock=lambda: now[0])
    passed = []
    for _ in range(1000):  # a flood within one second
        passed.append(repeats.filter(record("socket.accept() out of system resource")))
        now[0] += 0.0005
    now[0] = 1.5
    later = record("socket.accept() out of system resource")
    assert passed.count(True) == 1
    assert repeats.filter(later)
    assert later.__dict__["fields"]["repeated"] == 999
    # Another line is not held back by the first one's flood, nor the same line of another provider.
    assert repeats.filter(record("something else"))
    assert repeats.filter(record("provider up", provider="a"))
    assert repeats.filter(record("provider up", provider="b"))


def test_only_a_malformed_request_is_demoted_a_handlers_failure_keeps_its_traceback() -> None:
    demote = BadRequestFilter()

    def aiohttp_line(error: Exception) -> logging.LogRecord:
        line = logging.LogRecord(
            "aiohttp.server",
            logging.ERROR,
            __file__,
            1,
            "Error handling request from %s",
            ("127.0.0.1",),
            (type(error), error, None),
        )
        return line

    malformed, crash = aiohttp_line(BadHttpMessage("Bad Header")), aiohttp_line(KeyError("x"))
    assert demote.filter(malformed) and demote.filter(crash)
    assert (malformed.levelno, malformed.exc_info) == (logging.DEBUG, None)
    assert crash.levelno == logging.ERROR and crash.exc_info is not None
    assert demote.count == 1
