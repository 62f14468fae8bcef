#!/usr/bin/env bash
# Set up dpogen's Python environment: .venv in the repository (or the active virtualenv), torch first.
# - If torch already imports (a user's own CUDA build, say), it is left alone.
# - Otherwise torch==${DPOGEN_TORCH:-2.13.0} is installed before anything else, so no other requirement
#   can pull a multi-GB CUDA build. Everything else at the exact versions of requirements.lock
#   (scripts/lock.sh writes it). On a CPU-only machine without a local wheel, point pip at the CPU
#   index first: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${VIRTUAL_ENV:-}" ]; then
  PY="$VIRTUAL_ENV/bin/python"
else
  [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
  PY=.venv/bin/python
fi
stamp="$(dirname "$(dirname "$PY")")/.dpogen-setup"
want="$(cat pyproject.toml requirements.lock scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0  # already set up for this pyproject.toml (works offline from here on)
fi
"$PY" -m pip install -q --upgrade pip
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${DPOGEN_TORCH:-2.13.0}"
fi
# the exact versions of requirements.lock (DPOGEN_UNLOCKED=1: the newest pyproject.toml allows)
lock=(-c requirements.lock)
[ "${DPOGEN_UNLOCKED:-0}" = 1 ] && lock=()
"$PY" -m pip install -q "${lock[@]}" -e ".[test]"
echo "$want" > "$stamp"
