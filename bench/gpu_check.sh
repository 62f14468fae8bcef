#!/usr/bin/env bash
# dpogen GPU check: one prepared run for a single-GPU machine with no network (under 8 minutes).
#
# What it runs (bench/gpu_check.py holds the parts; each part is its own process with its own timeout):
#   SmolLM2-135M's architecture with seeded random weights (LlamaConfig, save_pretrained, a BPE tokenizer
#   trained here on dpogen's synthetic persona text), persona data K = 2, batch 16, beta 0.1, AdamW 1e-5:
#   1. dpogen full DPO, bf16 (dpo.autocast: bfloat16, fp32 master weights), FSDP2 on one process
#      (torchrun --nproc_per_node 1, so the engine wraps with fully_shard), 30 steps; its reference pass first,
#      wrapped and cast the same way;
#   2. TRL's DPOTrainer, same model, data, batch, beta, lr, clipping, bf16=True, precompute_ref_log_probs;
#   3. dpogen as 1 in fp32 (its own fp32 reference pass).
#   The summary prints pairs/s and peak GPU memory (torch.cuda.max_memory_allocated, per process) of each,
#   the largest |margin| difference between the bf16 and fp32 dpogen runs, and the step-0 margins, which must
#   be exactly 0 (the script exits 1 if not).
#
# What the GPU machine must have: python3 (3.12) with PyTorch (CUDA), transformers, accelerate, peft, pandas,
# pyarrow. Everything else travels as wheels in bench/wheels/ (git-ignored): trl, datasets and the pure-Python
# dependencies the image lacks, and dpogen itself. Build that folder on a networked machine (here), from the
# repository root, after any change to src/:
#
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh --build-wheels   # a Python with setuptools
#
# which runs (W = bench/wheels; a second datasets release is kept for a machine whose pyarrow < 24 or
# huggingface-hub < 1.31, and fsspec for one whose fsspec is newer than datasets accepts; pip picks):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d W \
#       trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.2.0
#   python3 -m pip download (the same options) -d W datasets==4.8.4
#   python3 -m pip wheel --no-deps --no-build-isolation -w W .        # dpogen-0.1.0-py3-none-any.whl
#
# On the GPU machine the script picks, from W alone, the wheels that what is installed does not already
# satisfy (gpu_check.py pick-wheels: an installed version that meets a requirement is kept, else the newest
# wheel of W that does), installs just those with pip --no-index --no-deps into $WORK/site-packages
# (nothing in the machine's own environment changes) and puts that first on PYTHONPATH; dpogen is always
# installed from its wheel, and the summary warns if that wheel differs from src/.
#
# Usage:
#   bash bench/gpu_check.sh                        # on the GPU machine; with the device tool: carry ["bench/wheels"]
#   bash bench/gpu_check.sh --cpu --steps 2 --q 8 --test 4   # dry run of the same code paths, CPU, fp32
# Options: --steps N (30), --q N (32 train pairs per cluster), --test N (24), --cpu, --cpu-bf16 (dry run in bf16),
#   --budget S (450: seconds for all parts together), --work DIR ($WORK or /tmp/dpogen-gpu-check).
# Results: $WORK/summary.txt, results.json, log.txt; copied to $OUT when OUT is set (the device tool's folder).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-bench/wheels}
WORK=${WORK:-/tmp/dpogen-gpu-check}
STEPS=30 Q=32 TEST=24 BUDGET=450 CPU=() BUILD=0
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) STEPS=$2; shift 2 ;;
    --q) Q=$2; shift 2 ;;
    --test) TEST=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --cpu) CPU+=(--cpu); shift ;;
    --cpu-bf16) CPU+=(--cpu --cpu-bf16); shift ;;
    --build-wheels) BUILD=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

