"""The monitoring bundle end to end: real Prometheus and Alertmanager, the exporter, llama.cpp.

One module-scoped stack: llama.cpp's own server, stand-ins for what cannot run here
(Ollama, a recorded vLLM, an OpenAI-compatible API, a GPU), the exporter scraping them
with a measuring gateway in front of llama.cpp and Ollama (some real requests go through
it; llama.cpp's gateway has a queue and a cache, Ollama's a queue that turns requests
away), a second Ollama stand-in with Ollama's scheduler whose models the exporter's
lifecycle watcher follows (one pinned, two that clients switch between and so evict each
other), Prometheus scraping the exporter with the bundle's rules (a copy whose `for` is
2 s), and Alertmanager with the bundle's routing, every receiver pointed at a webhook here.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml
from aiohttp import web

from exporter.server import Exporter, create_app
from llamacpp_server import LlamaCppServer, free_port
from tests.helpers import config_of, provider_yaml, stop_process
from tests.ollama_standin import OllamaLifecycle
from tests.prometheus_server import prometheus
from tests.standins import (
    StandIn,
    closed_port,
    delayed,
    json_reply,
    lmstudio_routes,
    ollama_chat,
    ollama_routes,
    openai_routes,
    sglang_routes,
    sse_chat,
    tgi_routes,
    trtllm_routes,
    vllm_routes,
)
from tests.test_host import StandInNvml

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "prometheus"
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
JOB = "llm-exporter"
T = TypeVar("T")
OLLAMA_MODEL = "mistral:latest"  # loaded, in the Ollama stand-in's /api/ps
# Ollama's non-streamed /api/generate answer (docs/api.md shape), held this long: long
# enough for another request to find its one queue slot taken.
OLLAMA_GENERATE = {
    "model": OLLAMA_MODEL,
    "created_at": "2023-08-04T19:22:45.499127Z",
    "response": "The sky is blue.",
    "done": True,
    "done_reason": "stop",
    "total_duration": 5043500667,
    "load_duration": 5025959,
    "prompt_eval_count": 26,
    "prompt_eval_duration": 325953000,
    "eval_count": 5,
    "eval_duration": 4709213000,
}
GENERATE_SECONDS = 2.0
# The lifecycle stand-in: it holds two models at once, one of them pinned by the exporter's
# policy; clients switch between the two others, each asked to stay for ever (keep_alive -1),
# so each switch evicts the other one: more than 3 times each, LLMModelThrashing's threshold.
PINNED, SWITCHED = "pinned", ("a", "b")
SWITCHES = 10
# local, ollama, vllm, api, gone and models, then one of each other kind.
PROVIDERS = 10


class Loop:
    """An asyncio loop in a thread, hosting the stand-ins, the exporter and the webhook."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run a coroutine on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        """Stop the loop and its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    """Serve an aiohttp app on a free 127.0.0.1 port."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert site._server is not None
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


def start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start a server process with its output in a log file."""
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def wait_for(check: Any, what: str, seconds: float = 60, every: float = 0.25) -> Any:
    """Poll check() until it returns something truthy (bounded in time and count)."""
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds / every) + 1):
        try:
            value = check()
        except httpx.TransportError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def test_copy_of_alerts(source: Path, target: Path, hold: str = "2s") -> None:
    """The alert rules with every `for` shortened, so a test sees them fire in seconds."""
    rules = yaml.safe_load(source.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule and "for" in rule:
                rule["for"] = hold
    target.write_text(yaml.safe_dump(rules, sort_keys=False))


test_copy_of_alerts.__test__ = False  # type: ignore[attr-defined]


def alertmanager_copy(source: Path, target: Path, webhook: str) -> None:
    """The bundle's Alertmanager routing, every receiver sending to the test's webhook."""
    config = yaml.safe_load(source.read_text())
    config["receivers"] = [
        {"name": r["name"], "webhook_configs": [{"url": webhook, "send_resolved": False}]}
        for r in config["receivers"]
    ]

    def quicken(route: dict[str, Any]) -> None:
        for key in ("group_wait", "group_interval"):
            if key in route or route is config["route"]:
                route[key] = "1s"
        for child in route.get("routes", []):
            quicken(child)

    quicken(config["route"])
    config.pop("templates", None)
    target.write_text(yaml.safe_dump(config, sort_keys=False))


@dataclass
class Stack:
    """The running bundle."""

    prometheus: str
    alertmanager: str
    exporter: str
    llama: LlamaCppServer
    alerts: list[dict[str, Any]]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (or matrix)."""
        response = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Stack]:
    """Start everything; stop everything afterwards."""
    work = tmp_path_factory.mktemp("bundle")
    loop = Loop()
    processes: list[subprocess.Popen[bytes]] = []
    runners: list[web.AppRunner] = []
    alerts: list[dict[str, Any]] = []
    standins: list[StandIn] = []
    exporter: Exporter | None = None
    llama = LlamaCppServer(tiny_model, parallel=2)
    try:
        llama.start()
        assert llama.pid is not None

        async def bring_up() -> tuple[int, int, dict[str, str]]:
            nonlocal exporter
            chat = ollama_chat(
                ("The", " sky", "."), first_load_ns=3_000_000_000, later_load_ns=4_000_000
            )
            api_chat = sse_chat(("Hello", " there", "!"))
            generate = delayed(GENERATE_SECONDS, json_reply(OLLAMA_GENERATE))
            for routes in (
                ollama_routes(**{"/api/chat": chat, "/api/generate": generate}),
                vllm_routes(metrics="vllm_metrics_after.txt"),
                openai_routes(**{"/v1/chat/completions": api_chat}),
            ):
                standins.append(await StandIn(routes).start())
            ollama, vllm, api = standins
            # One provider of every other kind, that the dashboards and rules serve them too.
            more = {
                kind: await StandIn(routes()).start()
                for kind, routes in (
                    ("sglang", sglang_routes),
                    ("tgi", tgi_routes),
                    ("trtllm", trtllm_routes),
                    ("lmstudio", lmstudio_routes),
                )
            }
            standins.extend(more.values())
            lifecycle = OllamaLifecycle(
                (PINNED, *SWITCHED), max_loaded=2, load_seconds=0.05, generate_seconds=0.01
            )
            standins.append(await lifecycle.serve())
            models = standins[-1]
            probes = "{interval: 1s, jitter: 0, timeout: 1s, max_tokens: 8}"
            # llama.cpp's gateway: a queue at its two slots, and the cache. Ollama's: one slot
            # and no room to wait, so a request that comes while another holds the slot is
            # turned away, with 503 (a 5xx, which its error ratio must leave out).
            local_gateway = (
                "{listen: '127.0.0.1:0', client_header: X-Client,"
                " queue: {max_concurrent: 2}, cache: {enabled: true}}"
            )
            ollama_gateway = (
                "{listen: '127.0.0.1:0', client_header: X-Client,"
                " queue: {max_concurrent: 1, max_waiting: 0, overflow_status: 503}}"
            )
            config = config_of(
                provider_yaml("local", "llamacpp", llama.url, probes=probes, process=f"{{port: {llama.port}}}", gateway=local_gateway),
                provider_yaml("ollama", "ollama", ollama.url, probes=probes, gateway=ollama_gateway),
                provider_yaml("vllm", "vllm", vllm.url),
                provider_yaml("api", "openai", f"{api.url}/v1", probes="{interval: 1s, jitter: 0, timeout: 1s, models: [gpt-4o-mini]}"),
                provider_yaml("gone", "ollama", f"http://127.0.0.1:{closed_port()}", timeout="1s"),
                provider_yaml("models", "ollama", models.url, gateway="{listen: '127.0.0.1:0'}",
                              lifecycle=f"{{watch_interval: 50ms, pin: [{PINNED}]}}"),
                *(provider_yaml(kind, kind, server.url) for kind, server in more.items()),
            )  # fmt: skip
            exporter = Exporter(config, nvml=StandInNvml(llama.pid or 0))
            runner, port = await serve(create_app(exporter))
            runners.append(runner)

            async def receive(request: web.Request) -> web.Response:
                alerts.extend((await request.json())["alerts"])
                return web.Response(text="ok")

            hook = web.Application()
            hook.router.add_post("/", receive)
            hook_runner, hook_port = await serve(hook)
            runners.append(hook_runner)
            assert exporter is not None
            return port, hook_port, exporter.gateway.addresses

        exporter_port, hook_port, gateways = loop.run(bring_up())
        am_port, prom_port = free_port(), free_port()
        rules = work / "rules"
        rules.mkdir()
        shutil.copy(PROMETHEUS_DIR / "rules" / "llm-recording.yml", rules)
        test_copy_of_alerts(PROMETHEUS_DIR / "rules" / "llm-alerts.yml", rules / "llm-alerts.yml")
        alertmanager_copy(
            PROMETHEUS_DIR / "alertmanager.yml",
            work / "alertmanager.yml",
            f"http://127.0.0.1:{hook_port}/",
        )
        (work / "prometheus.yml").write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(rules / "*.yml")],
                    "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
                    "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]}],
                }
            )
        )  # fmt: skip
        processes.append(
            start(
                ["prometheus-alertmanager", f"--config.file={work / 'alertmanager.yml'}",
                 f"--storage.path={work / 'am-data'}", f"--web.listen-address=127.0.0.1:{am_port}",
                 "--cluster.listen-address="],
                work / "alertmanager.log",
            )
        )  # fmt: skip
        processes.append(
            start(
                ["prometheus", f"--config.file={work / 'prometheus.yml'}",
                 f"--storage.tsdb.path={work / 'prom-data'}", f"--web.listen-address=127.0.0.1:{prom_port}",
                 "--rules.alert.resend-delay=0s"],
                work / "prometheus.log",
            )
        )  # fmt: skip
        result = Stack(
            f"http://127.0.0.1:{prom_port}",
            f"http://127.0.0.1:{am_port}",
            f"http://127.0.0.1:{exporter_port}",
            llama,
            alerts,
        )
        # Prometheus answers 503 until its storage is open (slower on a fresh machine).
        wait_for(
            lambda: httpx.get(f"{result.prometheus}/-/ready", timeout=2).status_code == 200,
            "Prometheus ready",
            60,
        )
        # Traffic, so the token rates move; then enough scrapes for every rate window.
        for _ in range(3):
            httpx.post(
                f"{llama.url}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
                timeout=30,
            ).raise_for_status()
        wait_for(lambda: len(result.query("llm_provider_up")) == PROVIDERS, "the first scrape", 40)
        # Real requests through the gateways: llama.cpp streamed (with usage, from a named
        # client) and not, Ollama's streamed /api/chat. Ollama counts nothing itself, so its
        # tokens and time to first token come from its gateway only. A gateway series is born
        # with its first request, which a rate therefore never sees: a first round, scraped,
        # then the round the rate windows hold. llama.cpp's cache: the streams and the
        # sampling chat bypass it, a deterministic chat (temperature 0) asked twice a round is
        # a miss and then hits. Ollama's queue: a slow /api/generate holds its one slot and
        # the next is turned away.
        hi = [{"role": "user", "content": "Hi"}]
        chat = {"model": llama.alias, "messages": hi, "max_tokens": 8}
        streamed = {**chat, "stream": True, "stream_options": {"include_usage": True}}
        deterministic = {**chat, "temperature": 0}
        generate = {"model": OLLAMA_MODEL, "prompt": "Why is the sky blue?", "stream": False}

        def turned_away() -> None:
            assert exporter is not None
            queue = exporter.gateway.stats.providers["ollama"].queue
            assert queue is not None
            url = f"http://{gateways['ollama']}/api/generate"
            with ThreadPoolExecutor(1) as pool:
                holding = pool.submit(httpx.post, url, json=generate, timeout=30)
                wait_for(lambda: queue.running == 1, "a request holding Ollama's slot", 10, 0.02)
                answer = httpx.post(url, json=generate, timeout=30)
                assert answer.status_code == 503, answer.text
                assert answer.headers["Retry-After"].isdigit()
                holding.result(30).raise_for_status()

        def through_the_gateways() -> None:
            for body, headers in (
                (streamed, {"X-Client": "bundle"}),
                (streamed, {}),
                (chat, {}),
                (deterministic, {}),
                (deterministic, {}),
            ):
                httpx.post(
                    f"http://{gateways['local']}/v1/chat/completions",
                    json=body,
                    headers=headers,
                    timeout=30,
                ).raise_for_status()
            httpx.post(
                f"http://{gateways['ollama']}/api/chat",
                json={"model": OLLAMA_MODEL, "messages": hi},
                timeout=30,
            ).raise_for_status()
            turned_away()

        def switch_to(model: str) -> None:
            """A client's request for one of the switched models, through the gateway of the
            lifecycle stand-in; then two reads of its watcher after it, which see what the
            request loaded and evicted."""
            assert exporter is not None
            httpx.post(
                f"http://{gateways['models']}/api/chat",
                json={"model": model, "messages": hi, "keep_alive": -1},
                timeout=30,
            ).raise_for_status()
            reads = exporter.lifecycle_stats.reads
            done = reads.get(("models", "success"), 0)
            wait_for(lambda: reads.get(("models", "success"), 0) >= done + 2, "two reads", 10, 0.02)

        through_the_gateways()
        wait_for(
            lambda: len(result.query("llm_gateway_time_to_first_token_seconds_count")) == 2,
            "the gateways' first requests scraped",
            30,
        )
        # The lifecycle stand-in: the pinned model was loaded by the policy at the start; a
        # first request for each switched model (the second evicts the first), scraped before
        # the switching, so that the rate windows and LLMModelThrashing's hour see it all.
        for model in SWITCHED:
            switch_to(model)
        wait_for(
            lambda: len(result.query('llm_model_loads_total{provider="models"}')) == 3,
            "the lifecycle stand-in's models scraped",
            30,
        )
        through_the_gateways()
        for switch in range(SWITCHES):
            switch_to(SWITCHED[switch % 2])
        wait_for(
            lambda: result.query(f"count_over_time(llm_provider_up{{provider='local'}}[{WINDOW}])")
            and float(result.query(f"count_over_time(llm_provider_up{{provider='local'}}[{WINDOW}])")[0]["value"][1]) >= 12,
            "12 scrapes",
            40,
        )  # fmt: skip
        yield result
    finally:
        for process in processes:
            stop_process(process)
        llama.stop()

        async def bring_down() -> None:
            for runner in runners:
                await runner.cleanup()
            if exporter is not None:
                await exporter.aclose()
            for standin in standins:
                await standin.close()

        loop.run(bring_down())
        loop.close()


# The window substituted for $__rate_interval: four scrapes and more at 1 s.
WINDOW = "15s"


def substitute(expr: str, **values: str) -> str:
    """A panel query as Grafana would send it, with this stack's variable values: All for
    the exporter's variables (`.*`, which matches the cluster label this stack's series do
    not have), every provider and model; or the values given."""
    defaults = {"cluster": ".*", "job": ".*", "instance": ".*", "provider": ".+", "model": ".+"}
    for name, value in (
        ("__rate_interval", WINDOW),
        ("__interval", "2s"),
        ("__range", "30s"),
        *(defaults | values).items(),
    ):
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    return expr


def regex_of(value: str) -> str:
    """One variable value as Grafana writes it into a PromQL regex: escaped, in a string."""
    return re.escape(value).replace("\\", "\\\\")


def documented_metrics() -> set[str]:
    """Metric names in docs/metrics.md."""
    return set(re.findall(r"^\| `([a-z_]+)` \|", (ROOT / "docs" / "metrics.md").read_text(), re.M))


def named_metrics(expr: str) -> set[str]:
    """The llm_ metric names an expression uses, histogram suffixes removed."""
    names = set()
    # A recorded series (provider:llm_tokens:rate5m) is not a metric the exporter serves.
    for name in re.findall(r"(?<![:\w])llm_[a-z_]+(?![:\w])", expr):
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name.removesuffix(suffix) in documented_metrics():
                name = name.removesuffix(suffix)
        names.add(name)
    return names


def rule_expressions() -> list[tuple[str, str]]:
    """(rule name, expression) of every recording and alerting rule of the bundle."""
    found = []
    for file in sorted((PROMETHEUS_DIR / "rules").glob("*.yml")):
        for group in yaml.safe_load(file.read_text())["groups"]:
            for rule in group["rules"]:
                found.append((rule.get("alert") or rule["record"], rule["expr"]))
    return found


def test_promtool_and_amtool_accept_the_bundle() -> None:
    checks = [
        ["promtool", "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")],
        ["promtool", "check", "rules", *map(str, sorted((PROMETHEUS_DIR / "rules").glob("*.yml")))],
        ["promtool", "test", "rules", *map(str, sorted((PROMETHEUS_DIR / "tests").glob("*.yml")))],
        ["amtool", "check-config", str(PROMETHEUS_DIR / "alertmanager.yml")],
    ]
    for command in checks:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}{result.stderr}"


def test_every_alert_has_for_severity_annotations_and_a_runbook_section() -> None:
    headings = set(re.findall(r"^## (\w+)$", (ROOT / "docs" / "runbooks.md").read_text(), re.M))
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules" / "llm-alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]
    assert alerts
    for rule in alerts:
        name = rule["alert"]
        assert rule.get("for"), name
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        annotations = rule["annotations"]
        assert "{{" not in annotations["summary"] and "{{" in annotations["description"], name
        assert name in headings, f"docs/runbooks.md has no section for {name}"
        assert annotations["runbook_url"].endswith(f"/docs/runbooks.md#{name.lower()}"), name


def test_rules_and_dashboards_name_only_documented_metrics() -> None:
    known = documented_metrics()
    recorded = {name for name, _ in rule_expressions()}
    for name, expr in rule_expressions():
        unknown = named_metrics(expr) - known - recorded
        assert not unknown, f"{name} names {unknown}"
    for dashboard in DASHBOARDS:
        for expr in re.findall(r'"expr": "((?:[^"\\]|\\.)*)"', dashboard.read_text()):
            unknown = named_metrics(json.loads(f'"{expr}"')) - known
            assert not unknown, f"{dashboard.name} names {unknown}"


# -- Two exporters that watch providers of the same name -------------------------------------

# The catalogue's rows: name, type, labels.
CATALOGUE_ROW = re.compile(
    r"^\| `(llm_[a-z_]+)` \| (counter|gauge|histogram) \| ([^|]*) \|", re.MULTILINE
)
# The synthetic exporters' label values: several where panels and rules pick some of them.
LABEL_VALUES = {
    "provider": ("ollama",),
    "model": ("m",),
    "kind": ("ollama",),
    "type": ("input", "output"),
    "outcome": ("success", "timeout", "complete", "dispatched", "failure"),
    "code": ("2xx", "5xx"),
    "operation": ("chat",),
    "source": ("usage", "stream_chunks"),
    "result": ("hit", "miss", "bypass"),
    "component": ("overall", "provider"),
    "state": ("degraded", "unhealthy"),
    "memory": ("total", "vram"),
    "cause": ("evicted",),
    "reason": ("queue_full",),
    "action": ("load",),
    "client": ("x",),
    "priority": ("0",),
    "endpoint": ("/api/ps",),
    "gpu": ("0",),
    "mountpoint": ("/",),
}


def exposition(scrapes: int) -> str:
    """Every catalogued llm_ metric, as one exporter watching a provider called `ollama`
    would serve it at its `scrapes`-th scrape: gauges 1, counters and histograms growing."""
    lines = []
    catalogue = (ROOT / "docs" / "metrics.md").read_text()
    for name, kind, labels_column in CATALOGUE_ROW.findall(catalogue):
        names = re.findall(r"`(\w+)`", labels_column)
        combinations: list[dict[str, str]] = [{}]
        for label in names:
            values = LABEL_VALUES.get(label, ("x",))
            combinations = [{**c, label: value} for c in combinations for value in values]
        lines.append(f"# TYPE {name} {kind}")
        for labels in combinations:
            rendered = ",".join(f'{k}="{v}"' for k, v in labels.items())
            if kind == "gauge":
                lines.append(f"{name}{{{rendered}}} 1")
            elif kind == "counter":
                lines.append(f"{name}{{{rendered}}} {10 * scrapes}")
            else:
                for le, share in (("0.5", 1), ("2", 2), ("+Inf", 2)):
                    joined = f"{rendered}," if rendered else ""
                    lines.append(f'{name}_bucket{{{joined}le="{le}"}} {share * scrapes}')
                lines.append(f"{name}_sum{{{rendered}}} {scrapes}")
                lines.append(f"{name}_count{{{rendered}}} {2 * scrapes}")
    return "\n".join(lines) + "\n"


@contextmanager
def synthetic_exporter() -> Iterator[str]:
    """An HTTP server that serves exposition() on /metrics; yields its host:port."""
    scrapes = 0

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            nonlocal scrapes
            scrapes += 1
            body = exposition(scrapes).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


PANEL_TYPES = {
    (file.stem, panel["title"]): panel["type"]
    for file in DASHBOARDS
    for item in json.loads(file.read_text())["panels"]
    for panel in (item, *item.get("panels", []))
}


def apart(result: list[dict[str, Any]], instances: set[str]) -> list[str]:
    """What is wrong with a query's result where each exporter should have its own series:
    series that carry a provider but no instance, and label sets (cluster, job and instance
    aside) that not every exporter has exactly once."""
    wrong = []
    groups: dict[tuple[tuple[str, str], ...], list[str]] = {}
    for series in result:
        labels = series["metric"]
        if "instance" not in labels:
            if "provider" in labels:
                wrong.append(f"no instance: {labels}")
            continue
        key = tuple(
            sorted((k, v) for k, v in labels.items() if k not in ("cluster", "job", "instance"))
        )
        groups.setdefault(key, []).append(labels["instance"])
    for key, found in groups.items():
        if sorted(found) != sorted(instances):
            wrong.append(f"{dict(key)}: {found}")
    return wrong


def test_two_exporters_that_share_provider_names_stay_apart(tmp_path: Path) -> None:
    """Two exporters that each watch a provider called `ollama`, one of them labelled
    cluster="eu-1" by its scrape config, the other with no cluster label, in a real
    Prometheus running the recording rules: every dashboard query and every recorded series
    shows each exporter's series apart (the stat panels' and heatmaps' totals aside); All
    in the cluster variable takes both, `eu-1` the labelled one only."""
    with synthetic_exporter() as first, synthetic_exporter() as second:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(PROMETHEUS_DIR / "rules" / "llm-recording.yml")],
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "static_configs": [
                        {"targets": [first], "labels": {"cluster": "eu-1"}},
                        {"targets": [second]},
                    ],
                }
            ],
        }
        with prometheus(config, tmp_path) as base:

            def ask(expr: str) -> list[dict[str, Any]]:
                answer = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
                body = answer.json()
                assert body["status"] == "success", (expr, body)
                result: list[dict[str, Any]] = body["data"]["result"]
                return result

            def scraped() -> bool:
                try:
                    counts = ask(f"count_over_time(llm_provider_up[{WINDOW}]) >= 6")
                except httpx.TransportError:
                    return False
                return len(counts) == 2

            wait_for(scraped, "six scrapes of both exporters", 60)
            instances = {first, second}
            for dashboard, panel, expr in dashboard_queries():
                result = ask(substitute(expr))
                assert result, f"{dashboard} / {panel}: {expr}"
                wrong = apart(result, instances)
                assert not wrong, f"{dashboard} / {panel}: {expr}: {wrong}"
                if not any("instance" in series["metric"] for series in result):
                    # A total over everything selected: the status bar, a heatmap.
                    assert PANEL_TYPES[dashboard, panel] in ("stat", "heatmap"), (panel, expr)
                # The cluster variable: eu-1 takes the labelled exporter only.
                chosen = ask(substitute(expr, cluster="eu-1"))
                assert chosen, f"{dashboard} / {panel}: {expr}"
                assert {s["metric"].get("instance", first) for s in chosen} == {first}, panel
            recorded = {name for name, expr in rule_expressions() if ":" in name}
            for name in sorted(recorded):
                result = ask(name)
                wrong = apart(result, instances)
                assert not wrong, f"{name}: {wrong}"
                clusters = {s["metric"]["instance"]: s["metric"].get("cluster") for s in result}
                assert clusters in ({}, {first: "eu-1", second: None}), (name, clusters)


def test_every_rule_is_loaded_and_evaluates_ok(stack: Stack) -> None:
    def evaluated() -> list[dict[str, Any]] | None:
        groups = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return (
            rules
            if all(rule.get("lastEvaluation", "").startswith("20") for rule in rules)
            else None
        )

    rules = wait_for(evaluated, "every rule evaluated", 30)
    assert {rule["name"] for rule in rules} == {name for name, _ in rule_expressions()}
    bad = [(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"]
    assert bad == []


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel, expression) for every target of every panel, rows included."""
    found = []
    for file in DASHBOARDS:
        dashboard = json.loads(file.read_text())
        panels = list(dashboard.get("panels", []))
        while panels:
            panel = panels.pop(0)
            panels.extend(panel.get("panels", []))
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((file.stem, panel.get("title", ""), target["expr"]))
    return found


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    assert len(DASHBOARDS) >= 4
    empty = []
    for dashboard, panel, expr in dashboard_queries():
        if not stack.query(substitute(expr)):
            empty.append(f"{dashboard} / {panel}: {expr}")
    assert empty == []


