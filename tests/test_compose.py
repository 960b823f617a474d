"""The docker-compose stack: valid Compose, mounts that exist, and parts that fit together.

No Docker engine runs here, so the stack is checked as files: docker-compose.yml against
the Compose Specification's schema, the Dockerfile as instructions, the exporter's
configuration with its own parser, and the healthcheck command against a real exporter.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from exporter.cli import build_parser
from exporter.config import load_config, parse_config, parse_listen_address
from llamacpp_server import free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
EXAMPLE = ROOT / "examples" / "compose" / "llm-exporter.yml"
SCHEMA = Path(__file__).parent / "fixtures" / "compose-spec.json"

EXPORTER = "llm-exporter"
HOST_GATEWAY = "host.docker.internal"


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def exporter_service(compose: dict[str, Any]) -> dict[str, Any]:
    service: dict[str, Any] = compose["services"][EXPORTER]
    return service


# -- Compose volumes ---------------------------------------------------------------------


def mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    """A service's volumes in the long syntax: {type, source, target, read_only}."""
    result = []
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            result.append({"read_only": False, **entry})
            continue
        source, _, rest = entry.partition(":")
        target, _, mode = rest.partition(":")
        if not target:  # "/path": an anonymous volume
            source, target = "", source
        bind = source.startswith((".", "/", "~"))
        result.append(
            {
                "type": "bind" if bind else "volume",
                "source": source,
                "target": target,
                "read_only": "ro" in mode.split(","),
            }
        )
    return result


def bind_mounts() -> list[tuple[str, str, str, bool]]:
    """(service, source, target, read_only) of every bind mount, for parametrizing."""
    return [
        (name, mount["source"], mount["target"], mount["read_only"])
        for name, service in load_compose()["services"].items()
        for mount in mounts(service)
        if mount["type"] == "bind"
    ]


def host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """The repository path a service's bind mounts show at container_path, if any."""
    for mount in mounts(service):
        target = mount["target"].rstrip("/")
        if mount["type"] == "bind" and (
            container_path == target or container_path.startswith(target + "/")
        ):
            return ROOT / mount["source"] / container_path[len(target) :].lstrip("/")
    return None


# -- The Dockerfile ----------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = (pending + stripped).strip()
        pending = ""
        if whole:
            keyword, _, arguments = whole.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def final_stage() -> list[tuple[str, str]]:
    """The instructions of the Dockerfile's last stage, the image that runs."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))
    starts = [index for index, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert starts, "the Dockerfile has no FROM"
    return instructions[starts[-1] :]


def exec_form(arguments: str) -> list[str]:
    """The JSON (exec) form of ENTRYPOINT, CMD or a HEALTHCHECK's CMD."""
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(item, str) for item in value)
    return value


def only(stage: list[tuple[str, str]], keyword: str) -> str:
    """The arguments of the last such instruction in the stage (the one that counts)."""
    found = [arguments for name, arguments in stage if name == keyword]
    assert found, f"the Dockerfile's final stage has no {keyword}"
    return found[-1]


def dockerfile_healthcheck() -> list[str]:
    match = re.fullmatch(r"((?:--\S+\s+)*)CMD\s+(.*)", only(final_stage(), "HEALTHCHECK"), re.S)
    assert match, "HEALTHCHECK is not of the form [OPTIONS] CMD [...]"
    return exec_form(match.group(2))


def effective_command(service: dict[str, Any]) -> list[str]:
    """The exporter's arguments in the container: the service's command, else the image's CMD."""
    command = service.get("command")
    if command is None:
        return exec_form(only(final_stage(), "CMD"))
    return shlex.split(command) if isinstance(command, str) else list(command)


def effective_args(service: dict[str, Any]) -> Any:
    return build_parser().parse_args(effective_command(service))


# -- The file as a whole ---------------------------------------------------------------------


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda error: list(error.absolute_path))
    messages = [
        f"{'.'.join(str(part) for part in error.absolute_path) or '(top)'}: {error.message}"
        for error in errors
    ]
    assert not messages, "docker-compose.yml does not follow the Compose Specification:\n" + (
        "\n".join(messages)
    )


