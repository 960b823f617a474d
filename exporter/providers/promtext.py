"""A small reader of the Prometheus text format, for providers that expose /metrics.

Only the series an adapter asks for are parsed, which keeps a 50 kB vLLM page
cheap to read; every other line is skipped without a regex.
"""

from __future__ import annotations

import itertools
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
# A sample value as the text format writes it: Python's float() also takes "1_000",
# " 1" and "infinity", which no exposition writes.
_VALUE_RE = re.compile(r"^[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|Inf|inf|NaN|nan)$")


@dataclass(frozen=True, slots=True)
class Sample:
    """One sample line."""

    name: str
    labels: dict[str, str]
    value: float


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    return re.sub(r'\\[\\"n]', lambda m: _ESCAPES[m.group(0)], value)


def _parse_labels(text: str, endpoint: str, seen: dict[str, str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        match = _LABEL_RE.match(text, pos)
        if match is None:
            raise ProviderError(
                FailureClass.INVALID_RESPONSE, "malformed labels in metrics", endpoint=endpoint
            )
        # One string object per distinct name and value: a page repeats them thousands of times.
        name, value = match.group(1), _unescape(match.group(2))
        labels[seen.setdefault(name, name)] = seen.setdefault(value, value)
        pos = match.end()
    return labels


def parse_samples(text: str, names: Collection[str], endpoint: str = "/metrics") -> list[Sample]:
    """The samples of the named series; ProviderError if one of those lines is malformed.

    Lines of other series are skipped unread, so a provider's odd line that nobody
    asked for does not cost the whole page.
    """
    samples = []
    seen: dict[str, str] = {}
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
        if not _VALUE_RE.match(match.group(3)):
            raise ProviderError(
                FailureClass.INVALID_RESPONSE, "non-numeric sample value", endpoint=endpoint
            )
        value = float(match.group(3))
        # The same rule as for JSON numbers: every series read here is a count, a size, a
        # duration or a ratio, so NaN, infinities and negatives are no value at all.
        if not 0 <= value < math.inf:
            continue
        labels = _parse_labels(match.group(2), endpoint, seen) if match.group(2) else {}
        samples.append(Sample(seen.setdefault(match.group(1), match.group(1)), labels, value))
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
    """A histogram's buckets and sum, merged per value of one label.

    A histogram with a bound that is not a number, without +Inf, or whose cumulative
    counts go down is left out: it cannot be drawn or compared honestly.
    """
    buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    sums: dict[str, float] = defaultdict(float)
    broken: set[str] = set()
    bucket_name, sum_name = histogram_names(name)
    for sample in samples:
        key = sample.labels.get(label, "")
        if sample.name == bucket_name:
            bound = _bound(sample.labels.get("le", ""))
            if bound is None:
                broken.add(key)
                continue
            buckets[key][bound] += sample.value
        elif sample.name == sum_name:
            sums[key] += sample.value
    result = {}
    for key, by_bound in buckets.items():
        if key in broken or math.inf not in by_bound:
            continue
        pairs = tuple(sorted(by_bound.items()))
        if any(later[1] < earlier[1] for earlier, later in itertools.pairwise(pairs)):
            continue
        result[key] = HistogramData(buckets=pairs, sum=sums.get(key, 0.0))
    return result


def _bound(text: str) -> float | None:
    if not _VALUE_RE.match(text):
        return None
    bound = float(text)
    return None if math.isnan(bound) else bound
