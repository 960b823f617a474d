"""The parsers of what providers send: any bytes in, a classified failure or a bounded,
sanitized result out, never another exception."""

from __future__ import annotations

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.client import Reply, _parse
from exporter.errors import ProviderError
from exporter.providers import llamacpp, lmstudio, ollama, openai, tgi
from exporter.providers.base import HistogramData, served_models, version_field
from exporter.providers.promtext import histograms_by, parse_samples

# Lines that look like the text format, so that the property reaches the parser's depths,
# mixed with anything at all.
NAMES = st.sampled_from(
    [
        "vllm:num_requests_running",
        "vllm:time_to_first_token_seconds_bucket",
        "llamacpp:requests_processing",
    ]
)
VALUES = st.sampled_from(
    ["1", "-1", "NaN", "+Inf", "-Inf", "1e400", "1_000", "0x10", "", " 2", "3.5"]
)
LABELS = st.lists(
    st.tuples(st.sampled_from(["le", "model_name", "engine", "9bad"]), st.text(max_size=8)),
    max_size=3,
)
LINE = st.one_of(
    st.builds(
        lambda name, labels, value: (
            name
            + ("{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else "")
            + " "
            + value
        ),
        NAMES,
        LABELS,
        VALUES,
    ),
    st.text(max_size=40),
)
PAGE = st.lists(LINE, max_size=30).map("\n".join)
WANTED = {
    "vllm:num_requests_running",
    "vllm:time_to_first_token_seconds_bucket",
    "llamacpp:requests_processing",
}


@settings(max_examples=300, deadline=None)
@given(PAGE)
def test_prometheus_text_gives_finite_non_negative_samples_or_a_classified_failure(
    page: str,
) -> None:
    try:
        samples = parse_samples(page, WANTED)
    except ProviderError as exc:
        assert exc.failure.value == "invalid_response"
        return
    for sample in samples:
        assert math.isfinite(sample.value) and sample.value >= 0
    for histogram in histograms_by(
        samples, "vllm:time_to_first_token_seconds", "model_name"
    ).values():
        assert_sound(histogram)


def assert_sound(histogram: HistogramData) -> None:
    bounds = [bound for bound, _ in histogram.buckets]
    counts = [count for _, count in histogram.buckets]
    assert bounds == sorted(bounds) and bounds[-1] == math.inf
    assert not any(math.isnan(bound) for bound in bounds)
    assert counts == sorted(counts)


JSON_ATOMS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10)
)
JSON = st.recursive(
    JSON_ATOMS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.sampled_from(
                [
                    *("data", "models", "id", "name", "meta", "size", "version", "details"),
                    *("status", "key", "loaded_instances", "error"),
                    *("model_id", "max_model_len", "max_total_tokens"),
                ]
            ),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=20,
)
PARSERS = [
    ("/v1/models", llamacpp._listing()),
    ("/models", llamacpp._listing(100)),
    ("/slots", llamacpp._slots),
    ("/api/tags", ollama._models(loaded=False)),
    ("/api/ps", ollama._models(loaded=True)),
    ("/api/ps", ollama._states),
    ("/api/version", ollama._version),
    ("/models", openai._models),
    ("/v1/models", served_models),
    ("/version", version_field),
    ("/api/v1/models", lmstudio._v1_models),
    ("/api/v0/models", lmstudio._v0_models),
    ("/api/v1/models/load", lmstudio._done("load")),
    ("/info", tgi._info),
]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), JSON.map(lambda v: json.dumps(v).encode())))
def test_json_endpoints_give_a_value_or_a_classified_failure(body: bytes) -> None:
    for endpoint, parse in PARSERS:
        reply = Reply(endpoint, 200, body, "application/json", 0.01)
        try:
            _parse(reply, parse)
        except ProviderError as exc:
            assert exc.failure.value == "invalid_response"
            assert exc.endpoint == endpoint


def test_a_json_bomb_is_a_classified_failure() -> None:
    bomb = b"[" * 200_000 + b"]" * 200_000
    for endpoint, parse in PARSERS:
        try:
            _parse(Reply(endpoint, 200, bomb, "application/json", 0.01), parse)
        except ProviderError as exc:
            assert exc.failure.value == "invalid_response"
            assert "nested too deeply" in exc.message
        else:
            raise AssertionError(f"{endpoint} took a JSON bomb")
