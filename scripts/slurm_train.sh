#!/usr/bin/env bash
# Multi-node training of one recipe under SLURM: one task per node, each task runs
# `accelerate launch` for the GPUs of its node.
#
#   sbatch --nodes=2 --gpus-per-node=8 scripts/slurm_train.sh llama31_70b_finer_70b_r4
#   RECIPE=sentiment_r8 sbatch --nodes=4 scripts/slurm_train.sh
#
# Run from the repository root after `make setup GPU=1`; the venv, recipes/ and data/
# must be on a filesystem every node sees.
#SBATCH --job-name=finlora
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --output=outputs/slurm-%j.log

set -euo pipefail

RECIPE=${1:-${RECIPE:?usage: sbatch scripts/slurm_train.sh RECIPE}}
RECIPE=${RECIPE%.yml}
RECIPE=${RECIPE#recipes/}
NNODES=${SLURM_NNODES:?run under sbatch/srun}
GPUS=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE##*:}}}
GPUS=${GPUS:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
VENV_BIN=${VENV_BIN:-$PWD/.venv/bin}

export AXOLOTL_DO_NOT_TRACK=${AXOLOTL_DO_NOT_TRACK:-1}
export WANDB_MODE=${WANDB_MODE:-disabled}
export PATH="$VENV_BIN:$PATH"

echo "slurm_train: recipe=recipes/$RECIPE.yml nodes=$NNODES gpus/node=$GPUS master=$MASTER_ADDR:$MASTER_PORT"

# srun starts one task per node; SLURM_NODEID (0..NNODES-1) is that node's rank.
# Single quotes: $SLURM_NODEID must expand on each node, not here.
srun --ntasks-per-node=1 bash -c '
  exec accelerate launch \
    --config_file recipes/accelerate/multi_node.yaml \
    --num_machines '"$NNODES"' \
    --num_processes '"$((NNODES * GPUS))"' \
    --machine_rank "$SLURM_NODEID" \
    --main_process_ip '"$MASTER_ADDR"' \
    --main_process_port '"$MASTER_PORT"' \
    -m axolotl.cli.train recipes/'"$RECIPE"'.yml
'
