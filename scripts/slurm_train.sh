#!/usr/bin/env bash
# Multi-node training of one recipe under SLURM: one task per node, each task runs
# `make train`'s code (scripts/train.py) for the GPUs of its node.
#
#   sbatch --nodes=2 --gpus-per-node=8 scripts/slurm_train.sh finer_70b_r4
#   RECIPE=sentiment_r8 sbatch --nodes=4 --gpus-per-node=8 scripts/slurm_train.sh
#   GPUS_PER_NODE=4 RESUME=1 sbatch --nodes=2 scripts/slurm_train.sh xbrl_extract_70b_r4
#
# Run from the repository root after `make setup GPU=1`; the venv, recipes/ and data/
# must be on a filesystem every node sees.
#
# What it does: `make check` once, on the first node, before anything starts (a bad
# recipe fails in seconds, not on every node). Then on every node, with MACHINE_RANK
# (= SLURM_NODEID), MASTER_ADDR (the first node of the job) and MASTER_PORT exported,
# `scripts/train.py --gpus N --nodes M`, which launches `accelerate launch` with
# recipes/accelerate/multi_node.yaml, keeps the recipe's global batch by gradient
# accumulation, and gives each node its own prepared-data cache folder (`-nodeK`), so
# that no node deletes the cache another node is reading.
#SBATCH --job-name=finlora
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --output=outputs/slurm-%j.log

set -euo pipefail

die() { echo "slurm_train: error: $*" >&2; exit 2; }

RECIPE=${1:-${RECIPE:-}}
[ -n "$RECIPE" ] || die "usage: sbatch [--nodes=M --gpus-per-node=N] scripts/slurm_train.sh RECIPE"
RECIPE=${RECIPE%.yml}
RECIPE=${RECIPE#recipes/}
[ -f "recipes/$RECIPE.yml" ] || die "recipes/$RECIPE.yml does not exist (run from the repository root)"
NNODES=${SLURM_NNODES:-}
[ -n "$NNODES" ] || die "SLURM_NNODES is not set: run under sbatch (or srun)"
[ -n "${SLURM_JOB_NODELIST:-}" ] || die "SLURM_JOB_NODELIST is not set: run under sbatch (or srun)"

# GPUs per node: GPUS_PER_NODE, else SLURM's count for this node, else --gpus-per-node
# (SLURM writes it as "8" or "a100:8"). No guess: a wrong count breaks the rendezvous.
GPUS=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
if [ -z "$GPUS" ] && [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then
  GPUS=${SLURM_GPUS_PER_NODE##*:}
fi
[ -n "$GPUS" ] || die "cannot tell the GPUs per node: sbatch --gpus-per-node=N, or set GPUS_PER_NODE"
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "GPUs per node must be a positive integer, got '$GPUS'"

# Not `| head -n 1`: under pipefail, scontrol's SIGPIPE on a long node list fails the job.
HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${HOSTS%%$'\n'*}
[ -n "$MASTER_ADDR" ] || die "scontrol gave no hostname for SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
MASTER_PORT=${MASTER_PORT:-29500}
VENV_BIN=${VENV_BIN:-$PWD/.venv/bin}

export AXOLOTL_DO_NOT_TRACK=${AXOLOTL_DO_NOT_TRACK:-1}
export WANDB_MODE=${WANDB_MODE:-disabled}
export PATH="$VENV_BIN:$PATH"
export MASTER_ADDR MASTER_PORT

echo "slurm_train: recipe=recipes/$RECIPE.yml nodes=$NNODES gpus/node=$GPUS master=$MASTER_ADDR:$MASTER_PORT"

# Once, here: every node would otherwise check an output folder the first node has
# already started writing into.
make -s check RECIPE="$RECIPE" ${RESUME:+RESUME=1}

# srun starts one task per node; SLURM_NODEID (0..NNODES-1) is that node's rank.
# Single quotes: $SLURM_NODEID must expand on each node, not here.
export FINLORA_RECIPE=$RECIPE FINLORA_GPUS=$GPUS FINLORA_NNODES=$NNODES FINLORA_RESUME=${RESUME:+--resume}
srun --ntasks-per-node=1 bash -c '
  export MACHINE_RANK="$SLURM_NODEID"
  exec python scripts/train.py --no-check --gpus "$FINLORA_GPUS" --nodes "$FINLORA_NNODES" \
    $FINLORA_RESUME "$FINLORA_RECIPE"
'
