#!/usr/bin/env bash
# Pretrain on the GPUs of one machine with DeepSpeed (one process per GPU).
#
#   launch/single_node.sh [--dry-run] recipes/t2i_160m_mom.yaml [key=value ...]
# runs exactly
#   deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" --module mom.train --config recipes/t2i_160m_mom.yaml [key=value ...]
#
# NUM_GPUS defaults to every visible GPU (nvidia-smi); MASTER_PORT to 29500. The global batch is
# NUM_GPUS x data.batch_size x train.grad_accum x data.seq_len tokens: scale train.grad_accum to keep it.
# Re-running the same command resumes from the run's latest checkpoint (train.resume: auto).
# --dry-run prints the command and each rank's environment (as DeepSpeed's launcher sets it) and starts nothing.
# Every error says what was about to run and why it cannot, on one line, with exit code 2.
set -euo pipefail
prog=$(basename "$0")
fail() { echo "$prog: error: $*" >&2; exit 2; }
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
if [[ $# -lt 1 ]]; then
    echo "usage: [NUM_GPUS=N] [MASTER_PORT=P] $0 [--dry-run] RECIPE.yaml [key=value ...]" >&2
    exit 2
fi
config=$1
shift
[[ -f "$config" ]] || fail "recipe $config not found"
if [[ -z "${NUM_GPUS:-}" ]]; then
    command -v nvidia-smi >/dev/null 2>&1 || fail "cannot count the GPUs: nvidia-smi not found (no NVIDIA driver here)." \
        "Set NUM_GPUS=N to launch anyway, or train on CPU with: mom-train --config $config"
    NUM_GPUS=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)
fi
[[ "$NUM_GPUS" =~ ^[0-9]+$ && "$NUM_GPUS" -ge 1 ]] || fail "no GPU found (NUM_GPUS=$NUM_GPUS): set NUM_GPUS=N," \
    "or train on CPU with: mom-train --config $config"
MASTER_PORT=${MASTER_PORT:-29500}
cmd=(deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" --module mom.train --config "$config" "$@")
echo "$prog: $NUM_GPUS process(es) on ${HOSTNAME:-this machine}: ${cmd[*]}" >&2
if [[ $dry_run == 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
    for ((rank = 0; rank < NUM_GPUS; rank++)); do
        echo "rank $rank: RANK=$rank LOCAL_RANK=$rank WORLD_SIZE=$NUM_GPUS MASTER_ADDR=127.0.0.1 MASTER_PORT=$MASTER_PORT"
    done
    exit 0
fi
command -v deepspeed >/dev/null 2>&1 || fail "deepspeed not found on PATH: activate the environment mom is" \
    "installed in (pip install deepspeed)"
exec "${cmd[@]}"
