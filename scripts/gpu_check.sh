#!/usr/bin/env bash
# One prepared GPU check, at most 8 minutes on one H200 (issue 14, item 7). NOT RUN YET: no
# GPU was lent to the session that wrote it.
#
#   OUT=/some/folder bash scripts/gpu_check.sh
#
# 1. `make smoke RECIPE=x` for ner_r8, ner_r4, ner_r8_bf16 on the real CUDA stack (tiny random
#    model of the recipe's architecture, Axolotl's trainer, merge and eval).
# 2. benchmarks/gpu.py on the full-size Llama 3.1 8B architecture (random weights), the same
#    three recipes: tokens/s, MFU, load and training peak memory beside `make plan`.
# 3. `make plan` for each recipe with the benchmark's JSON: planned beside measured.
# Everything it reports is written under $OUT (flat: log files and bench_gpu.json).
#
# Python: $PY, else .venv/bin/python, else python3. Packages missing from the machine's image
# (Axolotl, bitsandbytes, ...) can travel as wheels in ./.whl (see the device notes); they
# are installed into /tmp/site first. Each phase has its own time limit so that a hang in one
# still leaves the others' figures.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
START=$(date +%s)
export HF_HUB_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}
# The Makefile runs $(BIN)/python: point BIN at the folder of the interpreter chosen here (a
# venv's bin/ has `python`; a symlink to it elsewhere could lose the venv).
BIN=$(cd "$(dirname "$(command -v "$PY")")" && pwd)
if [ ! -x "$BIN/python" ]; then
  BIN=$(mktemp -d) && ln -s "$(command -v python3)" "$BIN/python"
fi
MAKE_ARGS=(-o .venv/.installed "BIN=$BIN")

{
  echo "gpu_check: $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
missing = []
for m in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "axolotl", "datasets"):
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '?')}")
    except Exception as e:  # any import failure is what this check must report
        missing.append(f"{m} ({type(e).__name__}: {e})")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
if not torch.cuda.is_available():
    missing.append("a CUDA device")
if missing:
    print("missing: " + "; ".join(missing))
    sys.exit(2)
EOF
} 2>&1 | tee "$OUT/env.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_check: environment incomplete (see env.txt); stopping"; exit 2; }

status=0
# 1. smoke: ~70 s each (Axolotl start-up, 2-3 steps of a tiny model, merge, eval)
for r in ner_r8 ner_r4 ner_r8_bf16; do
  t0=$(date +%s)
  timeout 100 make "${MAKE_ARGS[@]}" smoke RECIPE=$r >"$OUT/smoke_$r.log" 2>&1
  rc=$?
  echo "gpu_check: make smoke RECIPE=$r -> status $rc in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || status=1
done

# 2. benchmark with what is left of 8 minutes (minus 30 s for step 3)
left=$(( 480 - ($(date +%s) - START) - 30 ))
if [ $left -lt 120 ]; then
  echo "gpu_check: only $left s left: benchmark skipped" | tee -a "$OUT/summary.txt"
  exit 1
fi
timeout $left "$PY" -m benchmarks.gpu --task ner --steps 8 --warmup 2 --timeout-s $(( left / 3 )) \
  --workdir /tmp/bench_gpu_work --json "$OUT/bench_gpu.json" >"$OUT/bench_gpu.log" 2>&1
rc=$?
echo "gpu_check: bench_gpu -> status $rc" | tee -a "$OUT/summary.txt"
[ $rc -eq 0 ] || status=1
grep -v "it/s\]" "$OUT/bench_gpu.log" | grep -E "^(==|   |bench_gpu|error)" >>"$OUT/summary.txt"

# 3. the plan with the measurements beside it
if [ -s "$OUT/bench_gpu.json" ]; then
  for r in ner_r8 ner_r4 ner_r8_bf16; do
    "$PY" scripts/plan.py $r --measured "$OUT/bench_gpu.json"
  done >"$OUT/plan.txt" 2>&1
fi
echo "gpu_check: done in $(( $(date +%s) - START )) s, status $status" | tee -a "$OUT/summary.txt"
exit $status
