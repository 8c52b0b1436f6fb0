#!/usr/bin/env bash
# The MoM vs dense study (docs/evaluation.md, "The study"): named runs of recipes/study/, several at a time on one GPU.
#
#   launch/study.sh [--parallel N] [--deadline SECONDS] [--oom-wait SECONDS] [--set key=value ...] [--dry-run] RUN ...
#
# A RUN is SETTING_SIZE_VARIANT[_sSEED], e.g. tis_40m_mom, tis_40m_dense_s1, tis_40m_inproj:
#   SETTING  tis (text+image+speech, data/medium_img32) | t2i (text+image, Chameleon-like, data/medium_t2i) |
#            tf (Transfusion: text + image latents with a diffusion loss, data/medium_latent; 40m only)
#   SIZE     40m | 150m
#   VARIANT  mom (all four projections per modality) | dense (none) | the ablation's inproj (in_proj only) and
#            inout (in_proj and out_proj), both from the MoM recipe with another model.decouple
#   SEED     0 when left out; seed s sets train.seed=s and data.seed=s (the MoM and dense run of a seed see the same
#            batches in the same order)
# and runs
#   mom-train --config recipes/study/SETTING_SIZE_{mom|dense}.yaml [overrides] train.out_dir=runs/study/RUN --resume auto
#
# --parallel N   runs at most N of them at once (default 1); small models leave the GPU idle between kernels, so
#                2-4 at once finish sooner than one after another (docs/evaluation.md states what was measured).
# --deadline S   stops every run still going after S seconds with SIGTERM: it saves a checkpoint and exits, and
#                running the same command again resumes it (what a 10-minute job limit needs). It counts from each
#                run's first start.
# --oom-wait S   a run that runs out of GPU memory (the runs beside it hold it) starts again, from its last
#                checkpoint, S seconds later (default 30), while its deadline allows and at most 20 times: as the
#                others finish, it fits. Its log says so each time.
# --set K=V      one more recipe override for every run (repeatable), e.g. --set train.max_steps=40 for a trial.
# --dry-run      prints the commands and starts nothing.
# With OUT set (a folder), each run's metrics.jsonl, recipe.yaml and log are copied to OUT/study/RUN/ at the end.
# Every error says which run and why, on one line, with exit code 2.
set -uo pipefail
prog=$(basename "$0")
fail() { echo "$prog: error: $*" >&2; exit 2; }
parallel=1
deadline=0
oom_wait=30
OOM_TRIES=20  # starts of one run that ran out of GPU memory before it gives up
dry_run=0
runs=()
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --parallel) parallel=${2:-}; shift 2 ;;
        --deadline) deadline=${2:-}; shift 2 ;;
        --oom-wait) oom_wait=${2:-}; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --set) [[ "${2:-}" == *=* ]] || fail "--set needs key=value, got '${2:-}'"; extra+=("$2"); shift 2 ;;
        -h|--help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) fail "unknown option $1 (see --help)" ;;
        *) runs+=("$1"); shift ;;
    esac
done
[[ ${#runs[@]} -gt 0 ]] || fail "no RUN given, e.g. $prog tis_40m_mom tis_40m_dense (see --help)"
[[ "$parallel" =~ ^[1-9][0-9]*$ ]] || fail "--parallel must be a positive integer, got '$parallel'"
[[ "$deadline" =~ ^[0-9]+$ ]] || fail "--deadline must be a whole number of seconds, got '$deadline'"
[[ "$oom_wait" =~ ^[0-9]+$ ]] || fail "--oom-wait must be a whole number of seconds, got '$oom_wait'"

# command RUN: the mom-train command line of one run (one word per line)
command_of() {
    local run=$1 setting size variant seed=0 rest
    IFS=_ read -r setting size variant rest <<< "$run"
    if [[ -n "$rest" ]]; then
        [[ "$rest" =~ ^s([0-9]+)$ ]] || fail "run $run: expected SETTING_SIZE_VARIANT[_sSEED], the last part '$rest' is not sSEED"
        seed=${BASH_REMATCH[1]}
    fi
    [[ "$setting" == tis || "$setting" == t2i || "$setting" == tf ]] || fail "run $run: setting '$setting' is not tis, t2i or tf"
    [[ "$size" == 40m || "$size" == 150m ]] || fail "run $run: size '$size' is not 40m or 150m"
    local recipe overrides=()
    case "$variant" in
        mom|dense) recipe=recipes/study/${setting}_${size}_${variant}.yaml ;;
        inproj) recipe=recipes/study/${setting}_${size}_mom.yaml; overrides+=("model.decouple=[in_proj]") ;;
        inout) recipe=recipes/study/${setting}_${size}_mom.yaml; overrides+=("model.decouple=[in_proj,out_proj]") ;;
        *) fail "run $run: variant '$variant' is not mom, dense, inproj or inout" ;;
    esac
    [[ -f "$recipe" ]] || fail "run $run: recipe $recipe not found"
    [[ "$seed" == 0 ]] || overrides+=("train.seed=$seed" "data.seed=$seed")
    printf '%s\n' mom-train --config "$recipe" "${overrides[@]}" "${extra[@]}" "train.out_dir=runs/study/$run" --resume auto
}

declare -A seen=()
for run in "${runs[@]}"; do
    [[ -z "${seen[$run]:-}" ]] || fail "run $run is named twice"
    seen[$run]=1
    command_of "$run" > /dev/null || exit 2
done

run_one() {  # RUN: one run, its log in runs/study/RUN.log; started again after running out of GPU memory
    local run=$1 cmd log=runs/study/$1.log
    mapfile -t cmd < <(command_of "$run")
    mkdir -p runs/study
    local started=$SECONDS status tries=0 left
    while :; do
        tries=$((tries + 1))
        if [[ "$deadline" -gt 0 ]]; then
            left=$((deadline - (SECONDS - started)))
            if [[ "$left" -le 0 ]]; then status=124; break; fi
            timeout -s TERM -k 120 "$left" "${cmd[@]}" >> "$log" 2>&1
        else
            "${cmd[@]}" >> "$log" 2>&1
        fi
        status=$?
        if [[ "$status" -eq 0 || "$status" -eq 124 || "$tries" -ge "$OOM_TRIES" ]] \
            || ! tail -n 40 "$log" | grep -q "CUDA out of memory"; then
            break
        fi
        echo "$prog: $run ran out of GPU memory (try $tries of $OOM_TRIES); starting it again in $oom_wait s" \
            | tee -a "$log"
        sleep "$oom_wait"
    done
    echo "$prog: $run exit $status after $((SECONDS - started)) s ($(tail -n 1 "$log"))"
}

if [[ "$dry_run" == 1 ]]; then
    for run in "${runs[@]}"; do command_of "$run" | paste -sd' '; done
    exit 0
fi
running=0
for run in "${runs[@]}"; do
    if [[ "$running" -ge "$parallel" ]]; then wait -n; running=$((running - 1)); fi
    run_one "$run" &
    running=$((running + 1))
    sleep 2  # staggered: each process picks a free rendezvous port
done
wait
if [[ -n "${OUT:-}" ]]; then
    for run in "${runs[@]}"; do
        mkdir -p "$OUT/study/$run"
        cp runs/study/"$run"/{metrics.jsonl,recipe.yaml} "$OUT/study/$run/" 2>/dev/null
        cp "runs/study/$run.log" "$OUT/study/$run/train.log" 2>/dev/null
    done
fi
