#!/usr/bin/env bash
# The prepared GPU check for the device's H200 (issue 22 item 3): one `run` call, nothing
# fetched there, at most 10 minutes. NOT RUN YET: no GPU was lent to the session that wrote it.
#
#   here:   python3 -m benchmarks.gpu_wheels          # .whl/: the wheels the image lacks
#   device: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# docs/GPU_CHECK.md says what travels, why, and what the Python 3.12 proof on a CPU showed.
# Phases, the most valuable first; each has its own time limit, and starts only while the
# time left of BUDGET_S (default 560 s, from the script's start) holds its minimum:
#   0. environment (~30 s): nvidia-smi, .whl installed into /tmp/site, versions, imports
#      (axolotl.cli.train, finlora.axolotl_plugin, bitsandbytes on CUDA); stops here if any fails
#   1. ner_r8 at the full Llama-3.1-8B shape, random weights (benchmarks.gpu: 4 optimizer steps
#      of 8 x 8 rows of 512 tokens, 1 untimed): tokens/s, MFU, load and training peak memory,
#      then `make plan RECIPE=ner_r8` with that measurement beside it (limit 300 s)
#   2. `make smoke RECIPE=x` for ner_r8, ner_r4, ner_r8_bf16 on the CUDA stack (110 s each)
#   3. with what is left (>= 200 s): the same benchmark for ner_r4 (FinLoRA publishes its figure)
# PHASES="bench smoke more" (default) picks phases for a rerun, e.g. PHASES=smoke BUDGET_S=300.
# Files in $OUT (flat, at most 8): env.txt summary.txt bench_gpu.log bench_gpu.json plan.txt
# smoke.log bench_more.log bench_more.json. `make X` targets are run as the Makefile runs them
# (python scripts/X.py), since the image may have no make.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_check}
BUDGET_S=${BUDGET_S:-560}
PHASES=${PHASES:-bench smoke more}
START=$SECONDS
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
left() { echo $(( BUDGET_S - (SECONDS - START) )); }
say() { echo "gpu_check: $*" | tee -a "$OUT/summary.txt"; }
# limited SECONDS LOG CMD...: CMD under `timeout`, which leads its own process group; whatever the
# command leaves behind in that group (accelerate's and Axolotl's children) is killed after it.
limited() {
  local limit=$1 log=$2; shift 2
  timeout -k 10 "$limit" "$@" >>"$log" 2>&1 &
  local pid=$!
  wait $pid
  local rc=$?
  kill -KILL -- -$pid 2>/dev/null
  return $rc
}
: >"$OUT/summary.txt"

# 0. environment
(
  echo "gpu_check: $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo no-git)"
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader || echo "no nvidia-smi"
  df -h /tmp | tail -1
  ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/ (python3 -m benchmarks.gpu_wheels here, carry .whl)"; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
) >"$OUT/env.txt" 2>&1 || { cat "$OUT/env.txt"; exit 2; }
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"
"$PY" - >>"$OUT/env.txt" 2>&1 <<'EOF'
import importlib.metadata as md, sys, time
print("python", sys.version.split()[0], sys.executable)
for d in ("torch", "transformers", "accelerate", "huggingface_hub", "tokenizers", "safetensors", "peft", "axolotl",
          "bitsandbytes", "trl", "datasets", "pydantic", "triton", "numpy"):
    try:
        print(f"{d} {md.version(d)} {md.distribution(d).locate_file('')}")
    except md.PackageNotFoundError:
        print(f"{d} MISSING")
t = time.time()
import torch
import axolotl.cli.train, finlora.axolotl_plugin  # the train path's imports, as proven on Python 3.12 here
import bitsandbytes as bnb
from bitsandbytes.cextension import lib
print(f"imports ok in {time.time() - t:.1f} s; bitsandbytes loaded {getattr(getattr(lib, '_lib', None), '_name', lib)}")
print("cuda", torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
if not torch.cuda.is_available():
    sys.exit("no CUDA device")
try:  # reported, not fatal: the phases' own logs say more
    x = torch.randn(4, 64, device="cuda", dtype=torch.float16)
    y = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False).cuda()(x)
    print("bitsandbytes int8 matmul on CUDA:", tuple(y.shape), y.dtype)
except Exception as e:
    print(f"bitsandbytes int8 matmul on CUDA FAILED: {type(e).__name__}: {e}")
EOF
rc=$?
tail -4 "$OUT/env.txt" | tee -a "$OUT/summary.txt"
[ $rc -eq 0 ] || { say "environment incomplete (status $rc, see env.txt): stopping"; exit 2; }
status=0

# bench RECIPE LOG JSON LIMIT: benchmarks.gpu on the full-size model, then the plan beside it
bench() {
  local r=$1 log=$2 json=$3 limit=$4 t0=$SECONDS
  limited "$limit" "$log" "$PY" -m benchmarks.gpu --recipes "$r" --steps 4 --warmup 1 --timeout-s $(( limit - 30 )) \
    --workdir /tmp/bench_gpu_work --json "$json"
  local rc=$?
  say "benchmarks.gpu $r -> status $rc in $(( SECONDS - t0 )) s (limit $limit s)"
  [ $rc -eq 0 ] || status=1
  grep -v "it/s\]" "$log" | grep -E "^(==|   |bench_gpu|error)" | tee -a "$OUT/summary.txt"
  { echo "---- Axolotl's log of $r (progress bars left out)"
    tr '\r' '\n' </tmp/bench_gpu_work/$r/train.log | grep -vE "it/s\]|s/it\]" | tail -400; } >>"$log" 2>/dev/null
  { echo "==== make plan RECIPE=$r"; "$PY" scripts/plan.py "$r" $( [ -s "$json" ] && echo --measured "$json" ); } \
    >>"$OUT/plan.txt" 2>&1
}

# 1. the most valuable figure: ner_r8 at full size
case " $PHASES " in *" bench "*)
  l=$(( $(left) - 10 )); [ $l -gt 300 ] && l=300
  if [ $l -ge 120 ]; then bench ner_r8 "$OUT/bench_gpu.log" "$OUT/bench_gpu.json" $l
  else say "only $(left) s left: ner_r8 benchmark skipped"; status=1; fi ;;
esac

# 2. smokes: tiny random model of each recipe's architecture through make train/merge/eval's code
case " $PHASES " in *" smoke "*)
  for r in ner_r8 ner_r4 ner_r8_bf16; do
    l=$(( $(left) - 5 )); [ $l -gt 110 ] && l=110
    if [ $l -lt 60 ]; then say "only $(left) s left: smoke $r skipped"; status=1; continue; fi
    t0=$SECONDS
    echo "==== make smoke RECIPE=$r (limit $l s)" >>"$OUT/smoke.log"
    limited $l "$OUT/smoke.log" "$PY" scripts/smoke.py $r
    rc=$?
    say "make smoke RECIPE=$r -> status $rc in $(( SECONDS - t0 )) s"
    [ $rc -eq 0 ] || status=1
  done
  grep -E "^(smoke: (ner|trained|PASS)|error)" "$OUT/smoke.log" | tee -a "$OUT/summary.txt" ;;
esac

# 3. with what is left: the 4-bit recipe at full size
case " $PHASES " in *" more "*)
  l=$(( $(left) - 10 ))
  if [ $l -ge 200 ]; then bench ner_r4 "$OUT/bench_more.log" "$OUT/bench_more.json" $l
  else say "$(left) s left: ner_r4 benchmark not started (needs 200 s)"; fi ;;
esac
rm -rf /tmp/bench_gpu_work
say "done in $(( SECONDS - START )) s, status $status"
exit $status
