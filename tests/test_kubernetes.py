"""The Kubernetes manifests: every layout renders, every object is valid, and the parts fit.

No cluster runs here, so `kubectl kustomize` renders deploy/kubernetes/base and each overlay,
and the objects are checked as files: each against its Kubernetes schema (kubernetes-validate's
strict JSON schemas) or prometheus-operator's CRD schema (tests/fixtures/kubernetes/), the
exporter's container for its security settings and probes, its configuration with the
exporter's own parser and a real exporter answering the probes' paths, the Service and
ServiceMonitor against the pods they must find, and the PrometheusRules and dashboard
ConfigMaps against prometheus/rules/ and grafana/dashboards/.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from exporter.cli import build_parser
from exporter.config import DEFAULT_LISTEN_ADDRESS, parse_config, parse_listen_address
from llamacpp_server import free_port
from tests.helpers import stop_process

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
GENERATOR = KUBERNETES / "generate.py"
FIXTURES = Path(__file__).parent / "fixtures" / "kubernetes"
KUBERNETES_SCHEMAS = FIXTURES / "kubernetes-v1.32.0-strict"
CRD_SCHEMAS = FIXTURES / "prometheus-operator-v0.93.0"
DOCS = ROOT / "docs" / "kubernetes.md"

# Every kustomization a user applies, and how its exporter runs.
LAYOUTS = {
    "base": KUBERNETES / "base",
    "per-cluster": KUBERNETES / "overlays" / "per-cluster",
    "vllm-sidecar": KUBERNETES / "overlays" / "vllm-sidecar",
}
SIDECAR_LAYOUTS = {"vllm-sidecar"}
MONITORING = KUBERNETES / "monitoring"

EXPORTER = "llm-exporter"
JOB = "llm-exporter"  # the job name the alerts and dashboards expect
PORT_NAME = "http-metrics"
CONFIG_FILE = "/etc/llm-exporter/llm-exporter.yml"
GRAFANA_DASHBOARD_LABEL = ("grafana_dashboard", "1")
# kubectl apply (client-side) keeps the whole object in this annotation, which may not be larger.
LAST_APPLIED_LIMIT = 262_144
PROBES = ("livenessProbe", "readinessProbe")
KUSTOMIZE_TIMEOUT = 60


# -- Rendering -------------------------------------------------------------------------------


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        message = "kubectl is not installed: `make system-deps` installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@cache
def _kustomize(directory: Path) -> str:
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=KUSTOMIZE_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory}:\n{result.stderr}"
    return result.stdout


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` makes of a directory (each a fresh copy)."""
    objects = [doc for doc in yaml.safe_load_all(_kustomize(directory)) if doc is not None]
    assert objects, f"{directory} renders nothing"
    for obj in objects:
        assert isinstance(obj, dict), f"{directory}: a document is not a mapping: {obj!r}"
    return objects


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def objects(layout: str) -> list[dict[str, Any]]:
    return render(LAYOUTS[layout])


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [obj for obj in of_kind(objects, kind) if name in (None, obj["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def describe(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata'].get('name')}"


def test_every_kustomization_is_tested() -> None:
    found = {path.parent for path in KUBERNETES.rglob("kustomization.yaml")}
    found |= {path.parent for path in KUBERNETES.rglob("kustomization.yml")}
    assert found == {*LAYOUTS.values(), MONITORING}


def test_overlays_render_the_monitoring_bundle_once() -> None:
    for name, directory in LAYOUTS.items():
        kinds = [obj["kind"] for obj in render(directory)]
        assert kinds.count("PrometheusRule") == len(list((ROOT / "prometheus/rules").glob("*.yml")))
        assert "ServiceMonitor" in kinds, name


# -- Schemas ---------------------------------------------------------------------------------

_DEFINITIONS = "https://kubernetes.io/api/_definitions.json"
_OBJECT_META = f"{_DEFINITIONS}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


@cache
def _registry() -> Registry:
    definitions = json.loads((KUBERNETES_SCHEMAS / "_definitions.json").read_text())
    assert definitions["$id"] == _DEFINITIONS
    resource: Resource[Any] = Resource.from_contents(definitions)
    registry: Registry = resource @ Registry()
    return registry


def _strict(node: Any) -> Any:
    """A CRD's OpenAPI schema as a JSON schema that, like `kubectl apply --validate=strict`,
    refuses fields it does not declare (Kubernetes would drop them silently)."""
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    result = {key: _strict(value) for key, value in node.items()}
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        result["additionalProperties"] = False
    return result


@cache
def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> a JSON schema, for each version each shipped CRD serves."""
    schemas = {}
    for path in sorted(CRD_SCHEMAS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        assert crd["kind"] == "CustomResourceDefinition", path
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served", True):
                continue
            schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
            # The API server checks metadata as ObjectMeta; the CRD only says "object".
            schema["properties"]["metadata"] = {"$ref": _OBJECT_META}
            schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def schema_for(obj: dict[str, Any]) -> dict[str, Any]:
    api_version, kind = obj["apiVersion"], obj["kind"]
    crd = _crd_schemas().get((api_version, kind))
    if crd is not None:
        return crd
    # As kubernetes-validate names its files: apps/v1 -> apps-v1, rbac.authorization.k8s.io/v1 -> rbac-v1.
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    path = KUBERNETES_SCHEMAS / f"{kind.lower()}-{api}.json"
    assert path.is_file(), (
        f"no schema for {kind} ({api_version}): add it to KINDS in"
        " tests/fixtures/kubernetes/update_schemas.py and run it"
    )
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def validation_errors(obj: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema_for(obj), registry=_registry())
    return [
        f"{describe(obj)}: {'.'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
        for error in validator.iter_errors(obj)
    ]


def test_every_object_follows_its_schema(objects: list[dict[str, Any]]) -> None:
    errors = [error for obj in objects for error in validation_errors(obj)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("Deployment", ["spec", "template", "spec", "containers", 0, "securityContext", "readOnlyRootFileSystem"], True),
        ("Deployment", ["spec", "replicas"], "one"),
        ("Service", ["spec", "ports", 0, "port"], "http"),
        ("ServiceMonitor", ["spec", "endpoints", 0, "scrapeInterval"], "15s"),
        ("ServiceMonitor", ["spec", "endpoints", 0, "interval"], "15 seconds"),
        ("PrometheusRule", ["spec", "groups", 0, "rules", 0, "for"], "five minutes"),
        ("PrometheusRule", ["spec", "groups", 0, "rule"], []),
        ("ConfigMap", ["metadata", "label"], {"a": "b"}),
    ],
)  # fmt: skip
def test_the_schemas_catch_a_broken_object(kind: str, path: list[Any], value: Any) -> None:
    """A misspelt field or a wrong type is an error, in core kinds and CRDs alike."""
    obj = copy.deepcopy(of_kind(render(LAYOUTS["per-cluster"]), kind)[0])
    assert not validation_errors(obj)
    node = obj
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert validation_errors(obj), f"{kind}: {path} = {value!r} passed"


# -- The exporter's container ----------------------------------------------------------------


def exporter_pods(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(Deployment, the exporter's container) for each Deployment that runs the exporter."""
    found = []
    for deployment in of_kind(objects, "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            if container["name"] == EXPORTER:
                found.append((deployment, container))
    return found


def exporter_pod(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    pods = exporter_pods(objects)
    assert len(pods) == 1, f"expected one Deployment running {EXPORTER}, found {len(pods)}"
    return pods[0]


def dockerfile_user() -> tuple[int, int]:
    users = re.findall(r"^USER\s+(\d+):(\d+)\s*$", (ROOT / "Dockerfile").read_text(), re.M)
    assert len(users) == 1, "the Dockerfile's USER is a numeric uid:gid"
    return int(users[0][0]), int(users[0][1])


def effective(pod: dict[str, Any], container: dict[str, Any], key: str) -> Any:
    """A security setting as the kubelet applies it: the container's, else the pod's."""
    value = container.get("securityContext", {}).get(key)
    return value if value is not None else pod.get("securityContext", {}).get(key)


def test_the_exporter_runs_locked_down(objects: list[dict[str, Any]]) -> None:
    deployment, container = exporter_pod(objects)
    pod = deployment["spec"]["template"]["spec"]
    security = container["securityContext"]
    uid, gid = dockerfile_user()
    assert effective(pod, container, "runAsNonRoot") is True
    assert effective(pod, container, "runAsUser") == uid
    assert effective(pod, container, "runAsGroup") == gid
    assert effective(pod, container, "seccompProfile") == {"type": "RuntimeDefault"}
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security.get("privileged", False) is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(field, False), field
    for mount in container["volumeMounts"]:
        assert mount.get("readOnly") is True, f"{mount['name']} is mounted writable"


def test_the_standalone_exporter_has_no_kubernetes_credentials() -> None:
    """Its own account, no token mounted; one replica. (A sidecar's pod and account are vLLM's.)"""
    for name, directory in LAYOUTS.items():
        if name in SIDECAR_LAYOUTS:
            continue
        objects = render(directory)
        deployment, _ = exporter_pod(objects)
        pod = deployment["spec"]["template"]["spec"]
        account = one(objects, "ServiceAccount", pod["serviceAccountName"])
        assert pod["automountServiceAccountToken"] is False, name
        assert account["automountServiceAccountToken"] is False, name
        assert deployment["spec"]["replicas"] == 1, f"{name}: two exporters probe every model twice"


def test_the_exporter_has_resource_requests_and_limits(objects: list[dict[str, Any]]) -> None:
    _, container = exporter_pod(objects)
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}, kind


def test_the_image_is_the_repository_image(objects: list[dict[str, Any]]) -> None:
    """The image built from the Dockerfile, named as docker-compose.yml names it."""
    _, container = exporter_pod(objects)
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    compose_name = compose["services"][EXPORTER]["image"].rsplit(":", 1)[0]
    name, _, tag = container["image"].rpartition(":")
    assert name == compose_name == EXPORTER
    assert tag and tag != "latest"
    assert container["imagePullPolicy"] == "IfNotPresent"


def test_the_arguments_are_the_exporters_flags(objects: list[dict[str, Any]]) -> None:
    _, container = exporter_pod(objects)
    assert "command" not in container, "the image's ENTRYPOINT is the exporter"
    args = build_parser().parse_args(container["args"])
    assert args.config_file == CONFIG_FILE


def test_the_port_is_the_exporters_listen_port(objects: list[dict[str, Any]]) -> None:
    _, container = exporter_pod(objects)
    _, port = parse_listen_address(DEFAULT_LISTEN_ADDRESS)
    assert container["ports"] == [{"name": PORT_NAME, "containerPort": port, "protocol": "TCP"}]


def test_probes_ask_the_exporters_health_endpoints(
    layout: str, objects: list[dict[str, Any]]
) -> None:
    _, container = exporter_pod(objects)
    assert container["livenessProbe"]["httpGet"] == {"path": "/-/healthy", "port": PORT_NAME}
    if layout in SIDECAR_LAYOUTS:
        # The pod's readiness is vLLM's: an exporter not ready must not take vLLM out of its Service.
        assert "readinessProbe" not in container
    else:
        assert container["readinessProbe"]["httpGet"] == {"path": "/-/ready", "port": PORT_NAME}
    for probe in PROBES:
        if probe in container:
            assert container[probe]["timeoutSeconds"] < container[probe]["periodSeconds"] * 2


def test_the_sidecar_is_the_base_container_without_readiness() -> None:
    _, base = exporter_pod(render(LAYOUTS["base"]))
    for name in SIDECAR_LAYOUTS:
        deployment, sidecar = exporter_pod(render(LAYOUTS[name]))
        expected = {key: value for key, value in base.items() if key != "readinessProbe"}
        assert sidecar == expected, f"{name}: change the sidecar with the base's container"
        first = deployment["spec"]["template"]["spec"]["containers"][0]
        assert first["name"] != EXPORTER, "the served model's container stays the default one"


# -- Configuration and API keys --------------------------------------------------------------


def volume_of(
    pod: dict[str, Any], container: dict[str, Any], path: str
) -> tuple[str, dict[str, Any]]:
    """(the mount path, the volume) that holds a file the container reads."""
    mounts = [
        m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert len(mounts) == 1, f"{path}: {len(mounts)} mounts hold it"
    volumes = [v for v in pod["volumes"] if v["name"] == mounts[0]["name"]]
    assert len(volumes) == 1, f"no volume {mounts[0]['name']}"
    return mounts[0]["mountPath"], volumes[0]


def exporter_config(objects: list[dict[str, Any]]) -> str:
    """The text of the configuration file the exporter reads."""
    deployment, container = exporter_pod(objects)
    pod = deployment["spec"]["template"]["spec"]
    mount_path, volume = volume_of(pod, container, CONFIG_FILE)
    config_map = one(objects, "ConfigMap", volume["configMap"]["name"])
    key = CONFIG_FILE[len(mount_path.rstrip("/")) + 1 :]
    text: str = config_map["data"][key]
    return text


def api_key_files(config_text: str) -> dict[str, str]:
    """Provider name -> the api_key_file the configuration names."""
    config = yaml.safe_load(config_text)
    return {
        provider["name"]: provider["api_key_file"]
        for provider in config.get("providers", [])
        if "api_key_file" in provider
    }


def secret_mount(objects: list[dict[str, Any]]) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(where the API keys are mounted, the Secret volume, the keys the layout's Secret holds)."""
    deployment, container = exporter_pod(objects)
    pod = deployment["spec"]["template"]["spec"]
    secrets = [v for v in pod["volumes"] if "secret" in v]
    assert len(secrets) == 1, "one Secret volume holds the API keys"
    mount = next(m for m in container["volumeMounts"] if m["name"] == secrets[0]["name"])
    name = secrets[0]["secret"]["secretName"]
    secret = [obj for obj in of_kind(objects, "Secret") if obj["metadata"]["name"] == name]
    keys = {
        key: base64.b64decode(value).decode()
        for obj in secret
        for key, value in obj.get("data", {}).items()
    }
    return mount["mountPath"], secrets[0], keys


def materialize(objects: list[dict[str, Any]], directory: Path) -> Path:
    """Write the layout's configuration and API keys under directory, as the pod would see
    them, and return the configuration file (its key paths pointing there)."""
    text = exporter_config(objects)
    mount_path, _, keys = secret_mount(objects)
    secrets = directory / "secrets"
    secrets.mkdir()
    for key, value in keys.items():
        (secrets / key).write_text(value)
    config = directory / "llm-exporter.yml"
    config.write_text(text.replace(mount_path.rstrip("/") + "/", f"{secrets}/"))
    return config


def test_the_configuration_passes_the_exporters_parser(
    objects: list[dict[str, Any]], tmp_path: Path
) -> None:
    config_file = materialize(objects, tmp_path)
    config = parse_config(config_file.read_text(), str(config_file))
    _, _, keys = secret_mount(objects)
    files = api_key_files(exporter_config(objects))
    for provider in config.providers:
        if provider.name in files:
            key = Path(files[provider.name]).name
            assert provider.api_key == keys[key].strip(), f"{provider.name} reads its key"


def test_every_api_key_file_is_a_key_of_the_mounted_secret(
    layout: str, objects: list[dict[str, Any]]
) -> None:
    mount_path, volume, keys = secret_mount(objects)
    assert volume["secret"]["secretName"].startswith("llm-exporter-api-keys")
    for provider, path in api_key_files(exporter_config(objects)).items():
        directory, _, key = path.rpartition("/")
        assert directory == mount_path.rstrip("/"), f"{provider}: {path} is not in the Secret"
        assert key in keys, f"{provider}: the layout's Secret has no key {key}"
    if layout == "per-cluster":
        assert keys, "the per-cluster layout shows an API key from a Secret"


def test_the_exporter_can_read_its_key_files(objects: list[dict[str, Any]]) -> None:
    """Mode 0440 needs the pod's fsGroup to be the exporter's group; otherwise 0444."""
    deployment, container = exporter_pod(objects)
    pod = deployment["spec"]["template"]["spec"]
    _, volume, _ = secret_mount(objects)
    mode = volume["secret"]["defaultMode"]
    group_reads = pod.get("securityContext", {}).get("fsGroup") == effective(
        pod, container, "runAsGroup"
    )
    assert mode & 0o004 or (group_reads and mode & 0o040), oct(mode)
    assert not mode & 0o022, f"{oct(mode)}: key files are writable"


def test_providers_are_reached_where_the_layout_says(
    layout: str, objects: list[dict[str, Any]]
) -> None:
    config = parse_config_file(objects)
    hosts = {urlsplit(provider["url"]).hostname for provider in config["providers"]}
    if layout in SIDECAR_LAYOUTS:
        assert hosts == {"localhost"}, "a sidecar reads the server in its own pod"
    elif layout == "per-cluster":
        assert len(hosts) > 1
        assert all(host.endswith(".svc.cluster.local") for host in hosts if host), hosts
        kinds = {provider["kind"] for provider in config["providers"]}
        assert {"vllm", "llamacpp"} <= kinds


def parse_config_file(objects: list[dict[str, Any]]) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(exporter_config(objects))
    return config


@contextmanager
def exporter_process(args: list[str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    command = [sys.executable, "-m", "exporter", *args, f"--web.listen-address=127.0.0.1:{port}"]
    with log.open("w") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, stderr=stderr)
        try:
            yield process
        finally:
            stop_process(process)


def status(url: str) -> int | None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def test_a_real_exporter_answers_the_probes_with_this_configuration(
    objects: list[dict[str, Any]], tmp_path: Path
) -> None:
    """The container's arguments and the layout's configuration start the exporter, and the
    probes' paths answer as the kubelet wants them to (200-399), readiness after the first
    collection (the providers do not exist here: they are reported down, not waited for)."""
    _, container = exporter_pod(objects)
    config_file = materialize(objects, tmp_path)
    args = [arg.replace(CONFIG_FILE, str(config_file)) for arg in container["args"]]
    port = free_port()
    # The sidecar has no readiness probe, but /-/ready shows the configuration was served.
    paths = {container[probe]["httpGet"]["path"] for probe in PROBES if probe in container}
    paths |= {"/-/healthy", "/-/ready"}
    log = tmp_path / "exporter.log"
    codes: dict[str, int | None] = {}
    with exporter_process(args, port, log) as process:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and process.poll() is None:
            codes = {path: status(f"http://127.0.0.1:{port}{path}") for path in sorted(paths)}
            if all(code is not None and 200 <= code < 400 for code in codes.values()):
                break
            time.sleep(0.2)
    answered = codes.keys() == paths
    assert answered and all(code is not None and 200 <= code < 400 for code in codes.values()), (
        f"{codes}\n{log.read_text()}"
    )


# -- Service and ServiceMonitor --------------------------------------------------------------


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def test_the_deployment_selects_its_own_pods(objects: list[dict[str, Any]]) -> None:
    for deployment in of_kind(objects, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selects(deployment["spec"]["selector"]["matchLabels"], labels), describe(deployment)


def test_the_service_selects_the_exporters_port(objects: list[dict[str, Any]]) -> None:
    deployment, container = exporter_pod(objects)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    services = [
        s for s in of_kind(objects, "Service") if selects(s["spec"]["selector"], pod_labels)
    ]
    exporter_services = [
        s for s in services if any(p.get("targetPort") == PORT_NAME for p in s["spec"]["ports"])
    ]
    assert len(exporter_services) == 1, "one Service leads to the exporter's port"
    (port,) = [p for p in exporter_services[0]["spec"]["ports"] if p["targetPort"] == PORT_NAME]
    assert port["name"] == PORT_NAME
    assert port["port"] == container["ports"][0]["containerPort"]


def test_the_service_monitor_scrapes_the_exporter_as_job_llm_exporter(
    objects: list[dict[str, Any]],
) -> None:
    deployment, _ = exporter_pod(objects)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    monitor = one(objects, "ServiceMonitor")
    namespace = monitor["metadata"].get("namespace")
    assert "namespaceSelector" not in monitor["spec"], "the Service is in the monitor's namespace"
    services = [
        s
        for s in of_kind(objects, "Service")
        if s["metadata"].get("namespace") == namespace
        and selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))
    ]
    assert len(services) == 1, f"the ServiceMonitor selects {len(services)} Services"
    service = services[0]
    assert selects(service["spec"]["selector"], pod_labels)
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint.get("path", "/metrics") == "/metrics"
    # prometheus-operator's job label: the Service's label named by jobLabel, else its name.
    job_label = monitor["spec"].get("jobLabel")
    job = service["metadata"]["labels"][job_label] if job_label else service["metadata"]["name"]
    assert job == JOB
    interval = float(endpoint["interval"].rstrip("s"))
    assert float(endpoint["scrapeTimeout"].rstrip("s")) <= interval


def test_the_alerts_expect_that_job() -> None:
    alerts = (ROOT / "prometheus" / "rules" / "llm-alerts.yml").read_text()
    assert f'up{{job="{JOB}"}}' in alerts


# -- The monitoring bundle -------------------------------------------------------------------


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kubernetes_generate", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_manifests_are_current() -> None:
    """The committed PrometheusRules and dashboard ConfigMaps are what generate.py writes now."""
    for path, text in load_generator().render().items():
        assert path.is_file() and path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(ROOT)} is stale: run `python deploy/kubernetes/generate.py`"
        )


def test_prometheus_rules_equal_the_rule_files(objects: list[dict[str, Any]]) -> None:
    expected = {
        path.stem: yaml.safe_load(path.read_text())["groups"]
        for path in sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
    }
    rendered = {
        obj["metadata"]["name"]: obj["spec"]["groups"] for obj in of_kind(objects, "PrometheusRule")
    }
    assert rendered.keys() == expected.keys()
    for name, groups in expected.items():
        assert rendered[name] == groups, (
            f"PrometheusRule {name} differs from prometheus/rules/{name}.yml"
        )


def test_dashboard_config_maps_equal_the_dashboards(objects: list[dict[str, Any]]) -> None:
    key, value = GRAFANA_DASHBOARD_LABEL
    maps = [
        cm
        for cm in of_kind(objects, "ConfigMap")
        if cm["metadata"].get("labels", {}).get(key) == value
    ]
    rendered: dict[str, str] = {}
    for config_map in maps:
        for name, text in config_map["data"].items():
            assert name not in rendered, f"{name} is in two ConfigMaps"
            rendered[name] = text
        size = len(json.dumps(config_map, separators=(",", ":")))
        assert size < LAST_APPLIED_LIMIT, f"{describe(config_map)} is too large for kubectl apply"
    expected = {
        path.name: path.read_text(encoding="utf-8")
        for path in sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
    }
    assert rendered.keys() == expected.keys()
    for name, text in expected.items():
        assert rendered[name] == text, (
            f"the ConfigMap of {name} differs from grafana/dashboards/{name}"
        )


# -- Documentation ---------------------------------------------------------------------------


def test_the_docs_apply_each_layout_that_exists() -> None:
    text = DOCS.read_text()
    applied = set(re.findall(r"kubectl (?:apply -k|kustomize) (deploy/kubernetes/\S+)", text))
    assert {(ROOT / path).resolve() for path in applied} >= set(LAYOUTS.values()) - {
        LAYOUTS["base"]
    }
    for path in applied:
        assert (ROOT / path / "kustomization.yaml").is_file(), f"docs/kubernetes.md: {path}"
    assert "Helm" in text
