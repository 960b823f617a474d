"""llm-exporter: a Prometheus exporter for LLM inference servers."""

__version__ = "0.1.0"