def test_every_dashboard_query_returns_data_for_the_one_exporter(stack: Stack) -> None:
    """The same, with the exporter chosen in the job and instance variables."""
    instance = stack.exporter.removeprefix("http://")
    empty = []
    for dashboard, panel, expr in dashboard_queries():
        filled = substitute(expr, job=JOB, instance=regex_of(instance))
        assert f'instance=~"{regex_of(instance)}"' in filled, expr
        result = stack.query(filled)
        if not result:
            empty.append(f"{dashboard} / {panel}: {expr}")
        for series in result:
            assert series["metric"].get("instance", instance) == instance, (panel, series)
    assert empty == []


def test_every_variable_has_values(stack: Stack) -> None:
    for file in DASHBOARDS:
        for variable in json.loads(file.read_text()).get("templating", {}).get("list", []):
            if variable.get("type") != "query":
                continue
            query = variable.get("query")
            query = query.get("query", "") if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query.strip())
            assert match, f"{file.name}: {variable['name']}: {query}"
            selector, label = substitute(match.group(1)), match.group(2)
            series = httpx.get(
                f"{stack.prometheus}/api/v1/series", params={"match[]": selector}, timeout=10
            ).json()["data"]
            values = {s[label] for s in series if label in s}
            if variable["name"] == "cluster":
                # No cluster label here: the variable lists nothing, and its All (`.*`)
                # matches every series (test_every_dashboard_query_returns_data).
                assert values == set(), f"{file.name}: {values}"
                continue
            assert values, f"{file.name}: {variable['name']}"