def test_the_schema_catches_a_broken_file(compose: dict[str, Any]) -> None:
    """The check above can fail: a misspelt key is reported."""
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    broken = json.loads(json.dumps(compose))
    broken["services"][EXPORTER]["helthcheck"] = broken["services"][EXPORTER].pop("healthcheck")
    assert not jsonschema.Draft7Validator(schema).is_valid(broken)


def test_the_stack_has_its_services(compose: dict[str, Any]) -> None:
    assert {EXPORTER, "prometheus", "alertmanager", "grafana", "ollama"} <= set(compose["services"])


def test_images_are_pinned_to_a_version(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if "build" in service:
            continue
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert "@sha256:" in image or (
            repository and "/" not in tag and tag not in ("latest", "main")
        ), f"{name}: image {image} is not pinned to a version"


def test_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for mount in mounts(service):
            if mount["type"] == "volume" and mount["source"]:
                assert mount["source"] in declared, f"{name}: volume {mount['source']} undeclared"


@pytest.mark.parametrize(
    ("service", "source", "target", "read_only"),
    bind_mounts(),
    ids=[f"{service}:{source}" for service, source, _, _ in bind_mounts()],
)
def test_bind_mounts_exist_in_the_repository(
    service: str, source: str, target: str, read_only: bool
) -> None:
    """Every host path is a file or directory of the repository, mounted read-only."""
    assert source.startswith("./"), f"{service}: {source} is not relative to the repository"
    path = (ROOT / source).resolve()
    assert path.is_relative_to(ROOT), f"{service}: {source} leaves the repository"
    assert path.exists(), f"{service}: {source} (mounted at {target}) does not exist"
    if posixpath.splitext(target)[1] in (".yml", ".yaml", ".json"):
        assert path.is_file(), f"{service}: {source} should be a file, as {target} is"
    else:
        assert path.is_dir(), f"{service}: {source} should be a directory, as {target} is"
    assert read_only, f"{service}: {source} is mounted writable; add :ro"


# -- The exporter's service and image -------------------------------------------------------


def test_exporter_is_built_from_the_repository_dockerfile(
    exporter_service: dict[str, Any],
) -> None:
    build = exporter_service["build"]
    build = {"context": build} if isinstance(build, str) else build
    context = (ROOT / build.get("context", ".")).resolve()
    assert context == ROOT
    assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    assert DOCKERFILE.is_file()
    declared = {
        arguments.split("=", 1)[0]
        for keyword, arguments in dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))
        if keyword == "ARG"
    }
    assert set(build.get("args") or {}) <= declared, "a build arg the Dockerfile does not take"


def base_images() -> list[str]:
    """The image each FROM builds on, with the ARGs declared before the first FROM filled in."""
    defaults: dict[str, str] = {}
    images = []
    for keyword, arguments in dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if keyword == "ARG" and not images:
            name, _, default = arguments.partition("=")
            defaults[name] = default.strip("\"'")
        elif keyword == "FROM":
            image = arguments.split()[0]
            images.append(
                re.sub(r"\$\{?(\w+)\}?", lambda match: defaults.get(match.group(1), ""), image)
            )
    return images


def test_dockerfile_installs_the_package_on_python_slim() -> None:
    assert base_images()[-1] == "python:3.11-slim"
    runs = " ".join(
        a for keyword, a in dockerfile_instructions(DOCKERFILE.read_text()) if keyword == "RUN"
    )
    assert re.search(r"pip install \S*\.\$\{EXTRAS", runs), (
        "pip install . with the EXTRAS build arg"
    )


def test_dockerfile_runs_as_a_non_root_user() -> None:
    stage = final_stage()
    user = only(stage, "USER")
    name = user.split(":")[0]
    assert name not in ("root", "0", ""), f"USER {user} is root"
    if name.isdigit():
        assert int(name) != 0
    else:  # a name: the image must create it, with a uid that is not 0
        created = [
            arguments for keyword, arguments in stage if keyword == "RUN" and name in arguments
        ]
        assert created and not re.search(r"--uid[= ]0\b", " ".join(created))


