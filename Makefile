# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VLLM_VENV := .venv-vllm
LINTED := exporter tests scripts bench grafana

.PHONY: run test lint typecheck pytest system-deps vllm bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## run: start a real llama.cpp server with a tiny generated model and the exporter scraping it
run: $(STAMP)
	$(BIN)/python scripts/demo.py

## test: install what the tests need, then lint, type-check and run every test
test: $(STAMP) system-deps vllm lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

typecheck: $(STAMP)
	$(BIN)/mypy exporter grafana/dashboards.py

pytest: $(STAMP)
	$(BIN)/pytest

# promtool checks the exposition and the rules; Prometheus and Alertmanager run in the bundle tests.
system-deps:
	@if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus-alertmanager >/dev/null 2>&1 \
		|| ! command -v amtool >/dev/null 2>&1; then \
		echo "installing Debian packages prometheus prometheus-alertmanager"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq prometheus prometheus-alertmanager >/dev/null; \
	fi

# A real vLLM (CPU build) in a venv of its own, for the vLLM adapter's tests.
vllm:
	VLLM_VENV=$(VLLM_VENV) bash scripts/install_vllm.sh

bench: $(STAMP)
	$(BIN)/python bench/scrape.py
	$(BIN)/python bench/probes.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .cache .pytest_cache .mypy_cache .ruff_cache