def test_a_provider_down_fires_only_provider_down(stack: Stack) -> None:
    """`gone` never answers: the rules themselves (no Alertmanager) raise LLMProviderDown and
    nothing else about it, not even pending; the connection verdict, degraded by it, neither."""
    down = 'ALERTS{alertname="LLMProviderDown", alertstate="firing", provider="gone"}'
    wait_for(lambda: stack.query(down), "LLMProviderDown firing for gone", 30)
    others = 'ALERTS{provider="gone", alertname!="LLMProviderDown"}'
    assert stack.query(f"count_over_time({others}[10m])") == []
    connection = 'ALERTS{alertname=~"LLMHealth.*", component="connection"}'
    assert stack.query(f"count_over_time({connection}[10m])") == []
    health = 'llm_health_status{component="connection", state="degraded"} == 1'
    assert stack.query(health), "the connection verdict is degraded meanwhile"


def test_output_tokens_take_the_counters_else_the_gateway_else_the_probes(stack: Stack) -> None:
    """The Overview's tokens/s: the provider's counters where it has them, else its
    gateway's, else its probes' speed."""
    (expr,) = [e for d, p, e in dashboard_queries() if p == "Output tokens/s"]
    assert expr.startswith("sum(") and expr.endswith(")")
    per_provider = stack.query(substitute(expr[len("sum(") : -1]))
    providers = {series["metric"].get("provider") for series in per_provider}

    def having(selector: str) -> set[str]:
        found = stack.query(substitute(f"count by (provider) ({selector})"))
        return {series["metric"]["provider"] for series in found}

    counted = having('llm_tokens_total{type="output"}')
    gatewayed = having('llm_gateway_tokens_total{type="output"}') - counted
    probed = having("llm_probe_tokens_per_second") - counted - gatewayed
    assert "local" in counted, "llama.cpp counts its tokens; its gateway's are not needed"
    assert "ollama" in gatewayed, "Ollama counts no tokens; its gateway does"
    assert "api" in probed, "the OpenAI-compatible API has neither: its probes measure the speed"
    assert providers == counted | gatewayed | probed


