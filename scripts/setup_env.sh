#!/usr/bin/env bash
# Create (first use) or reuse the project's virtual environment .venv at the repository root.
# Sourced by run_all.sh and run_tests.sh. torch==2.13.0 is installed first, on its own, so that
# nothing pulls a newer (CUDA) torch. Re-installs when requirements.txt or pyproject.toml change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
STAMP="$VENV/.invariscope-installed"
want="$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing dependencies into $VENV (first use or requirements changed)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q torch==2.13.0
  "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.txt"
  # The authors' package, only for the checkpoint-compatibility test; its own deps are not needed.
  "$VENV/bin/python" -m pip install -q --no-deps ldct-benchmark==0.0.15
  "$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