def test_dockerfile_entrypoint_is_the_console_script() -> None:
    assert exec_form(only(final_stage(), "ENTRYPOINT")) == ["llm-exporter"]
    assert 'llm-exporter = "exporter.cli:main"' in (ROOT / "pyproject.toml").read_text()


def test_image_serves_on_its_exposed_port(exporter_service: dict[str, Any]) -> None:
    """EXPOSE, the published port and the healthchecks agree with the listen address."""
    _, port = parse_listen_address(effective_args(exporter_service).listen_address)
    assert only(final_stage(), "EXPOSE").split("/")[0] == str(port) == "9741"
    published = [str(entry).rsplit(":", 1)[-1] for entry in exporter_service["ports"]]
    assert str(port) in published
    for command in (exporter_service["healthcheck"]["test"], dockerfile_healthcheck()):
        assert f"http://127.0.0.1:{port}/-/healthy" in " ".join(command)


def test_exporter_healthcheck_hits_healthy(exporter_service: dict[str, Any]) -> None:
    healthcheck = exporter_service["healthcheck"]
    assert not healthcheck.get("disable", False)
    test = healthcheck["test"]
    assert isinstance(test, list) and test[0] == "CMD", "the exec form: no shell in the image"
    assert "/-/healthy" in " ".join(test)
    assert "/-/healthy" in " ".join(dockerfile_healthcheck())


def test_exporter_reads_the_example_configuration(exporter_service: dict[str, Any]) -> None:
    """The config file the exporter is started with is the example, mounted read-only."""
    config_file = effective_args(exporter_service).config_file
    source = host_path(exporter_service, config_file)
    assert source is not None, f"nothing is mounted at {config_file}"
    assert source.resolve() == EXAMPLE


