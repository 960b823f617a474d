"""Write prometheus/rules/*.yml from prometheus/templates/: the job selector, a selector for
every series, and the alerts' thresholds filled in.

    python prometheus/generate_rules.py            # the committed files (every default)
    python prometheus/generate_rules.py --check    # exit 1 when they differ from what it writes
    python prometheus/generate_rules.py --job-selector 'job=~"llm-exporter|llm-providers"' \\
        --selector 'cluster="eu-1"' --probe-latency-seconds 20 --output-dir /etc/prometheus/rules

The templates are the rule files themselves with `[[name]]` where a value goes (`[[name%]]`:
a ratio written as a percentage, for comments and descriptions). --selector is added to
every series selector of every expression (llm_* and `up`), in both files. The committed
rule files are this script's output with every default; tests/test_generate_rules.py keeps
them equal. docs/rules.md has the options and an example.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "prometheus" / "templates"
RULES = ROOT / "prometheus" / "rules"
FILES = ("llm-alerts.yml", "llm-recording.yml")
JOB_SELECTOR = 'job="llm-exporter"'


@dataclass(frozen=True)
class Threshold:
    """A number in the alert rules, its default as the committed file has it."""

    name: str
    default: str
    alert: str
    meaning: str
    ratio: bool = False  # a share from 0 to 1, shown as a percentage in the text
    integer: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


THRESHOLDS = (
    Threshold("flapping_changes", "4", "LLMProviderFlapping", "changes of llm_provider_up in 1h above which it fires", integer=True),
    Threshold("provider_error_ratio", "0.10", "LLMProviderErrorRatioHigh", "share of the exporter's requests failed", ratio=True),
    Threshold("probe_error_ratio", "0.25", "LLMProbeFailing", "share of a model's probes failed", ratio=True),
    Threshold("probe_latency_seconds", "10", "LLMProbeLatencyHigh", "probe p95 duration"),
    Threshold("probe_ttft_seconds", "2", "LLMTimeToFirstTokenHigh", "probe p95 time to first token (source=probe)"),
    Threshold("provider_ttft_seconds", "5", "LLMTimeToFirstTokenHigh", "the provider's p95 time to first token (source=provider)"),
    Threshold("gateway_ttft_seconds", "5", "LLMTimeToFirstTokenHigh", "the gateway's p95 time to first token (source=gateway)"),
    Threshold("token_rate_drop_ratio", "0.5", "LLMTokenRateDropped", "output tokens/s below this share of 1h and of 1d earlier", ratio=True),
    Threshold("token_rate_min", "10", "LLMTokenRateDropped", "output tokens/s 1h earlier above which it compares"),
    Threshold("queue_waiting", "10", "LLMQueueBuildingUp", "requests waiting at the provider"),
    Threshold("kv_cache_ratio", "0.95", "LLMKVCacheNearlyFull", "share of the KV cache in use", ratio=True),
    Threshold("host_memory_ratio", "0.90", "LLMHostMemoryHigh", "share of the host's memory in use", ratio=True),
    Threshold("disk_used_ratio", "0.60", "LLMHostDiskFillingUp", "share of a disk used before its trend counts", ratio=True),
    Threshold("disk_full_hours", "24", "LLMHostDiskFillingUp", "hours within which the trend fills the disk", integer=True),
    Threshold("gpu_memory_ratio", "0.95", "LLMGPUMemoryNearlyFull", "share of a GPU's memory in use", ratio=True),
    Threshold("gateway_error_ratio", "0.05", "LLMGatewayErrorRatioHigh", "share of a model's requests through the gateway failed", ratio=True),
    Threshold("gateway_queue_ratio", "0.90", "LLMGatewayQueueSaturated", "share of max_waiting waiting", ratio=True),
    Threshold("gateway_queue_wait_seconds", "10", "LLMGatewayQueueWaitHigh", "p95 wait in the gateway's queue"),
    Threshold("thrashing_count", "3", "LLMModelThrashing", "evictions and loads of a model in 1h", integer=True),
    Threshold("model_load_slow_seconds", "30", "LLMModelLoadSlow", "model load p95"),
)  # fmt: skip

# Label matchers as PromQL writes them between braces: name, operator, double-quoted value.
_MATCHER = r'[a-zA-Z_][a-zA-Z0-9_]*\s*(?:=~|!~|!=|=)\s*"(?:[^"\\\n]|\\.)*"'
MATCHERS = re.compile(rf"\s*{_MATCHER}(?:\s*,\s*{_MATCHER})*\s*")
NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")
PLACEHOLDER = re.compile(r"\[\[([a-z_]+)(%?)\]\]")
# A series selector in an expression: a metric name (not part of a recorded name such as
# provider:llm_tokens:rate5m) and its matchers, if any.
SERIES = re.compile(r"(?<![\w:])(llm_[a-z0-9_]+|up)(?![\w:])(?:\{([^}]*)\})?")
EXPR = re.compile(r"^( *)(?:- )?expr: ?(.*)$")


@dataclass(frozen=True)
class Options:
    """What the rules are written with; Options() is the committed files."""

    job_selector: str = JOB_SELECTOR
    selector: str = ""
    thresholds: Mapping[str, str] | None = None

    def values(self) -> dict[str, str]:
        """Every threshold's text, the given ones over the defaults."""
        values = {t.name: t.default for t in THRESHOLDS}
        values.update(self.thresholds or {})
        return values

    def flags(self) -> list[str]:
        """The command-line options that differ from the defaults, in a stable order."""
        flags = []
        if self.job_selector != JOB_SELECTOR:
            flags += ["--job-selector", self.job_selector]
        if self.selector:
            flags += ["--selector", self.selector]
        values = self.values()
        for threshold in THRESHOLDS:
            if values[threshold.name] != threshold.default:
                flags += [threshold.flag, values[threshold.name]]
        return flags