def test_the_best_source_rules_pick_one_source_per_provider(stack: Stack) -> None:
    """The llm-best-source rules in a real Prometheus: the provider's own numbers, else the
    gateway's (Ollama, and llama.cpp's time to first token), else the probes'."""

    def sources(record: str) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for series in stack.query(record):
            labels = series["metric"]
            found.setdefault(labels["provider"], set()).add(labels["source"])
        return found

    def recorded() -> tuple[dict[str, set[str]], dict[str, set[str]]] | None:
        tokens = sources("provider_model:llm_serving_output_tokens:rate5m")
        first = sources("provider_model:llm_serving_time_to_first_token_seconds:p95_rate5m")
        return (tokens, first) if {"local", "ollama", "api"} <= set(first) else None

    tokens, first_token = wait_for(recorded, "the best-source series", 30)
    assert tokens["local"] == tokens["vllm"] == {"provider"}
    assert tokens["ollama"] == {"gateway"}
    assert tokens["api"] == {"probe"}
    # llama.cpp measures no time to first token; the recorded vLLM's histograms do not move.
    assert first_token["local"] == first_token["ollama"] == {"gateway"}
    assert first_token["api"] == {"probe"}
    assert "vllm" not in first_token


def test_the_traffic_went_through_the_queues_and_the_cache(stack: Stack) -> None:
    """What the dashboards' Queue and Cache rows show comes from real requests: llama.cpp's
    cache missed the deterministic chat once and answered its three repeats, Ollama's
    queue turned a request away in each round."""

    def by(label: str, selector: str) -> dict[str, float]:
        found = stack.query(f"sum by ({label}) ({selector})")
        return {series["metric"][label]: float(series["value"][1]) for series in found}

    lookups = by("result", 'llm_gateway_cache_lookups_total{provider="local"}')
    assert (lookups["hit"], lookups["miss"]) == (3, 1)
    bypasses = by("reason", 'llm_gateway_cache_bypasses_total{provider="local"}')
    assert (bypasses["stream"], bypasses["sampling"]) == (4, 2)
    rejections = by("reason", 'llm_gateway_queue_rejections_total{provider="ollama"}')
    assert rejections == {"queue_full": 2, "wait_timeout": 0}
    answered = by("outcome", 'llm_gateway_requests_total{provider=~"local|ollama"}')
    assert (answered["cached"], answered["rejected"]) == (3, 2)