if [ "$BUILD" = 1 ]; then
  opts=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS")
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  $PY -m pip download -q "${opts[@]}" trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.2.0
  $PY -m pip download -q "${opts[@]}" datasets==4.8.4
  $PY -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" .
  rm -rf build src/*.egg-info
  ls -l "$WHEELS"; du -sh "$WHEELS"
  exit 0
fi

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
[ ${#CPU[@]} -gt 0 ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} CUDA_VISIBLE_DEVICES=""
rm -rf "$WORK" && mkdir -p "$WORK"
LOG=$WORK/log.txt
START=$SECONDS
FAILED=()
echo "dpogen GPU check: $(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null || echo '?'), work $WORK" | tee "$LOG"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG" || true

# run_part SECONDS NAME CMD...: a part with a timeout (never past the budget); a failure is recorded, not fatal
run_part() {
  local secs=$1 name=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  [ "$left" -lt "$secs" ] && secs=$left
  if [ "$secs" -lt 10 ]; then echo "=== $name: SKIPPED (budget of ${BUDGET}s spent)" | tee -a "$LOG"; FAILED+=("$name"); return 0; fi
  echo "=== $name (timeout ${secs}s) $(date -u +%T)" | tee -a "$LOG"
  local t0=$SECONDS
  if timeout --kill-after=15 "$secs" "$@" >>"$LOG" 2>&1; then
    echo "=== $name: ok in $((SECONDS - t0))s" | tee -a "$LOG"
  else
    local rc=$?
    echo "=== $name: FAILED (exit $rc$([ $rc -eq 124 ] && echo ', timed out')) after $((SECONDS - t0))s; last lines:" | tee -a "$LOG"
    tail -n 25 "$LOG" | sed 's/^/    /'
    FAILED+=("$name")
  fi
}

# --- 1. install what is missing, from the wheel dir only
install() {
  set -euo pipefail
  local site=$WORK/site-packages  # named so: dill (datasets' hashing) pickles by value any module outside
                                  # sys.prefix whose path lacks "site-packages", which can fail
  mkdir -p "$site"
  ls "$WHEELS"/dpogen-*.whl >/dev/null 2>&1 || { echo "no dpogen wheel in $WHEELS: build it (--build-wheels)"; return 1; }
  local files
  if ! files=$($PY bench/gpu_check.py pick-wheels "$WHEELS" "trl==1.16.0" "datasets>=4.7"); then
    echo "could not match the wheels to this environment; installing the newest of each, no deps"
    files=$(ls "$WHEELS"/trl-*.whl "$WHEELS"/datasets-5*.whl "$WHEELS"/dill-*.whl "$WHEELS"/multiprocess-*.whl)
  fi
  echo "from the wheel dir: ${files:-nothing (trl and datasets already there)}"
  # shellcheck disable=SC2086
  [ -z "$files" ] || $PY -m pip install -q --no-index --no-deps --no-compile --target "$site" $files
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$site" --upgrade "$WHEELS"/dpogen-*.whl
}
export PY WHEELS WORK
export -f install
run_part 120 install bash -c install
export PYTHONPATH=$WORK/site-packages${PYTHONPATH:+:$PYTHONPATH}
$PY - >>"$LOG" 2>&1 <<'EOF' || true
import importlib, sys
print("python", sys.version.split()[0])
for m in ("torch", "transformers", "accelerate", "peft", "pandas", "pyarrow", "datasets", "trl", "dpogen"):
    try:
        x = importlib.import_module(m)
        print(f"  {m} {getattr(x, '__version__', '?')} {getattr(x, '__file__', '')}")
    except Exception as e:
        print(f"  {m} NOT IMPORTABLE: {e!r}")
EOF

# --- 2. the runs
G=(bench/gpu_check.py --work "$WORK" --steps "$STEPS" --q "$Q" --test "$TEST" "${CPU[@]}")
TR=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1)
run_part 150 build "$PY" "${G[@]}" build
run_part 120 ref-bf16 "${TR[@]}" "${G[@]}" ref --precision bf16
run_part 180 dpo-bf16 "${TR[@]}" "${G[@]}" dpo --precision bf16
run_part 240 trl-bf16 "$PY" "${G[@]}" trl --precision bf16
run_part 120 ref-fp32 "${TR[@]}" "${G[@]}" ref --precision fp32
run_part 180 dpo-fp32 "${TR[@]}" "${G[@]}" dpo --precision fp32

# --- 3. summary
set +e
$PY bench/gpu_check.py summary --work "$WORK" "${CPU[@]}"
rc=$?
set -e
$PY -c 'import json, pathlib, sys
w = pathlib.Path(sys.argv[1])
json.dump({p.stem[7:]: json.loads(p.read_text()) for p in sorted(w.glob("result-*.json"))}, open(w / "results.json", "w"), indent=1)' "$WORK" || true
echo "parts failed: ${FAILED[*]:-none}; total $((SECONDS - START))s" | tee -a "$WORK/summary.txt"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT" && cp "$WORK/summary.txt" "$WORK/log.txt" "$OUT/" && cp "$WORK/results.json" "$OUT/" 2>/dev/null || true
fi
[ ${#FAILED[@]} -eq 0 ] && [ $rc -eq 0 ]
