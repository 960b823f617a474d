"""The llm-exporter command: Prometheus-style flags, startup and shutdown."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from . import __version__
from .config import (
    DEFAULT_LISTEN_ADDRESS,
    Config,
    dump_config,
    load_config,
    parse_duration,
    parse_listen_address,
)
from .discovery import discover
from .errors import ConfigError
from .logs import LEVELS, fields, setup_logging
from .server import IDLE_TIMEOUT_SECONDS, MAX_CONNECTIONS, Exporter, log_warnings, start_runner
from .webconfig import WebConfigFile

log = logging.getLogger("exporter")
DEFAULT_CONFIG_FILE = "llm-exporter.yml"


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    parser = argparse.ArgumentParser(
        prog="llm-exporter",
        description="Prometheus exporter for LLM inference servers.",
    )
    parser.add_argument(
        "--config.file",
        dest="config_file",
        default=None,
        help=f"configuration file (default: {DEFAULT_CONFIG_FILE} if it exists; without one,"
        " providers on this host's default ports are found and served)",
    )
    parser.add_argument(
        "--web.listen-address",
        dest="listen_address",
        default=DEFAULT_LISTEN_ADDRESS,
        help="address to serve /metrics on, as [host]:port (default: %(default)s)",
    )
    parser.add_argument(
        "--web.config.file",
        dest="web_config_file",
        default=None,
        help="TLS and basic authentication for every endpoint, in the exporter-toolkit format"
        " (TLS for the gateway listeners too); read again on each request and new connection",
    )
    parser.add_argument(
        "--web.enable-lifecycle",
        dest="enable_lifecycle",
        action="store_true",
        help="answer POST /-/reload (off by default; SIGHUP always reloads)",
    )
    parser.add_argument(
        "--web.max-connections",
        dest="max_connections",
        type=_positive_int,
        default=MAX_CONNECTIONS,
        help="most client connections open at once; past it the oldest idle one is closed"
        " (default: %(default)s)",
    )
    parser.add_argument(
        "--web.idle-timeout",
        dest="idle_timeout",
        type=_seconds,
        default=f"{IDLE_TIMEOUT_SECONDS:g}s",
        help="close a client connection that sends no complete request for this long"
        " (default: %(default)s)",
    )
    parser.add_argument(
        "--log.level",
        dest="log_level",
        choices=LEVELS,
        default="info",
        help="only log messages of this level or above (default: %(default)s)",
    )
    parser.add_argument(
        "--log.format",
        dest="log_format",
        choices=("logfmt", "json"),
        default="logfmt",
        help="log line format (default: %(default)s)",
    )
    parser.add_argument(
        "--config.check",
        dest="config_check",
        action="store_true",
        help="validate the configuration file (and --web.config.file, if given) and exit"
        " (status 0 if valid, 2 if not)",
    )
    parser.add_argument(
        "--config.print",
        dest="config_print",
        action="store_true",
        help="print the effective configuration (loaded or found) as YAML, secrets masked, and exit",
    )
    parser.add_argument("--version", action="version", version=f"llm-exporter {__version__}")
    return parser  # fmt: skip


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    seconds = parse_duration(text)
    if seconds is None or seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration like 15s, got {text!r}")
    return seconds


async def serve(
    exporter: Exporter,
    host: str | None,
    port: int,
    *,
    max_connections: int = MAX_CONNECTIONS,
    idle_timeout: float = IDLE_TIMEOUT_SECONDS,
) -> int:
    """Serve until SIGINT or SIGTERM; reload on SIGHUP. Returns the exit status."""
    try:
        runner = await start_runner(
            exporter, max_connections=max_connections, idle_timeout=idle_timeout
        )
    except ConfigError as exc:  # a gateway that cannot listen
        log.error("cannot start", extra=fields(error=exc))
        await exporter.aclose()
        return 1
    tls = exporter.web_config.ssl_context if exporter.web_config is not None else None
    try:
        await web.TCPSite(runner, host, port, reuse_address=True, ssl_context=tls).start()
    except OSError as exc:
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        log.error("cannot listen", extra=fields(address=f"{host or ''}:{port}", error=reason))
        await runner.cleanup()
        await exporter.aclose()
        return 1
    log.info(
        "listening",
        extra=fields(
            address=f"{host or ''}:{port}",
            providers=len(exporter.config.providers),
            tls="true" if tls is not None else "false",
            version=__version__,
        ),
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def reload() -> None:
        task = asyncio.ensure_future(_reload(exporter))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    first = asyncio.ensure_future(exporter.collect())
    await stop.wait()
    log.info("shutting down")
    # Nobody waits for the answers of collections in progress: do not wait for them either.
    for task in (first, *reloads):
        task.cancel()
    exporter.cancel_collection()
    await asyncio.gather(first, *reloads, return_exceptions=True)
    await runner.cleanup()
    await exporter.aclose()
    return 0


async def _reload(exporter: Exporter) -> None:
    try:
        await exporter.reload()
    except ConfigError as exc:
        log.error("configuration reload failed, keeping the running one", extra=fields(error=exc))


def _read_config(config_file: str | None) -> tuple[Config, str | None]:
    """The configuration to run, and its file (None when providers were found instead)."""
    if config_file is None and Path(DEFAULT_CONFIG_FILE).exists():
        config_file = DEFAULT_CONFIG_FILE
    if config_file is None:
        return asyncio.run(discover()), None
    if not Path(config_file).exists():
        raise ConfigError(
            "",
            "no such file; llm-exporter.example.yml is a commented example to start from,"
            " and without --config.file the exporter finds providers on this host itself",
            file=str(Path(config_file).absolute()),
        )
    return load_config(config_file), config_file


def main(argv: Sequence[str] | None = None) -> int:
    """Run the exporter; returns the process exit status."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    if args.config_check and args.config_file is None and not Path(DEFAULT_CONFIG_FILE).exists():
        print(f"llm-exporter: no configuration file to check ({DEFAULT_CONFIG_FILE} not found)",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        config, config_file = _read_config(args.config_file)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.config_print:
        sys.stdout.write(dump_config(config))
        return 0
    web_config = None
    if args.web_config_file is not None:
        try:
            web_config = WebConfigFile(args.web_config_file)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
    if args.config_check:
        print(f"{config_file}: valid, {len(config.providers)} provider(s)")
        if web_config is not None:
            print(f"{args.web_config_file}: valid web configuration")
        for warning in config.warnings:
            print(f"warning: {warning}")
        return 0
    log_warnings(config)
    try:
        host, port = parse_listen_address(args.listen_address)
    except ValueError as exc:
        print(f"llm-exporter: {exc}", file=sys.stderr)
        return 2

    async def run() -> int:
        exporter = Exporter(
            config,
            config_file,
            rediscover=discover if config_file is None else None,
            enable_lifecycle=args.enable_lifecycle,
            web_config=web_config,
        )
        return await serve(
            exporter,
            host,
            port,
            max_connections=args.max_connections,
            idle_timeout=args.idle_timeout,
        )

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return 130
