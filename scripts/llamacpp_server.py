"""Run llama.cpp's own HTTP server (xllamacpp.Server) as a separate process, for tests and demos.

CLI: python scripts/llamacpp_server.py --model M.gguf --port 8080 [--parallel 4] [--ctx 256] ...
serves /health, /v1/models, /v1/chat/completions, /metrics, /slots, /props until SIGTERM/SIGINT.

--ctx is the context size of EACH slot: the KV cache is sized --ctx * --parallel and split
evenly (kv_unified off), so /slots and /v1/models report n_ctx == --ctx.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

SCRIPT = Path(__file__).resolve()
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.05
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never proxy loopback


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is currently free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(
    model: str,
    *,
    port: int,
    host: str = "127.0.0.1",
    parallel: int = 4,
    ctx: int = 256,
    api_key: str | None = None,
    alias: str = "tiny-llama",
    threads: int | None = None,
    exit_on_stdin_eof: bool = False,
    embeddings: bool = False,
) -> int:
    """Serve the model over HTTP until SIGTERM/SIGINT (or stdin EOF if asked); return exit code."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Installed before the (blocking) model load so an early SIGTERM still exits cleanly.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if exit_on_stdin_eof:
        # The parent holds the only write end: EOF means it is gone, so do not linger orphaned.
        def watch_stdin() -> None:
            # os.read, not sys.stdin: a daemon thread blocked in a buffered reader aborts
            # interpreter shutdown ("could not acquire lock for <stdin>").
            with contextlib.suppress(OSError):
                while os.read(0, 4096):
                    pass
            stop.set()

        threading.Thread(target=watch_stdin, name="stdin-eof", daemon=True).start()

    import xllamacpp  # type: ignore[import-untyped]  # late: the parent side must not need it

    params = xllamacpp.CommonParams()
    params.model.path = model
    params.hostnames = [host]
    params.port = port
    params.n_parallel = parallel
    params.kv_unified = False
    params.n_ctx = ctx * parallel
    params.model_alias = {alias}
    params.endpoint_metrics = True
    params.endpoint_slots = True
    params.endpoint_props = True
    if api_key:
        params.api_keys = [api_key]
    if embeddings:  # /v1/embeddings (llama-server's --embeddings --pooling mean)
        params.embedding = True
        params.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
    if threads:
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads

    started = time.monotonic()
    # Blocks until the model is loaded; HTTP then runs on llama.cpp's own threads.
    server = xllamacpp.Server(params)
    print(
        f"llamacpp_server: listening on {server.listening_address} "
        f"(model loaded in {time.monotonic() - started:.3f}s, pid {os.getpid()})",
        flush=True,
    )
    while not stop.wait(1.0):
        pass
    print("llamacpp_server: stopping", flush=True)
    # Dropping the last reference runs ~Server: terminate the loop, stop HTTP, join threads.
    del server
    print("llamacpp_server: stopped", flush=True)
    return 0


class LlamaCppServer:
    """A llama.cpp server subprocess on 127.0.0.1, usable as a context manager."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        port: int | None = None,
        parallel: int = 4,
        ctx: int = 256,
        api_key: str | None = None,
        alias: str = "tiny-llama",
        python: str = sys.executable,
        threads: int | None = 1,
        embeddings: bool = False,
    ) -> None:
        """Configure the server; nothing runs until start()."""
        # threads=1 by default: with one compute thread per core, llama.cpp's thread barrier
        # collapses (10x slower) as soon as anything else (tests, exporter) wants a core.
        self.model_path = Path(model_path)
        self.port = port if port is not None else free_port()
        self.parallel = parallel
        self.ctx = ctx
        self.api_key = api_key
        self.alias = alias
        self.python = python
        self.threads = threads
        self.embeddings = embeddings
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path: Path | None = None
        self._tmpdir: Path | None = None
        self._log: IO[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """Process id of the server, or None before start()."""
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        """Exit status once the process has ended, else None."""
        return self._proc.poll() if self._proc else None

    def command(self) -> list[str]:
        """The command line that runs the server."""
        cmd = [self.python, str(SCRIPT), "--model", str(self.model_path)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--parallel", str(self.parallel), "--ctx", str(self.ctx), "--alias", self.alias]
        cmd += ["--exit-on-stdin-eof"]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        if self.embeddings:
            cmd += ["--embeddings"]
        return cmd

    def log_tail(self, max_bytes: int = 4000) -> str:
        """Last max_bytes of the server log."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        data = self.log_path.read_bytes()[-max_bytes:]
        return data.decode("utf-8", errors="replace")

    def start(self) -> LlamaCppServer:
        """Launch the server and wait (at most 30 s) until GET /health returns 200."""
        if self._proc is not None:
            raise RuntimeError("server already started")
        if not self.model_path.is_file():
            raise FileNotFoundError(self.model_path)
        self._tmpdir = Path(tempfile.mkdtemp(prefix="llamacpp-server-"))
        self.log_path = self._tmpdir / "server.log"
        self._log = self.log_path.open("wb")
        try:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.PIPE,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                # Own process group, so a terminal Ctrl-C goes to the test run, which stops us;
                # same session, so the same scheduler autogroup (see vllm_server.py).
                process_group=0,
            )
        except OSError:
            self.stop()
            raise
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for _ in range(int(STARTUP_TIMEOUT_S / POLL_INTERVAL_S) + 1):
            if self._proc.poll() is not None:
                code = self._proc.returncode
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"llama.cpp server exited with {code} during startup:\n{tail}")
            if self._health_ok():
                return self
            if time.monotonic() > deadline:
                break
            time.sleep(POLL_INTERVAL_S)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"llama.cpp server not healthy after {STARTUP_TIMEOUT_S}s:\n{tail}")

    def _health_ok(self) -> bool:
        """Whether GET /health answers 200 right now."""
        try:
            with _NO_PROXY.open(f"{self.url}/health", timeout=1.0) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """SIGTERM the server, SIGKILL it after 10 s; idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
        if proc is not None and proc.stdin is not None and not proc.stdin.closed:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
            self.log_path = None

    def __enter__(self) -> LlamaCppServer:
        """Start the server."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="GGUF model path")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--parallel", type=int, default=4, help="number of slots")
    parser.add_argument("--ctx", type=int, default=256, help="context size per slot")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--alias", default="tiny-llama", help="model name served by the API")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: auto)")
    parser.add_argument("--embeddings", action="store_true", help="serve /v1/embeddings too")
    parser.add_argument(
        "--exit-on-stdin-eof", action="store_true", help="also stop when stdin reaches EOF"
    )
    args = parser.parse_args(argv)
    return serve(
        args.model,
        port=args.port,
        host=args.host,
        parallel=args.parallel,
        ctx=args.ctx,
        api_key=args.api_key,
        alias=args.alias,
        threads=args.threads,
        exit_on_stdin_eof=args.exit_on_stdin_eof,
        embeddings=args.embeddings,
    )


if __name__ == "__main__":
    sys.exit(main())
