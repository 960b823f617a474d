"""Start a real vLLM OpenAI-compatible server (CPU) on loopback, for live tests and demos.

vLLM lives in a venv of its own (scripts/install_vllm.sh); this module only needs the stdlib,
so it imports from the project's main venv. Typical use in a test:

    python, model_dir = ensure_vllm(REPO_ROOT)
    with VllmServer(model_dir) as server:
        httpx.get(server.url + "/metrics")

CLI: `python scripts/vllm_server.py --port 8000` installs what is missing, starts the server
and blocks until Ctrl-C (or SIGTERM, or --duration seconds).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SERVED_MODEL_NAME = "tiny"
MODEL_SUBDIR = Path(".cache") / "vllm-tiny"
STARTUP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0
INSTALL_TIMEOUT_S = 1800.0
MODEL_TIMEOUT_S = 300.0
LOG_TAIL_LINES = 40


def default_venv(repo_root: Path = REPO_ROOT) -> Path:
    """Return the vLLM venv path: $VLLM_VENV (relative to repo_root) or repo_root/.venv-vllm."""
    venv = Path(os.environ.get("VLLM_VENV", ".venv-vllm"))
    return venv if venv.is_absolute() else repo_root / venv


def free_port(host: str = HOST) -> int:
    """Return a TCP port that is free on host right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ensure_vllm(repo_root: Path | str = REPO_ROOT) -> tuple[Path, Path]:
    """Install vLLM and write the tiny model if missing; return (venv python, model dir)."""
    root = Path(repo_root).resolve()
    venv = default_venv(root)
    subprocess.run(
        ["bash", str(root / "scripts" / "install_vllm.sh")],
        cwd=root,
        env={**os.environ, "VLLM_VENV": str(venv)},
        check=True,
        timeout=INSTALL_TIMEOUT_S,
    )
    python = venv / "bin" / "python"
    model_dir = root / MODEL_SUBDIR
    # The script itself decides whether the model is current (its marker names the recipe).
    subprocess.run(
        [str(python), str(root / "scripts" / "tiny_hf_model.py"), str(model_dir)],
        cwd=root,
        check=True,
        timeout=MODEL_TIMEOUT_S,
    )
    return python, model_dir


class VllmServerError(RuntimeError):
    """The vLLM server failed to start or exited early."""


