#!/usr/bin/env bash
# Pretrain on the GPUs of one machine with DeepSpeed (one process per GPU).
#
#   launch/single_node.sh recipes/t2i_160m_mom.yaml [key=value ...]
# runs exactly
#   deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" --module mom.train --config recipes/t2i_160m_mom.yaml [key=value ...]
#
# NUM_GPUS defaults to every visible GPU; MASTER_PORT to 29500. The global batch is
# NUM_GPUS x data.batch_size x train.grad_accum x data.seq_len tokens: scale train.grad_accum to keep it.
# Re-running the same command resumes from the run's latest checkpoint (train.resume: auto).
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: $0 RECIPE.yaml [key=value ...]" >&2
    exit 2
fi
config=$1
shift
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
if [[ "$NUM_GPUS" -lt 1 ]]; then
    echo "no GPU found: set NUM_GPUS, or train on CPU with: mom-train --config $config" >&2
    exit 2
fi
MASTER_PORT=${MASTER_PORT:-29500}
set -x
exec deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" --module mom.train --config "$config" "$@"