def test_a_full_queue_fires_only_its_own_alert(stack: Stack) -> None:
    """Ollama's gateway queue turned requests away with 503: the rules themselves (no
    Alertmanager) raise LLMGatewayRequestsRejected, while LLMGatewayErrorRatioHigh leaves the
    503s out and LLMHealthDegraded leaves /health's verdict on the queue to the queue alert."""
    rejected = (
        'ALERTS{alertname="LLMGatewayRequestsRejected", alertstate="firing", provider="ollama"}'
    )
    wait_for(lambda: stack.query(rejected), "LLMGatewayRequestsRejected firing for ollama", 30)
    others = 'ALERTS{provider="ollama", alertname=~"LLMGatewayErrorRatioHigh|LLMHealthDegraded"}'
    assert stack.query(f"count_over_time({others}[10m])") == []
    # Both would have fired: /health called Ollama degraded, and the 503s are in the window.
    degraded = 'llm_health_status{provider="ollama", component="provider", state="degraded"}'
    assert stack.query(f"max_over_time({degraded}[10m]) == 1")
    turned_away = 'llm_gateway_requests_total{provider="ollama", outcome="rejected", code="5xx"}'
    assert stack.query(f"increase({turned_away}[10m]) > 0")


def test_models_that_evict_each_other_fire_thrashing_and_a_pinned_one_stays(stack: Stack) -> None:
    """The lifecycle stand-in's clients switched between two models it cannot hold together
    beside the pinned one: each evicted the other more than 3 times, and the rules raise
    LLMModelThrashing for both. The pinned model stayed loaded all along (the policy loaded
    it once): LLMPinnedModelNotLoaded was not even pending."""
    thrashing = 'ALERTS{alertname="LLMModelThrashing", alertstate="firing", provider="models"}'

    def both() -> list[dict[str, Any]] | None:
        found = stack.query(thrashing)
        return found if len(found) == len(SWITCHED) else None

    firing = wait_for(both, "LLMModelThrashing firing for both switched models", 30)
    assert {series["metric"]["model"] for series in firing} == set(SWITCHED)
    evicted = 'llm_model_unloads_total{provider="models", cause="evicted"}'
    counts = {s["metric"]["model"]: float(s["value"][1]) for s in stack.query(evicted)}
    assert counts[PINNED] == 0 and min(counts[m] for m in SWITCHED) > 3, counts
    pinned = 'ALERTS{alertname="LLMPinnedModelNotLoaded"}'
    assert stack.query(f"count_over_time({pinned}[10m])") == []
    assert stack.query(f'llm_model_loaded{{provider="models", model="{PINNED}"}} == 1')
    loads = 'llm_lifecycle_actions_total{provider="models", action="load", reason="pin"}'
    assert {s["metric"]["outcome"]: s["value"][1] for s in stack.query(loads)} == {"success": "1"}


