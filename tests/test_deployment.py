"""The deployment files and docs/deployment.md: the systemd unit and its drop-ins, the
`docker run` lines, the health check for a guarded exporter, and the fleet's Prometheus
configurations.

No systemd runs here, but its `systemd-analyze` works on files: `verify` loads the unit
(with each drop-in) from a scratch root holding the host's own units and stand-ins for the
programs it runs, and `security --offline=yes` rates its sandbox. A unit parser of our own
checks the hardening settings and hands every llm-exporter command line to the exporter's
own argument parser. The documented Prometheus configurations pass `promtool check config`,
and their selectors are applied to the names of every recording rule and alert.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import trustme
import yaml

from exporter.cli import build_parser
from llamacpp_server import free_port
from tests.helpers import stop_process

REPO = Path(__file__).resolve().parent.parent
SYSTEMD = REPO / "deploy" / "systemd"
UNIT = SYSTEMD / "llm-exporter.service"
DROPINS = SYSTEMD / "llm-exporter.service.d"
GPU_DROPIN = DROPINS / "gpu.conf"
DEPLOYMENT = REPO / "docs" / "deployment.md"
README = REPO / "README.md"
DOCUMENTS = [README, *sorted((REPO / "docs").glob("*.md"))]
RULES = REPO / "prometheus" / "rules"
# What `systemd-analyze security` rates the unit, at most (0 is best, 10 worst; it is 1.9).
MAX_EXPOSURE = 2.5
ANALYZE_TIMEOUT = 60

SH_BLOCK_RE = re.compile(r"^```(?:sh|console|bash)\n(.*?)^```", re.MULTILINE | re.DOTALL)
INI_BLOCK_RE = re.compile(r"^```ini\n(.*?)^```", re.MULTILINE | re.DOTALL)
YAML_BLOCK_RE = re.compile(r"^```ya?ml\n(.*?)^```", re.MULTILINE | re.DOTALL)


# -- Unit files --------------------------------------------------------------------------------


def directives(text: str) -> dict[str, list[str]]:
    """ "Section.Key" -> its values in order, read as systemd reads a unit file: lines starting
    with # or ; are comments, and a line ending in a backslash goes on on the next one."""
    found: dict[str, list[str]] = {}
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, equals, value = line.partition("=")
        assert equals, f"not a Key=value line: {raw!r}"
        found.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    assert not pending, "the last line ends in a backslash"
    return found


def setting(unit: dict[str, list[str]], key: str) -> str | None:
    """The value that counts: the last one given."""
    values = unit.get(key)
    return values[-1] if values else None


def commands(unit: dict[str, list[str]], key: str) -> list[str]:
    """The command lines of ExecStart= or ExecReload=, after the last empty one (a reset)."""
    lines = unit.get(f"Service.{key}", [])
    if "" in lines:
        lines = lines[len(lines) - lines[::-1].index("") :]
    return lines


UNIT_DIRECTIVES = directives(UNIT.read_text(encoding="utf-8"))
GPU_DIRECTIVES = directives(GPU_DROPIN.read_text(encoding="utf-8"))

# The sandbox docs/deployment.md describes, setting by setting.
HARDENING = {
    "DynamicUser": "yes",
    "ConfigurationDirectory": "llm-exporter",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "PrivateIPC": "yes",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "RestrictSUIDSGID": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "LockPersonality": "yes",
    "RestrictRealtime": "yes",
    "RestrictNamespaces": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "SystemCallFilter": "@system-service",
    "SystemCallErrorNumber": "EPERM",
    "UMask": "0077",
    "Restart": "on-failure",
    "RestartPreventExitStatus": "2",
}


@pytest.mark.parametrize(("key", "value"), HARDENING.items(), ids=list(HARDENING))
def test_the_unit_is_hardened(key: str, value: str) -> None:
    assert setting(UNIT_DIRECTIVES, f"Service.{key}") == value


def test_the_unit_allows_ip_unix_and_netlink_sockets_only() -> None:
    families = setting(UNIT_DIRECTIVES, "Service.RestrictAddressFamilies")
    assert families is not None
    assert set(families.split()) == {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}


