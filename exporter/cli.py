"""The llm-exporter command: Prometheus-style flags, startup and shutdown."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from . import __version__
from .config import DEFAULT_LISTEN_ADDRESS, load_config
from .errors import ConfigError
from .logs import LEVELS, setup_logging
from .server import Exporter, create_app

log = logging.getLogger("exporter")


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    parser = argparse.ArgumentParser(
        prog="llm-exporter",
        description="Prometheus exporter for LLM inference servers.",
    )
    parser.add_argument(
        "--config.file",
        dest="config_file",
        default="llm-exporter.yml",
        help="configuration file (default: %(default)s)",
    )
    parser.add_argument(
        "--web.listen-address",
        dest="listen_address",
        default=DEFAULT_LISTEN_ADDRESS,
        help="address to serve /metrics on, as [host]:port (default: %(default)s)",
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
        help="validate the configuration file and exit (status 0 if valid, 2 if not)",
    )
    parser.add_argument("--version", action="version", version=f"llm-exporter {__version__}")
    return parser  # fmt: skip


def parse_listen_address(address: str) -> tuple[str | None, int]:
    """(host or None for all interfaces, port) from [host]:port; ValueError if malformed."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ValueError(f'invalid listen address "{address}": expected [host]:port')
    host = host.removeprefix("[").removesuffix("]")
    return (host or None), int(port_text)


async def serve(exporter: Exporter, host: str | None, port: int) -> int:
    """Serve until SIGINT or SIGTERM; reload on SIGHUP. Returns the exit status."""
    runner = web.AppRunner(create_app(exporter), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    except OSError as exc:
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        log.error("cannot listen on %s:%d: %s", host or "", port, reason)
        await runner.cleanup()
        await exporter.aclose()
        return 1
    log.info(
        "listening address=%s:%d providers=%d version=%s",
        host or "", port, len(exporter.config.providers), __version__,
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(_reload(exporter)))
    first = asyncio.ensure_future(exporter.collect())
    await stop.wait()
    log.info("shutting down")
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    await runner.cleanup()
    await exporter.aclose()
    return 0


async def _reload(exporter: Exporter) -> None:
    try:
        await exporter.reload()
    except ConfigError as exc:
        log.error("configuration reload failed, keeping the running one: %s", exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the exporter; returns the process exit status."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        config = load_config(args.config_file)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.config_check:
        print(f"{args.config_file}: valid, {len(config.providers)} provider(s)")
        return 0
    try:
        host, port = parse_listen_address(args.listen_address)
    except ValueError as exc:
        print(f"llm-exporter: {exc}", file=sys.stderr)
        return 2

    async def run() -> int:
        exporter = Exporter(config, args.config_file)
        return await serve(exporter, host, port)

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return 130
