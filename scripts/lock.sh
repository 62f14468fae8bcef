#!/usr/bin/env bash
# Write requirements.lock: the exact versions of every package in the set-up environment except torch
# (installed first by scripts/setup.sh, and a user's own CUDA build stays alone) and dpogen itself.
# Run after changing pyproject.toml's dependencies: ./scripts/setup.sh && ./scripts/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${VIRTUAL_ENV:-.venv}/bin/python"
{
  echo "# Exact versions scripts/setup.sh installs (pip constraints; torch is installed first, on its own)."
  echo "# Made by scripts/lock.sh with $("$PY" --version) on $(date -u +%Y-%m-%d)."
  "$PY" -m pip freeze --exclude-editable | grep -viE '^(torch|nvidia-|triton)' | sort -f
} > requirements.lock
echo "requirements.lock: $(grep -vc '^#' requirements.lock) packages"