def test_the_unit_leaves_proc_whole_for_process_and_host_metrics() -> None:
    """ProtectProc=invisible would hide the providers' processes from `process`, and
    ProcSubset=pid the host's /proc/stat and /proc/meminfo (docs/deployment.md says why)."""
    assert setting(UNIT_DIRECTIVES, "Service.ProtectProc") in (None, "default")
    assert setting(UNIT_DIRECTIVES, "Service.ProcSubset") in (None, "all")


def test_the_unit_runs_the_exporter_with_its_configuration_directory() -> None:
    [start] = commands(UNIT_DIRECTIVES, "ExecStart")
    args = exporter_args(start)
    assert args is not None, start
    parsed = parse_exporter_args(args, where="ExecStart")
    directory = setting(UNIT_DIRECTIVES, "Service.ConfigurationDirectory")
    assert parsed.config_file == f"/etc/{directory}/llm-exporter.yml"
    assert setting(UNIT_DIRECTIVES, "Service.Type") == "exec"


def test_reload_checks_the_file_then_sends_sighup() -> None:
    check, signal = commands(UNIT_DIRECTIVES, "ExecReload")
    args = exporter_args(check)
    assert args is not None, check
    parsed = parse_exporter_args(args, where="ExecReload")
    [start] = commands(UNIT_DIRECTIVES, "ExecStart")
    assert parsed.config_check
    assert parsed.config_file == parse_exporter_args(exporter_args(start) or []).config_file
    assert shlex.split(signal) == ["/bin/kill", "-HUP", "$MAINPID"]


def test_the_gpu_dropin_opens_nvidia_devices_only() -> None:
    assert GPU_DIRECTIVES == {
        "Service.PrivateDevices": ["no"],
        "Service.DevicePolicy": ["closed"],
        "Service.DeviceAllow": ["char-nvidia* rw"],
    }


def test_the_docs_show_the_gpu_dropin_as_shipped() -> None:
    shown = [directives(block) for block in INI_BLOCK_RE.findall(DEPLOYMENT.read_text())]
    assert GPU_DIRECTIVES in shown


# -- systemd-analyze -----------------------------------------------------------------------------


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail(
            "systemd-analyze is missing: `make system-deps` installs Debian's systemd package"
        )
    return path


def host_units() -> Path:
    for folder in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (folder / "sysinit.target").exists():
            return folder
    pytest.fail("systemd's own units (sysinit.target) are not installed")


def scratch_root(tmp_path: Path, dropins: dict[str, str]) -> Path:
    """A root for `systemd-analyze --root`: the unit and its drop-ins where an administrator
    installs them, the host's own units (the targets the unit depends on), and executable
    stand-ins for every program the unit runs (verify checks that they exist)."""
    root = tmp_path / "root"
    system = root / "etc" / "systemd" / "system"
    system.mkdir(parents=True)
    shutil.copy(UNIT, system / UNIT.name)
    unit = directives(UNIT.read_text())
    for name, text in dropins.items():
        folder = system / f"{UNIT.name}.d"
        folder.mkdir(exist_ok=True)
        (folder / name).write_text(text)
        for key, values in directives(text).items():
            unit.setdefault(key, []).extend(values)
    shutil.copytree(host_units(), root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    for key in ("Service.ExecStart", "Service.ExecReload"):
        for line in unit.get(key, []):
            if line:
                stand_in = root / shlex.split(line)[0].lstrip("-@+!:").lstrip("/")
                stand_in.parent.mkdir(parents=True, exist_ok=True)
                stand_in.write_text("#!/bin/sh\n")
                stand_in.chmod(0o755)
    return root


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [systemd_analyze(), *args],
        capture_output=True,
        text=True,
        timeout=ANALYZE_TIMEOUT,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "info", "SYSTEMD_PAGER": "", "LC_ALL": "C"},
    )


def verify(root: Path) -> str:
    """What `systemd-analyze verify` says of the unit as installed in root ("" when clean).
    Unknown keys and bad values are only warnings to systemd (exit status 0), so every line
    it prints counts."""
    result = analyze(
        "verify", f"--root={root}", "--man=no", "--generators=no",
        str(root / "etc" / "systemd" / "system" / UNIT.name),
    )  # fmt: skip
    output = (result.stdout + result.stderr).strip()
    return output or ("" if result.returncode == 0 else f"exit status {result.returncode}")