def check(options: Options) -> None:
    """Raise ValueError naming the first option that cannot be written into the rules."""
    if not MATCHERS.fullmatch(options.job_selector):
        raise ValueError(f"--job-selector: expected label matchers like {JOB_SELECTOR}")
    if options.selector and not MATCHERS.fullmatch(options.selector):
        raise ValueError('--selector: expected label matchers like cluster="eu-1"')
    known = {t.name: t for t in THRESHOLDS}
    for name, text in (options.thresholds or {}).items():
        threshold = known.get(name)
        if threshold is None:
            raise ValueError(f"unknown threshold {name}")
        if not NUMBER.fullmatch(text):
            raise ValueError(f"{threshold.flag}: expected a number like {threshold.default}")
        value = Decimal(text)
        if threshold.integer and value != value.to_integral_value():
            raise ValueError(f"{threshold.flag}: expected a whole number")
        if threshold.ratio and not 0 < value <= 1:
            raise ValueError(f"{threshold.flag}: expected a share above 0 and at most 1")


def percent(text: str) -> str:
    """A ratio's text as a percentage: 0.10 -> 10%."""
    return format((Decimal(text) * 100).normalize(), "f") + "%"


def fill(template: str, values: Mapping[str, str]) -> str:
    """The template with every [[name]] replaced by its value ([[name%]] as a percentage)."""

    def value(match: re.Match[str]) -> str:
        name, as_percent = match.groups()
        if name not in values:
            raise KeyError(f"the template names [[{name}]], which has no value")
        return percent(values[name]) if as_percent else values[name]

    return PLACEHOLDER.sub(value, template)


def with_selector(expr: str, selector: str) -> str:
    """expr with `selector` added to every series selector in it."""

    def add(match: re.Match[str]) -> str:
        name, matchers = match.groups()
        inner = f"{selector}, {matchers}" if matchers and matchers.strip() else selector
        return f"{name}{{{inner}}}"

    return SERIES.sub(add, expr)


