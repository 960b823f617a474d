"""A small reader of the Prometheus text format, for providers that expose /metrics.

Only the series an adapter asks for are parsed, which keeps a 50 kB vLLM page
cheap to read; every other line is skipped without a regex.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from ..errors import FailureClass, ProviderError
from .base import HistogramData

_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?\s*$")
_LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_ESCAPES = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


@dataclass(frozen=True)
class Sample:
    """One sample line."""

    name: str
    labels: dict[str, str]
    value: float


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    return re.sub(r'\\[\\"n]', lambda m: _ESCAPES[m.group(0)], value)


def _parse_labels(text: str, endpoint: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        match = _LABEL_RE.match(text, pos)
        if match is None:
            raise ProviderError(
                FailureClass.INVALID_RESPONSE, "malformed labels in metrics", endpoint=endpoint
            )
        labels[match.group(1)] = _unescape(match.group(2))
        pos = match.end()
    return labels


def parse_samples(text: str, names: Collection[str], endpoint: str = "/metrics") -> list[Sample]:
    """The samples of the named series; ProviderError if one of those lines is malformed.

    Lines of other series are skipped unread, so a provider's odd line that nobody
    asked for does not cost the whole page.
    """
    samples = []
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        end = _name_end(line)
        if line[:end] not in names:
            continue
        match = _SAMPLE_RE.match(line)
        if match is None:
            raise ProviderError(
                FailureClass.INVALID_RESPONSE, "malformed sample in metrics", endpoint=endpoint
            )
        try:
            value = float(match.group(3))
        except ValueError:
            raise ProviderError(
                FailureClass.INVALID_RESPONSE, "non-numeric sample value", endpoint=endpoint
            ) from None
        labels = _parse_labels(match.group(2), endpoint) if match.group(2) else {}
        samples.append(Sample(match.group(1), labels, value))
    return samples


def _name_end(line: str) -> int:
    brace, space = line.find("{"), line.find(" ")
    candidates = [i for i in (brace, space) if i >= 0]
    return min(candidates) if candidates else len(line)


def histogram_names(name: str) -> tuple[str, str]:
    """The sample names a histogram's buckets and sum are read from."""
    return f"{name}_bucket", f"{name}_sum"


def sum_by(samples: Iterable[Sample], name: str, label: str) -> dict[str, float]:
    """Values of one metric summed per value of one label (e.g. per model over engines)."""
    totals: dict[str, float] = defaultdict(float)
    for sample in samples:
        if sample.name == name:
            totals[sample.labels.get(label, "")] += sample.value
    return dict(totals)


def sum_by_two(
    samples: Iterable[Sample], name: str, label: str, other: str
) -> dict[str, dict[str, float]]:
    """Values of one metric summed per (label, other) value pair."""
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for sample in samples:
        if sample.name == name:
            totals[sample.labels.get(label, "")][sample.labels.get(other, "")] += sample.value
    return {key: dict(values) for key, values in totals.items()}


def histograms_by(samples: Iterable[Sample], name: str, label: str) -> dict[str, HistogramData]:
    """A histogram's buckets and sum, merged per value of one label."""
    buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    sums: dict[str, float] = defaultdict(float)
    bucket_name, sum_name = histogram_names(name)
    for sample in samples:
        if sample.name == bucket_name:
            try:
                bound = float(sample.labels.get("le", ""))
            except ValueError:
                continue
            buckets[sample.labels.get(label, "")][bound] += sample.value
        elif sample.name == sum_name:
            sums[sample.labels.get(label, "")] += sample.value
    result = {}
    for key, by_bound in buckets.items():
        if math.inf not in by_bound:
            continue
        pairs = tuple(sorted(by_bound.items()))
        result[key] = HistogramData(buckets=pairs, sum=sums.get(key, 0.0))
    return result
