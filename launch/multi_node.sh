#!/usr/bin/env bash
# Pretrain on several machines listed in a DeepSpeed hostfile ("<host> slots=<GPUs>" per line, see
# launch/hostfile.example). Two ways:
#
# 1. From the first host, DeepSpeed reaches the others over passwordless ssh (pdsh must be installed):
#      launch/multi_node.sh HOSTFILE RECIPE.yaml [key=value ...]
#    runs exactly
#      deepspeed --hostfile HOSTFILE --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --module mom.train --config RECIPE.yaml [key=value ...]
#
# 2. Without ssh: run the same command on every host with NODE_RANK set (0 on the host named first, which is
#    also MASTER_ADDR's default):
#      NODE_RANK=1 launch/multi_node.sh HOSTFILE RECIPE.yaml [key=value ...]
#    runs exactly
#      deepspeed --hostfile HOSTFILE --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --module mom.train --config RECIPE.yaml [key=value ...]
#
# Every host needs the same checkout, environment and data paths, and train.out_dir on a filesystem all hosts share
# (each rank writes its own part of a checkpoint).
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: [NODE_RANK=i] $0 HOSTFILE RECIPE.yaml [key=value ...]" >&2
    exit 2
fi
hostfile=$1
config=$2
shift 2
MASTER_ADDR=${MASTER_ADDR:-$(grep -v '^\s*#' "$hostfile" | awk 'NF {print $1; exit}')}
MASTER_PORT=${MASTER_PORT:-29500}
no_ssh=()
if [[ -n "${NODE_RANK:-}" ]]; then
    no_ssh=(--no_ssh --node_rank "$NODE_RANK")
fi
set -x
exec deepspeed --hostfile "$hostfile" "${no_ssh[@]}" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --module mom.train --config "$config" "$@"
