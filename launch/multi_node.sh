#!/usr/bin/env bash
# Pretrain on several machines listed in a DeepSpeed hostfile ("<host> slots=<GPUs>" per line, see
# launch/hostfile.example). Two ways:
#
# 1. From the first host, DeepSpeed reaches the others over passwordless ssh (pdsh must be installed):
#      launch/multi_node.sh [--dry-run] HOSTFILE RECIPE.yaml [key=value ...]
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
# (each rank writes its own part of a checkpoint). --dry-run prints the command and each rank's environment (all
# hosts', or with NODE_RANK this host's) and starts nothing. Errors are one line with exit code 2.
set -euo pipefail
prog=$(basename "$0")
fail() { echo "$prog: error: $*" >&2; exit 2; }
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
if [[ $# -lt 2 ]]; then
    echo "usage: [NODE_RANK=i] [MASTER_ADDR=host] [MASTER_PORT=P] $0 [--dry-run] HOSTFILE RECIPE.yaml [key=value ...]" >&2
    exit 2
fi
hostfile=$1
config=$2
shift 2
[[ -f "$hostfile" ]] || fail "hostfile $hostfile not found (one '<host> slots=<GPUs>' line per machine)"
[[ -f "$config" ]] || fail "recipe $config not found"
hosts=() slots=()
while read -r host spec _; do
    [[ -z "$host" || "$host" == \#* ]] && continue
    [[ "$spec" =~ ^slots=([0-9]+)$ && ${BASH_REMATCH[1]} -ge 1 ]] || fail "$hostfile: '$host $spec': expected '<host> slots=<GPUs>'"
    hosts+=("$host") slots+=("${BASH_REMATCH[1]}")
done < "$hostfile"
[[ ${#hosts[@]} -ge 1 ]] || fail "$hostfile lists no host"
MASTER_ADDR=${MASTER_ADDR:-${hosts[0]}}
MASTER_PORT=${MASTER_PORT:-29500}
no_ssh=()
if [[ -n "${NODE_RANK:-}" ]]; then
    [[ "$NODE_RANK" =~ ^[0-9]+$ && "$NODE_RANK" -lt ${#hosts[@]} ]] || fail "NODE_RANK=$NODE_RANK: expected 0 to" \
        "$(( ${#hosts[@]} - 1 )) (the host's line in $hostfile)"
    no_ssh=(--no_ssh --node_rank "$NODE_RANK")
fi
cmd=(deepspeed --hostfile "$hostfile" "${no_ssh[@]}" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
     --module mom.train --config "$config" "$@")
world=0
for n in "${slots[@]}"; do world=$((world + n)); done
echo "$prog: ${#hosts[@]} host(s), $world process(es), master $MASTER_ADDR:$MASTER_PORT: ${cmd[*]}" >&2
if [[ $dry_run == 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
    rank=0
    for i in "${!hosts[@]}"; do
        for ((lrank = 0; lrank < slots[i]; lrank++, rank++)); do
            [[ -n "${NODE_RANK:-}" && "$NODE_RANK" != "$i" ]] && continue
            echo "rank $rank on ${hosts[i]}: RANK=$rank LOCAL_RANK=$lrank WORLD_SIZE=$world MASTER_ADDR=$MASTER_ADDR" \
                "MASTER_PORT=$MASTER_PORT"
        done
    done
    exit 0
fi
command -v deepspeed >/dev/null 2>&1 || fail "deepspeed not found on PATH: activate the environment mom is" \
    "installed in (pip install deepspeed)"
if [[ -z "${NODE_RANK:-}" && ${#hosts[@]} -gt 1 ]] && ! command -v pdsh >/dev/null 2>&1; then
    fail "pdsh not found: deepspeed reaches the other hosts with pdsh over ssh; install pdsh, or run this command on" \
        "every host with NODE_RANK=<its line in $hostfile, from 0>"
fi
exec "${cmd[@]}"