@contextmanager
def exporter_process(config: Path, port: int) -> Iterator[None]:
    command = [
        sys.executable, "-m", "exporter",
        "--config.file", str(config),
        "--web.listen-address", f"127.0.0.1:{port}",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def run_healthcheck(command: list[str], port: int) -> int:
    """Run a healthcheck's CMD here, with this Python and the exporter's test port."""
    assert command[:2] == ["CMD", "python"]
    args = [arg.replace("127.0.0.1:9741", f"127.0.0.1:{port}") for arg in command[2:]]
    result = subprocess.run([sys.executable, *args], capture_output=True, timeout=30)
    return result.returncode


def test_healthchecks_pass_against_a_running_exporter_and_fail_without(
    tmp_path: Path, exporter_service: dict[str, Any]
) -> None:
    """The Python one-liners work: 0 while the exporter serves, non-zero when nothing does."""
    config = tmp_path / "llm-exporter.yml"
    config.write_text("host:\n  enabled: true\n  gpu: false\n")
    commands = [exporter_service["healthcheck"]["test"], ["CMD", *dockerfile_healthcheck()]]
    port = free_port()
    with exporter_process(config, port):
        deadline = time.monotonic() + 20
        while run_healthcheck(commands[0], port) != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [run_healthcheck(command, port) for command in commands] == [0, 0]
    assert all(run_healthcheck(command, port) != 0 for command in commands)


# -- The exporter's configuration -------------------------------------------------------------


def test_example_configuration_passes_the_exporters_parser(compose: dict[str, Any]) -> None:
    config = load_config(EXAMPLE)
    ollama = [provider for provider in config.providers if provider.kind == "ollama"]
    assert ollama and ollama[0].url == "http://ollama:11434"
    assert ollama[0].probes is not None and ollama[0].probes.models
    for provider in config.providers:  # containers reach each other by service name
        assert urlsplit(provider.url).hostname in compose["services"]


def commented_providers(text: str) -> str:
    """The example with its commented-out providers ("  # - name: ...") uncommented."""
    return re.sub(r"(?m)^  # ((?:- |  ).*)$", r"  \1", text)


def test_commented_host_examples_are_valid(exporter_service: dict[str, Any]) -> None:
    """The llama.cpp and vLLM examples on the Docker host parse once uncommented."""
    text = EXAMPLE.read_text(encoding="utf-8")
    assert "docker compose exec ollama ollama pull" in text
    config = parse_config(commented_providers(text), str(EXAMPLE))
    on_host = {p.kind: p for p in config.providers if urlsplit(p.url).hostname == HOST_GATEWAY}
    assert {"llamacpp", "vllm"} <= set(on_host)
    assert f"{HOST_GATEWAY}:host-gateway" in exporter_service.get("extra_hosts", [])


# -- Profiles ------------------------------------------------------------------------------------


def test_ollama_only_starts_with_its_profile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["ollama"].get("profiles") == ["ollama"]
    for name, service in services.items():
        if name == "ollama":
            continue
        assert not service.get("profiles"), f"{name} should start without a profile"
        depends = service.get("depends_on") or {}
        if isinstance(depends, dict):
            required = [dep for dep, spec in depends.items() if spec.get("required", True)]
        else:
            required = list(depends)
        # A required dependency would make `docker compose up` refuse to run without it.
        assert "ollama" not in required, f"{name} needs ollama, which only runs with its profile"


# -- Wiring: the configurations mounted into Prometheus and Grafana name the services -----------


def mounted_yaml(compose: dict[str, Any], service: str, container_path: str) -> Any:
    path = host_path(compose["services"][service], container_path)
    assert path is not None, f"{service}: nothing is mounted at {container_path}"
    if not path.is_file():
        pytest.skip(f"{path.relative_to(ROOT)} does not exist yet (reported by the mount test)")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def static_targets(configs: list[dict[str, Any]] | None) -> set[str]:
    return {
        target
        for config in configs or []
        for static in config.get("static_configs") or []
        for target in static.get("targets") or []
    }


def test_prometheus_scrapes_the_exporter_and_alerts_alertmanager(compose: dict[str, Any]) -> None:
    config = mounted_yaml(compose, "prometheus", "/etc/prometheus/prometheus.yml")
    assert f"{EXPORTER}:9741" in static_targets(config.get("scrape_configs"))
    alerting = (config.get("alerting") or {}).get("alertmanagers")
    assert "alertmanager:9093" in static_targets(alerting)


def test_prometheus_loads_the_mounted_rules(compose: dict[str, Any]) -> None:
    config = mounted_yaml(compose, "prometheus", "/etc/prometheus/prometheus.yml")
    service = compose["services"]["prometheus"]
    patterns = config.get("rule_files") or []
    assert patterns, "prometheus.yml loads no rule files"
    for pattern in patterns:
        container_path = posixpath.normpath(posixpath.join("/etc/prometheus", pattern))
        assert container_path.startswith("/etc/prometheus/rules/"), pattern
        rules_dir = host_path(service, "/etc/prometheus/rules")
        assert rules_dir is not None
        relative = container_path.removeprefix("/etc/prometheus/rules/")
        assert list(rules_dir.glob(relative)), f"rule_files {pattern} matches no file"


def test_grafana_provisioning_points_at_the_stack(compose: dict[str, Any]) -> None:
    provisioning = host_path(compose["services"]["grafana"], "/etc/grafana/provisioning")
    assert provisioning is not None
    if not provisioning.is_dir():
        pytest.skip("grafana/provisioning does not exist yet (reported by the mount test)")
    datasources = [
        source
        for file in sorted((provisioning / "datasources").glob("*.y*ml"))
        for source in (yaml.safe_load(file.read_text(encoding="utf-8")) or {}).get(
            "datasources", []
        )
    ]
    prometheus = [urlsplit(source.get("url", "")) for source in datasources]
    assert any(url.hostname == "prometheus" and url.port == 9090 for url in prometheus)
    paths = [
        (provider.get("options") or {}).get("path", "")
        for file in sorted((provisioning / "dashboards").glob("*.y*ml"))
        for provider in (yaml.safe_load(file.read_text(encoding="utf-8")) or {}).get(
            "providers", []
        )
    ]
    assert any(path.rstrip("/").startswith("/var/lib/grafana/dashboards") for path in paths)