# Pairs of alerts posted to the bundle's Alertmanager, each pair about a provider of its
# own: whether the first mutes the second ("NAME/SOURCE" carries source="SOURCE", as
# LLMTimeToFirstTokenHigh does; the model lifecycle's alerts carry model="m", or the model
# after a "#"; "NAME@CLUSTER" carries cluster="CLUSTER"). The pairs share job and instance,
# so a pair not muted also shows that an alert about another provider mutes nothing.
INHIBITIONS = (
    # A full gateway queue, one cause: clients turned away say the most.
    ("LLMGatewayRequestsRejected", "LLMGatewayQueueSaturated", True),
    ("LLMGatewayRequestsRejected", "LLMGatewayQueueWaitHigh", True),
    ("LLMGatewayRequestsRejected", "LLMTimeToFirstTokenHigh/gateway", True),
    ("LLMGatewayRequestsRejected", "LLMHealthDegraded", True),
    ("LLMGatewayRequestsRejected", "LLMTimeToFirstTokenHigh/probe", False),
    ("LLMGatewayRequestsRejected", "LLMGatewayErrorRatioHigh", False),
    ("LLMGatewayRequestsRejected", "LLMQueueBuildingUp", False),
    ("LLMGatewayQueueSaturated", "LLMGatewayQueueWaitHigh", True),
    ("LLMGatewayQueueSaturated", "LLMTimeToFirstTokenHigh/gateway", True),
    ("LLMGatewayQueueSaturated", "LLMHealthDegraded", True),
    ("LLMGatewayQueueSaturated", "LLMGatewayRequestsRejected", False),
    ("LLMGatewayQueueSaturated", "LLMTimeToFirstTokenHigh/provider", False),
    ("LLMGatewayQueueWaitHigh", "LLMTimeToFirstTokenHigh/gateway", True),
    ("LLMGatewayQueueWaitHigh", "LLMGatewayQueueSaturated", False),
    ("LLMGatewayQueueWaitHigh", "LLMHealthDegraded", False),
    # A stalled provider holds the queue's slots.
    ("LLMServingStalled", "LLMGatewayQueueSaturated", True),
    ("LLMServingStalled", "LLMGatewayRequestsRejected", True),
    ("LLMServingStalled", "LLMGatewayQueueWaitHigh", True),
    # A provider that does not answer explains them all.
    ("LLMProviderDown", "LLMGatewayRequestsRejected", True),
    ("LLMProviderDown", "LLMPinnedModelNotLoaded", True),
    # A pinned model not loaded: its failed loads explain it, for that model only; a partial
    # collection may not have read what is loaded.
    ("LLMModelLoadFailed", "LLMPinnedModelNotLoaded", True),
    ("LLMModelLoadFailed", "LLMPinnedModelNotLoaded#other", False),
    ("LLMPinnedModelNotLoaded", "LLMModelLoadFailed", False),
    ("LLMProviderScrapeFailing", "LLMPinnedModelNotLoaded", True),
    # Exporters with the same job and instance in two clusters: one's provider being down
    # explains nothing of the other's; in the same cluster it does.
    ("LLMProviderDown@eu-1", "LLMGatewayRequestsRejected@us-1", False),
    ("LLMProviderDown@eu-1", "LLMGatewayRequestsRejected@eu-1", True),
    ("LLMModelThrashing", "LLMPinnedModelNotLoaded", False),
    ("LLMModelThrashing", "LLMModelLoadSlow", False),
)
LIFECYCLE_ALERTS = (
    "LLMModelThrashing",
    "LLMModelLoadFailed",
    "LLMPinnedModelNotLoaded",
    "LLMModelLoadSlow",
)
INHIBITED_INSTANCE = "inhibitions:9741"