def documented_dropins() -> list[str]:
    """The ```ini blocks of docs/deployment.md: drop-ins for the unit."""
    return INI_BLOCK_RE.findall(DEPLOYMENT.read_text(encoding="utf-8"))


DROPIN_CASES = {
    "unit": {},
    "gpu.conf": {GPU_DROPIN.name: GPU_DROPIN.read_text()},
    **{
        f"deployment.md-ini-{index}": {f"doc-{index}.conf": text}
        for index, text in enumerate(documented_dropins(), 1)
    },
}


@pytest.mark.parametrize("dropins", DROPIN_CASES.values(), ids=list(DROPIN_CASES))
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path, dropins: dict[str, str]) -> None:
    assert verify(scratch_root(tmp_path, dropins)) == ""


def test_systemd_analyze_verify_catches_a_misspelt_setting(tmp_path: Path) -> None:
    """The check above would notice a typo: systemd only warns of one, and goes on."""
    root = scratch_root(tmp_path, {"typo.conf": "[Service]\nProtectSystm=strict\n"})
    assert "Unknown key" in verify(root)


def exposure(root: Path) -> float:
    result = analyze("security", "--offline=yes", f"--root={root}", "--no-pager", UNIT.name)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


@pytest.mark.parametrize("dropins", [{}, {GPU_DROPIN.name: GPU_DROPIN.read_text()}],
                         ids=["unit", "gpu.conf"])  # fmt: skip
def test_systemd_analyze_security_rates_the_sandbox_ok(
    tmp_path: Path, dropins: dict[str, str]
) -> None:
    assert exposure(scratch_root(tmp_path, dropins)) <= MAX_EXPOSURE


# -- llm-exporter command lines -----------------------------------------------------------------


def exporter_args(command: str) -> list[str] | None:
    """The arguments of an llm-exporter command line, after any `sudo` and VAR=value
    prefixes; None when the line runs another program."""
    words = shlex.split(command, comments=True)
    while words and (words[0] == "sudo" or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0])):
        words.pop(0)
    if not words or Path(words[0].lstrip("-@+!:")).name != "llm-exporter":
        return None
    return words[1:]


def parse_exporter_args(args: list[str], where: str = "") -> Any:
    parser = build_parser()

    def error(message: str) -> None:
        pytest.fail(f"{where}: llm-exporter {shlex.join(args)}: {message}")

    parser.error = error  # type: ignore[method-assign,assignment]
    return parser.parse_args(args)


