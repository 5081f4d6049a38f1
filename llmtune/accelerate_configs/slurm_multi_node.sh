#!/bin/bash
# Multi-node llmtune training under Slurm: one task per node, each running `accelerate launch` for its GPUs.
#   sbatch accelerate_configs/slurm_multi_node.sh recipes/smollm2_alpaca_lora.yaml training.global_batch_size=256
# Rendezvous: the first node of the allocation is the main process; every node gets its rank from SLURM_NODEID.
#SBATCH --job-name=llmtune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # accelerate starts one process per GPU itself
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --output=%x-%j.log
#SBATCH --signal=TERM@120             # SIGTERM 2 min before the time limit: llmtune saves a checkpoint, exits 143
set -euo pipefail

GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
MAIN_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
CONFIG=${CONFIG:-accelerate_configs/multi_node.yaml}   # or fsdp.yaml / deepspeed_zero3.yaml

# On that SIGTERM, torchrun gives the training processes this long to save a checkpoint (its default is 30 s).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-110}

# Each node's `accelerate launch` overrides the config's node-specific fields from the Slurm environment.
srun --kill-on-bad-exit=1 bash -c "accelerate launch --config_file $CONFIG \
  --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID --main_process_ip $MAIN_NODE --main_process_port $MAIN_PORT \
  --rdzv_backend static --same_network \
  -m llmtune train $*"