class VllmServer:
    """A vLLM api_server subprocess on 127.0.0.1, in its own process group."""

    def __init__(
        self,
        model_dir: Path | str,
        *,
        venv: Path | str | None = None,
        port: int | None = None,
        max_num_seqs: int = 4,
        kv_cache_memory_bytes: int | None = None,
        extra_args: Sequence[str] = (),
        served_model_name: str = SERVED_MODEL_NAME,
        max_model_len: int = 256,
        startup_timeout: float = STARTUP_TIMEOUT_S,
        keep_log: bool = False,
    ) -> None:
        """Configure the server; nothing runs until start()."""
        self.model_dir = Path(model_dir).resolve()
        self.venv = Path(venv).resolve() if venv is not None else default_venv()
        self.port = port if port is not None else free_port()
        self.max_num_seqs = max_num_seqs
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self.extra_args = tuple(extra_args)
        self.served_model_name = served_model_name
        self.max_model_len = max_model_len
        self.startup_timeout = startup_timeout
        self.keep_log = keep_log
        self.log_dir: Path | None = None
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Return the base URL, e.g. http://127.0.0.1:8000."""
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Return the server's process id (also its process group id), or None if not started."""
        return self._proc.pid if self._proc is not None else None

    @property
    def python(self) -> Path:
        """Return the venv's python."""
        return self.venv / "bin" / "python"

    @property
    def log_path(self) -> Path | None:
        """Return the server log file, or None before start()."""
        return self.log_dir / "vllm_server.log" if self.log_dir is not None else None

    def returncode(self) -> int | None:
        """Return the exit code if the server process has exited, else None."""
        return self._proc.poll() if self._proc is not None else None

    def command(self) -> list[str]:
        """Return the api_server command line."""
        cmd = [
            str(self.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--served-model-name",
            self.served_model_name,
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--max-model-len",
            str(self.max_model_len),
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--dtype",
            "float32",
            "--enforce-eager",
        ]
        if self.kv_cache_memory_bytes is not None:
            cmd += ["--kv-cache-memory-bytes", str(self.kv_cache_memory_bytes)]
        return cmd + list(self.extra_args)

    def env(self) -> dict[str, str]:
        """Return the server's environment: offline, no usage stats, explicit KV cache size."""
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_HOST_IP": HOST,  # keep vLLM's internal sockets on loopback too
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("VIRTUAL_ENV", None)
        if self.log_dir is not None:
            env["TMPDIR"] = str(self.log_dir)  # vLLM's temp files (vllm_dist_*) go with the log
        if self.kv_cache_memory_bytes is None:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default is larger
        return env

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """Return the last lines of the server log."""
        path = self.log_path
        if path is None or not path.is_file():
            return ""
        text = path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def start(self) -> VllmServer:
        """Launch the server and wait until /health answers 200 (fail fast if it exits)."""
        if self._proc is not None:
            raise VllmServerError("server already started")
        if not self.python.is_file():
            raise VllmServerError(f"{self.python} missing: run scripts/install_vllm.sh")
        if not (self.model_dir / "config.json").is_file():
            raise VllmServerError(f"{self.model_dir} holds no model: run tiny_hf_model.py")
        self.log_dir = Path(tempfile.mkdtemp(prefix="vllm-server-"))
        t0 = time.monotonic()
        assert self.log_path is not None
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                cwd=self.log_dir,
                # Its own process group (so stop() reaches every vLLM process, and a terminal
                # Ctrl-C goes to the test run), but the caller's session: a new session is a new
                # scheduler autogroup, and on a 2-core machine the kernel then left the test
                # process runnable but unscheduled for seconds while vLLM generated.
                process_group=0,
            )
        atexit.register(self.stop)
        try:
            self._wait_healthy(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_healthy(self, t0: float) -> None:
        """Poll /health until 200, the process exits, or startup_timeout passes."""
        assert self._proc is not None
        interval = 0.5
        max_polls = int(self.startup_timeout / interval) + 1
        for _ in range(max_polls):
            code = self._proc.poll()
            if code is not None:
                raise VllmServerError(
                    f"vLLM exited with code {code} during startup; log tail:\n{self.log_tail()}"
                )
            if time.monotonic() - t0 > self.startup_timeout:
                break
            if self._health_ok():
                return
            time.sleep(interval)
        raise VllmServerError(
            f"vLLM not healthy after {self.startup_timeout:.0f} s; log tail:\n{self.log_tail()}"
        )

    def _health_ok(self) -> bool:
        """Tell whether GET /health answers 200."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                return int(resp.status) == 200
        except (OSError, urllib.error.URLError):
            return False

    def _group_alive(self, pgid: int) -> bool:
        """Tell whether any process of the group is left."""
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def stop(self) -> None:
        """SIGTERM the process group, wait up to 15 s, then SIGKILL it; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            atexit.unregister(self.stop)
            pgid = proc.pid
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_TIMEOUT_S)
            # The engine-core child may outlive the api_server: wait for the whole group.
            for _ in range(int(STOP_TIMEOUT_S / 0.1) + 1):
                if not self._group_alive(pgid) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            if self._group_alive(pgid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        if self.log_dir is not None and not self.keep_log:
            shutil.rmtree(self.log_dir, ignore_errors=True)
            self.log_dir = None

    def __enter__(self) -> VllmServer:
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
    """Run the CLI: install if needed, start the server, block until Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: free)")
    parser.add_argument("--max-num-seqs", type=int, default=4)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    parser.add_argument("--duration", type=float, default=0, help="stop after N s (0: never)")
    parser.add_argument("--no-install", action="store_true", help="do not run install steps")
    parser.add_argument("extra", nargs="*", help="extra api_server args (after --)")
    args = parser.parse_args(argv)

    if args.no_install:
        python, model_dir = default_venv() / "bin" / "python", REPO_ROOT / MODEL_SUBDIR
    else:
        python, model_dir = ensure_vllm(REPO_ROOT)
    server = VllmServer(
        model_dir,
        venv=python.parent.parent,
        port=args.port,
        max_num_seqs=args.max_num_seqs,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        extra_args=args.extra,
        keep_log=True,
    )

    def on_sigterm(signum: int, frame: object) -> None:
        """Turn SIGTERM into KeyboardInterrupt so the server is stopped."""
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    with server:
        print(
            f"vLLM serving '{server.served_model_name}' at {server.url} (pid {server.pid}, "
            f"started in {server.startup_seconds:.1f} s, log {server.log_path})",
            flush=True,
        )
        deadline = time.monotonic() + args.duration if args.duration > 0 else None
        try:
            while True:
                if server.returncode() is not None:
                    print(f"vLLM exited; log tail:\n{server.log_tail()}", file=sys.stderr)
                    return 1
                if deadline is not None and time.monotonic() > deadline:
                    break
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        print("stopping vLLM", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