def shell_lines(text: str) -> list[str]:
    """The logical command lines of a document's shell blocks (continuations joined)."""
    lines = []
    for block in SH_BLOCK_RE.findall(text):
        lines.extend(line.strip() for line in block.replace("\\\n", " ").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def documented_exporter_commands() -> list[tuple[str, list[str]]]:
    """Every llm-exporter command of docs/deployment.md: shell lines, inline code, drop-ins."""
    text = DEPLOYMENT.read_text(encoding="utf-8")
    candidates = shell_lines(text) + re.findall(r"`([^`\n]*llm-exporter --[^`\n]*)`", text)
    for block in documented_dropins():
        unit = directives(block)
        candidates += commands(unit, "ExecStart") + commands(unit, "ExecReload")
    found = []
    for line in candidates:
        args = exporter_args(line)
        if args is not None:
            found.append((line, args))
    return found


def test_the_documented_llm_exporter_commands_parse() -> None:
    found = documented_exporter_commands()
    assert len(found) >= 6, found
    for line, args in found:
        parse_exporter_args(args, where=line)


# `docker run`'s own options: those that take a value, and those that do not. An option
# missing here fails the test: add it to the right set.
DOCKER_VALUE_OPTIONS = {
    "--name", "--restart", "--network", "--net", "-v", "--volume", "--mount", "-p", "--publish",
    "-e", "--env", "--env-file", "--add-host", "--gpus", "--pid", "-u", "--user",
    "--health-cmd", "--health-interval", "--health-timeout", "--health-retries",
    "--health-start-period", "--memory", "--cpus", "--log-driver", "--log-opt", "-l",
    "--label", "--cap-add", "--cap-drop", "--security-opt", "--tmpfs", "-w", "--workdir",
}  # fmt: skip
DOCKER_FLAG_OPTIONS = {
    "-d", "--detach", "--rm", "-i", "-t", "-it", "--init", "--read-only", "--no-healthcheck",
}  # fmt: skip
IMAGE_RE = re.compile(r"(?:[\w.:-]+/)*llm-exporter(?::[\w.-]+)?")


def docker_run_args(line: str) -> tuple[dict[str, list[str]], list[str]]:
    """A `docker run` line's options, and the arguments it passes to the image's entrypoint."""
    words = shlex.split(line[line.index("docker run") :], comments=True)[2:]
    options: dict[str, list[str]] = {}
    while words and words[0].startswith("-"):
        word = words.pop(0)
        name, equals, value = word.partition("=")
        if name in DOCKER_VALUE_OPTIONS:
            options.setdefault(name, []).append(value if equals else words.pop(0))
        else:
            assert word in DOCKER_FLAG_OPTIONS, f"{line}: unknown docker run option {word}"
            options.setdefault(word, [])
    assert words and IMAGE_RE.fullmatch(words[0]), f"{line}: no llm-exporter image"
    return options, words[1:]


def documented_docker_runs() -> list[str]:
    return [
        line
        for document in DOCUMENTS
        for line in shell_lines(document.read_text(encoding="utf-8"))
        if "docker run" in line
    ]


def test_every_docker_run_line_passes_flags_the_exporter_knows() -> None:
    lines = documented_docker_runs()
    in_deployment = [line for line in lines if line in shell_lines(DEPLOYMENT.read_text())]
    assert len(in_deployment) >= 2, in_deployment
    for line in lines:
        _, args = docker_run_args(line)
        parse_exporter_args(args, where=line)


def test_the_image_default_command_parses() -> None:
    text = (REPO / "Dockerfile").read_text()
    entrypoint = re.search(r"^ENTRYPOINT\s+(\[.*\])$", text, re.MULTILINE)
    cmd = re.search(r"^CMD\s+(\[.*\])$", text, re.MULTILINE)
    assert entrypoint and cmd
    assert json.loads(entrypoint.group(1)) == ["llm-exporter"]
    parse_exporter_args(json.loads(cmd.group(1)), where="Dockerfile CMD")


# -- The health check of a guarded exporter ------------------------------------------------------


def documented_health_command() -> str:
    [line] = [line for line in documented_docker_runs() if "--health-cmd" in line]
    options, _ = docker_run_args(line)
    [command] = options["--health-cmd"]
    return command


@contextmanager
def guarded_exporter(tmp_path: Path, tls: bool, port: int) -> Iterator[None]:
    """An exporter with basic auth, and TLS if asked, on 127.0.0.1:port."""
    lines = [f"basic_auth_users:\n  prometheus: {bcrypt.hashpw(b's', bcrypt.gensalt(4)).decode()}"]
    if tls:
        cert = trustme.CA().issue_cert("127.0.0.1")
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.crt"))
        cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
        lines.insert(0, "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key")
    (tmp_path / "web.yml").write_text("\n".join(lines) + "\n")
    (tmp_path / "llm-exporter.yml").write_text("host:\n  enabled: true\n  gpu: false\n")
    command = [
        sys.executable, "-m", "exporter",
        "--config.file", str(tmp_path / "llm-exporter.yml"),
        "--web.config.file", str(tmp_path / "web.yml"),
        "--web.listen-address", f"127.0.0.1:{port}",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        stop_process(process)


def run_health_command(command: str, port: int) -> int:
    """Run the command as Docker does (`/bin/sh -c`), with this Python as `python`."""
    command = command.replace("9741", str(port))
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    result = subprocess.run(
        ["/bin/sh", "-c", command], env={**os.environ, "PATH": path},
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    return result.returncode


def wait_until_healthy(command: str, port: int) -> int:
    deadline = time.monotonic() + 20
    while (status := run_health_command(command, port)) != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    return status


def test_the_documented_health_check_passes_with_tls_and_basic_auth(tmp_path: Path) -> None:
    command = documented_health_command()
    port = free_port()
    with guarded_exporter(tmp_path, tls=True, port=port):
        assert wait_until_healthy(command, port) == 0
    assert run_health_command(command, port) != 0


def test_the_plain_http_variant_passes_with_basic_auth_only(tmp_path: Path) -> None:
    """The variant the text names for basic auth without TLS."""
    https = 'h.HTTPSConnection(\\"127.0.0.1\\", 9741, timeout=4, context=ssl._create_unverified_context())'
    http = 'h.HTTPConnection("127.0.0.1", 9741, timeout=4)'
    assert f"`{http}`" in DEPLOYMENT.read_text()
    command = documented_health_command()
    assert https in command
    command = command.replace(https, http.replace('"', '\\"'))
    port = free_port()
    with guarded_exporter(tmp_path, tls=False, port=port):
        assert wait_until_healthy(command, port) == 0
    assert run_health_command(command, port) != 0


# -- The fleet's Prometheus configurations -------------------------------------------------------


def prometheus_configs() -> list[dict[str, Any]]:
    """The Prometheus configurations of docs/deployment.md."""
    found = []
    for block in YAML_BLOCK_RE.findall(DEPLOYMENT.read_text(encoding="utf-8")):
        value = yaml.safe_load(block)
        if isinstance(value, dict) and {"scrape_configs", "remote_write"} & set(value):
            found.append(value)
    return found


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: `make system-deps` installs Debian's prometheus package")
    return path


@pytest.mark.parametrize("config", prometheus_configs())
def test_promtool_accepts_the_prometheus_configurations(
    tmp_path: Path, config: dict[str, Any]
) -> None:
    file = tmp_path / "prometheus.yml"
    file.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [promtool(), "check", "config", str(file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def rule_names(key: str) -> set[str]:
    names = set()
    for file in RULES.glob("*.yml"):
        for group in yaml.safe_load(file.read_text())["groups"]:
            names |= {rule[key] for rule in group["rules"] if key in rule}
    return names


RECORDED = rule_names("record")
ALERTS = rule_names("alert")
# What the global view needs besides the rules: which providers and models are up.
GAUGES = ["llm_provider_up", "llm_provider_info", "llm_health_status", "llm_model_loaded"]
# What stays in each site: raw buckets, per-client gateway series, the model inventory.
LOCAL = [
    {"__name__": "llm_probe_duration_seconds_bucket", "le": "0.01"},
    {"__name__": "llm_gateway_time_to_first_token_seconds_bucket", "le": "0.1"},
    {"__name__": "llm_time_to_first_token_seconds_bucket", "le": "1.0"},
    {"__name__": "llm_gateway_requests_total", "client": "open-webui"},
    {"__name__": "llm_gateway_tokens_total", "client": "open-webui"},
]


def global_series() -> list[dict[str, str]]:
    series = [{"__name__": name} for name in sorted(RECORDED)]
    series += [{"__name__": "ALERTS", "alertname": name} for name in sorted(ALERTS)]
    return series


def test_the_rules_have_names_the_selections_can_follow() -> None:
    assert len(RECORDED) >= 20 and len(ALERTS) >= 10
    assert all(re.fullmatch(r"(provider|provider_model):\w+:\w+", name) for name in RECORDED)
    assert all(name.startswith("LLM") for name in ALERTS)


SELECTOR_RE = re.compile(r'\s*([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def selects(selector: str, labels: dict[str, str]) -> bool:
    """Whether a series selector such as {__name__=~"a|b", job="x"} selects a series."""
    match = re.fullmatch(r"([a-zA-Z_:][\w:]*)?\{(.*)\}", selector.strip())
    assert match, selector
    name, body = match.groups()
    if name is not None and labels.get("__name__") != name:
        return False
    position = 0
    while position < len(body):
        matcher = SELECTOR_RE.match(body, position)
        assert matcher, f"cannot read {selector} at {body[position:]!r}"
        label, op, value = matcher.groups()
        got = labels.get(label, "")
        hit = re.fullmatch(value, got) is not None if "~" in op else got == value
        if hit != (op in ("=", "=~")):
            return False
        position = matcher.end()
    return True


def federate_selectors() -> list[str]:
    jobs = [
        job
        for config in prometheus_configs()
        for job in config.get("scrape_configs", [])
        if job.get("metrics_path") == "/federate"
    ]
    assert len(jobs) == 1, "docs/deployment.md shows one /federate job"
    assert jobs[0]["honor_labels"] is True
    return list(jobs[0]["params"]["match[]"])


def test_federation_pulls_every_recording_rule_and_alert_and_no_raw_series() -> None:
    selectors = federate_selectors()

    def federated(labels: dict[str, str]) -> bool:
        return any(selects(selector, labels) for selector in selectors)

    missing = [labels for labels in global_series() if not federated(labels)]
    assert missing == []
    assert all(federated({"__name__": name}) for name in GAUGES)
    assert not any(federated(labels) for labels in LOCAL)
    assert not federated({"__name__": "ALERTS", "alertname": "KubePodCrashLooping"})


def relabel(configs: list[dict[str, Any]], labels: dict[str, str]) -> bool:
    """Whether keep and drop relabelling rules let a series through."""
    for rule in configs:
        action = rule.get("action", "replace")
        assert action in ("keep", "drop"), f"only keep and drop are modelled here, not {action}"
        separator = rule.get("separator", ";")
        value = separator.join(labels.get(name, "") for name in rule["source_labels"])
        matched = re.fullmatch(rule.get("regex", "(.*)"), value) is not None
        if matched != (action == "keep"):
            return False
    return True


def remote_writes() -> list[dict[str, Any]]:
    found = [write for config in prometheus_configs() for write in config.get("remote_write", [])]
    assert len(found) >= 2, "docs/deployment.md shows a keep and a drop remote_write"
    return found


def test_remote_write_sends_every_recording_rule_and_alert_and_no_raw_buckets() -> None:
    for write in remote_writes():
        configs = write["write_relabel_configs"]
        sent = [labels for labels in global_series() if relabel(configs, labels)]
        assert sent == global_series(), write["url"]
        assert not any(relabel(configs, labels) for labels in LOCAL), write["url"]


def test_the_selective_remote_write_keeps_the_global_view_only() -> None:
    [selective] = [
        write
        for write in remote_writes()
        if any(rule.get("action") == "keep" for rule in write["write_relabel_configs"])
    ]
    configs = selective["write_relabel_configs"]
    assert all(relabel(configs, {"__name__": name}) for name in GAUGES)
    for name in ("llm_model_info", "llm_host_memory_used_bytes", "up", "node_load1"):
        assert not relabel(configs, {"__name__": name}), name
    assert not relabel(configs, {"__name__": "ALERTS", "alertname": "KubePodCrashLooping"})


def test_each_site_says_where_it_is() -> None:
    labels = [
        config["global"]["external_labels"]
        for config in prometheus_configs()
        if "external_labels" in config.get("global", {})
    ]
    assert labels and all("cluster" in found for found in labels)


# -- Links -------------------------------------------------------------------------------------


def test_the_readme_links_the_deployment_guide() -> None:
    text = README.read_text()
    documentation = text[text.index("## Documentation") :]
    assert "](docs/deployment.md)" in documentation
    systemd = text[text.index("### As a systemd service") : text.index("### With `docker run`")]
    assert "](deploy/systemd/llm-exporter.service)" in systemd
    assert "](docs/deployment.md#systemd)" in systemd


def anchors(document: Path) -> set[str]:
    """GitHub's anchors for a document's headings."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", document.read_text(), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def test_the_deployment_guides_links_resolve() -> None:
    text = DEPLOYMENT.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        document = (DEPLOYMENT.parent / target).resolve() if target else DEPLOYMENT
        assert document.exists(), link
        if anchor:
            assert anchor in anchors(document), link
    assert {"#systemd", "#docker", "#kubernetes", "#fleet"} <= {
        link for link in links if link.startswith("#")
    }


def test_every_file_the_guide_names_under_deploy_exists() -> None:
    for path in set(re.findall(r"\bdeploy/[\w./-]+", DEPLOYMENT.read_text())):
        assert (REPO / path.rstrip(".")).exists(), path