def posted_alert(provider: str, name: str) -> dict[str, Any]:
    """An alert as Prometheus would send it for this provider (the rule's labels included)."""
    name, _, cluster = name.partition("@")
    name, _, model = name.partition("#")
    alertname, _, source = name.partition("/")
    labels = {
        "alertname": alertname,
        "severity": "warning",
        "job": JOB,
        "instance": INHIBITED_INSTANCE,
        "provider": provider,
    }
    if source:
        labels |= {"source": source, "model": "m"}
    if alertname in LIFECYCLE_ALERTS:
        labels["model"] = model or "m"
    if alertname == "LLMHealthDegraded":
        labels |= {"component": "provider", "state": "degraded"}
    if cluster:
        labels["cluster"] = cluster
    now = time.time()
    stamp = "%Y-%m-%dT%H:%M:%SZ"
    return {
        "labels": labels,
        "annotations": {"summary": "posted by the bundle test"},
        "startsAt": time.strftime(stamp, time.gmtime(now - 60)),
        "endsAt": time.strftime(stamp, time.gmtime(now + 600)),
    }


def test_alertmanager_ranks_the_queue_alerts(stack: Stack) -> None:
    """The inhibitions of prometheus/alertmanager.yml in a real Alertmanager: a full gateway
    queue is one cause, ranked; a stalled or stopped provider explains its queue; a pinned
    model's failed loads explain why it is not loaded; nothing mutes across clusters."""
    cases = {f"case{index}": case for index, case in enumerate(INHIBITIONS)}
    alerts = [
        posted_alert(provider, name)
        for provider, (source, target, _) in cases.items()
        for name in (source, target)
    ]
    httpx.post(f"{stack.alertmanager}/api/v2/alerts", json=alerts, timeout=10).raise_for_status()
    expected = {(provider, target): mute for provider, (_, target, mute) in cases.items()}

    def muted() -> dict[tuple[str, str], bool]:
        found = httpx.get(
            f"{stack.alertmanager}/api/v2/alerts",
            params={"filter": f'instance="{INHIBITED_INSTANCE}"'},
            timeout=10,
        ).json()
        states = {}
        for alert in found:
            labels = alert["labels"]
            name = labels["alertname"] + (f"/{labels['source']}" if "source" in labels else "")
            name += f"#{labels['model']}" if labels.get("model", "m") != "m" else ""
            name += f"@{labels['cluster']}" if "cluster" in labels else ""
            states[labels["provider"], name] = bool(alert["status"]["inhibitedBy"])
        return states

    def settled() -> dict[tuple[str, str], bool] | None:
        states = muted()
        return states if all(states.get(key) for key, mute in expected.items() if mute) else None

    # The inhibitor learns of new alerts a moment after they arrive.
    states = wait_for(settled, "the alerts to be muted, muted", 10)
    assert {key: states.get(key) for key in expected} == expected


def test_provider_down_alert_reaches_the_webhook(stack: Stack) -> None:
    """Last: it stops llama.cpp. The alert goes through the real Alertmanager."""
    stack.llama.stop()

    def provider_down() -> dict[str, Any] | None:
        for alert in list(stack.alerts):
            labels = alert["labels"]
            if labels.get("alertname") == "LLMProviderDown" and labels.get("provider") == "local":
                return alert
        return None

    alert = wait_for(provider_down, "LLMProviderDown for local at the webhook", 60)
    assert alert["status"] == "firing"
    assert alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["summary"]
    assert alert["annotations"]["runbook_url"].endswith("#llmproviderdown")
    assert "local" in alert["annotations"]["description"]
