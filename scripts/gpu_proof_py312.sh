#!/usr/bin/env bash
# Not part of CI or `make test`: run by hand before a GPU check (results: docs/GPU_CHECK.md).
#
#   python3 -m benchmarks.gpu_wheels && bash scripts/gpu_proof_py312.sh
#
# The H200 image's Python 3.12 stack, emulated on this CPU: a virtual env ($VENV, outside the
# repository) holding only packages that the image lists (/work/.library/device/KINDS.md), at
# the image's versions where they are known (torch 2.11.0 cu130 from PyPI, transformers 5.17.0,
# accelerate 1.15.0, huggingface_hub 1.33.0, ...), the rest at PyPI's newest; the wheels of
# .whl/ go to /tmp/site312 with --no-index --no-deps and come first on PYTHONPATH, exactly as
# scripts/gpu_check.sh installs them there. Then, each with its own time limit:
#   1. import axolotl.cli.train, finlora.axolotl_plugin (and print the versions)
#   2. python -m benchmarks.gpu --cpu --recipes ner_r8: Axolotl's trainer, 2 steps, tiny model
#   3. make smoke RECIPE=ner_r8 (the Makefile with BIN=$VENV/bin)
# Logs under $LOG.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/work/venv312}
PY312=${PY312:-python3.12}
LOG=${LOG:-outputs/gpu_proof_py312}
SITE=/tmp/site312
# In the image, versions known (KINDS.md's pip list row)
PINNED="torch==2.11.0 triton==3.6.0 numpy==2.5.2 transformers==5.17.0 accelerate==1.15.0 huggingface-hub==1.33.0
  safetensors==0.8.0 tokenizers==0.23.2 sentencepiece==0.2.2 tiktoken==0.14.0"
# In the image, version not known: the names there that Axolotl 0.19's lock (constraints.txt) also holds
UNPINNED="absl-py aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi charset-normalizer
  click cloudpickle colorama contourpy cycler einops filelock fonttools frozenlist fsspec grpcio h11 hf-xet httpcore
  httpx idna iniconfig jinja2 joblib kiwisolver llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl
  mpmath multidict narwhals networkx numba nvidia-ml-py packaging pandas pillow pluggy portalocker propcache protobuf
  psutil pyarrow pygments pyparsing pytest python-dateutil pyyaml regex requests rich sacrebleu scikit-learn scipy
  shellingham six sympy tabulate tensorboard tensorboard-data-server threadpoolctl tqdm typer typing-extensions
  urllib3 werkzeug wrapt xxhash yarl"
# Pulled in here by typer/python-dateutil's newest releases, but not in the image's list: removed
NOT_IN_IMAGE="pydantic pydantic_core annotated-types typing-inspection tzdata"

ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/: python3 -m benchmarks.gpu_wheels first"; exit 2; }
mkdir -p "$LOG"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY312" -m venv "$VENV" && "$VENV/bin/pip" install -q $PINNED $UNPINNED \
    && "$VENV/bin/pip" uninstall -y -q $NOT_IN_IMAGE || exit 1
fi
"$VENV/bin/pip" freeze >"$LOG/venv_freeze.txt"
rm -rf "$SITE"
"$VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
export PYTHONPATH="$SITE:$PWD" PATH="$SITE/bin:$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
status=0
step() {  # step NAME SECONDS COMMAND...: run with a limit, log, one summary line
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$LOG/$name.log" 2>&1
  local rc=$?
  echo "gpu_proof_py312: $name -> status $rc in $(( SECONDS - t0 )) s (limit $limit s; log $LOG/$name.log)" | tee -a "$LOG/summary.txt"
  [ $rc -eq 0 ] || status=1
}
: >"$LOG/summary.txt"
"$VENV/bin/python" -c "import sys, platform; print('python', sys.version.split()[0], platform.machine())" | tee -a "$LOG/summary.txt"
step imports 300 "$VENV/bin/python" -c "
import importlib.metadata as md, time
t = time.time()
import axolotl.cli.train, finlora.axolotl_plugin, bitsandbytes, torch
print(f'import axolotl.cli.train, finlora.axolotl_plugin, bitsandbytes: ok in {time.time() - t:.1f} s')
for d in ('torch', 'transformers', 'accelerate', 'huggingface_hub', 'tokenizers', 'safetensors', 'peft',
          'axolotl', 'bitsandbytes', 'trl', 'datasets', 'pydantic', 'wandb'):
    print(d, md.version(d), md.distribution(d).locate_file(''))
print('cuda available:', torch.cuda.is_available())"
step bench_cpu_ner_r8 900 "$VENV/bin/python" -m benchmarks.gpu --cpu --recipes ner_r8 --workdir /tmp/gpu_proof_bench \
  --json "$LOG/bench_gpu_cpu.json"
step smoke_ner_r8 1200 make -o .venv/.installed BIN="$VENV/bin" smoke RECIPE=ner_r8
grep -hE "^(import|python|torch|transformers|accelerate|peft|axolotl|bitsandbytes|==|   [0-9]|smoke: |error)" \
  "$LOG/imports.log" "$LOG/bench_cpu_ner_r8.log" "$LOG/smoke_ner_r8.log" | grep -v "it/s\]" >>"$LOG/summary.txt"
echo "gpu_proof_py312: status $status" | tee -a "$LOG/summary.txt"
exit $status