def select(text: str, selector: str) -> str:
    """A rule file's text with `selector` added to the series selectors of its expressions
    (`expr: ...` on one line, or the lines of an `expr: |` block), nothing else touched."""
    if not selector:
        return text
    out = []
    block: int | None = None  # the indentation of the `expr:` whose block we are in
    for line in text.splitlines(keepends=True):
        if block is not None:
            indent = len(line) - len(line.lstrip(" "))
            if not line.strip() or indent > block:
                out.append(with_selector(line, selector))
                continue
            block = None
        match = EXPR.match(line)
        if match and match.group(2).strip() in ("|", "|-", ">", ">-"):
            block = len(match.group(1))
            out.append(line)
        elif match:
            start = match.start(2)
            out.append(line[:start] + with_selector(line[start:], selector))
        else:
            out.append(line)
    return "".join(out)


def header(name: str, options: Options) -> str:
    """The lines that say where a rule file comes from, and with which options."""
    lines = [
        f"# Generated by prometheus/generate_rules.py from prometheus/templates/{name}",
        "# (docs/rules.md): change the template or the script's options, not this file.",
    ]
    flags = options.flags()
    if flags:
        lines.append(f"# Options: {shlex.join(flags)}")
    return "\n".join([*lines, "#"]) + "\n"


def render(options: Options | None = None) -> dict[str, str]:
    """Each rule file's text, by file name."""
    options = options or Options()
    check(options)
    values = options.values()
    changes = int(values["flapping_changes"])
    values |= {
        "job_selector": options.job_selector,
        # More than `changes` changes of up: down and back this many times, the last one
        # perhaps still down.
        "flapping_outages": str(changes // 2 + 1),
    }
    rendered = {}
    for name in FILES:
        text = fill((TEMPLATES / name).read_text(encoding="utf-8"), values)
        text = header(name, options) + select(text, options.selector)
        groups = yaml.safe_load(text)
        if not isinstance(groups, dict) or not groups.get("groups"):
            raise ValueError(f"{name}: the written file is not a rule file")
        rendered[name] = text
    return rendered


def stale(out_dir: Path, options: Options | None = None) -> list[str]:
    """The rule files in out_dir that differ from what render() gives, or are missing."""
    return [
        name
        for name, text in render(options).items()
        if not (out_dir / name).is_file() or (out_dir / name).read_text(encoding="utf-8") != text
    ]


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, Options]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the files in the output directory differ",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=RULES,
        help="where to write llm-alerts.yml and llm-recording.yml (default: prometheus/rules)",
    )
    parser.add_argument(
        "--job-selector",
        default=JOB_SELECTOR,
        help=f"label matchers of the exporters' `up` series, for LLMExporterDown "
        f"(default: {JOB_SELECTOR})",
    )
    parser.add_argument(
        "--selector",
        default="",
        help='label matchers added to every series of every rule, such as cluster="eu-1" '
        "(default: none)",
    )
    thresholds = parser.add_argument_group("thresholds")
    for threshold in THRESHOLDS:
        unit = ", a ratio from 0 to 1" if threshold.ratio else ""
        meaning = f"{threshold.alert}: {threshold.meaning}{unit} (default: {threshold.default})"
        thresholds.add_argument(
            threshold.flag,
            dest=threshold.name,
            default=threshold.default,
            metavar="N",
            help=meaning.replace("%", "%%"),  # argparse formats help with %
        )
    args = parser.parse_args(argv)
    options = Options(
        job_selector=args.job_selector,
        selector=args.selector,
        thresholds={t.name: getattr(args, t.name) for t in THRESHOLDS},
    )
    return args, options


def main(argv: Sequence[str] | None = None) -> int:
    args, options = parse(sys.argv[1:] if argv is None else argv)
    out_dir: Path = args.output_dir
    try:
        rendered = render(options)
    except ValueError as error:
        print(f"generate_rules.py: {error}", file=sys.stderr)
        return 2
    if args.check:
        differ = stale(out_dir, options)
        for name in differ:
            print(
                f"out of date: {out_dir / name} (run python prometheus/generate_rules.py)",
                file=sys.stderr,
            )
        return 1 if differ else 0
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        path = out_dir / name
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
