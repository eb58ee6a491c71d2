#!/usr/bin/env bash
# One GPU call on a 2-GPU machine: the profile sweep (issue 8), then the qwen3-14b grid, each as
# shard i/2 on GPU i, stopping before LIMIT_S. Results in WORK_DIR (copy earlier shard files there
# first, so shards resume); packed at the end into OUT_DIR/results.tgz and OUT_DIR/artifacts.tgz.
#   [SWEEP_ARGS=--preload] bash scripts/gpu_profile_grid_call.sh WORK_DIR OUT_DIR LIMIT_S
set -u
work=${1:?usage: WORK_DIR OUT_DIR LIMIT_S}; out=${2:?}; limit=${3:?}
mkdir -p "$work"
python3 -c "import sys; print('dont_write_bytecode', sys.flags.dont_write_bytecode)"; env | grep '^PYTHON' | grep -v PATH
sweep() {  # SWEEP NAME SHARD STOP_AT_S [ARGS]: shard i on GPU i; no cell starts after STOP_AT_S (script time)
  local file=$1 name=$2 i=$3 stop=$4; shift 4
  local left=$(( stop - SECONDS )); [ "$left" -gt 5 ] || return 0
  CUDA_VISIBLE_DEVICES=$i timeout -s TERM $(( limit - 30 - SECONDS )) python3 -m ftmem.cli sweep "$file" \
    --shard "$i/2" --out "$work/$name.shard-$i-of-2.jsonl" --stop-after "$left" "$@" \
    >> "$work/$name.shard-$i-of-2.log" 2>&1
}
for i in 0 1; do
  ( sweep sweeps/qwen3-14b-profile.yaml qwen3-14b-profile $i 200 --retry-failed ${SWEEP_ARGS:-}  # own timeout_s
    sweep sweeps/qwen3-14b-grid.yaml qwen3-14b-grid $i $(( limit - 130 )) --timeout 100 ${SWEEP_ARGS:-} ) &
done
wait
tail -n 1 "$work"/*.log
tar czf "$out/results.tgz" -C "$work" $(cd "$work" && ls *.jsonl *.log)
arts=$(cd "$work" && ls -d *.artifacts 2>/dev/null)
[ -z "$arts" ] || tar czf "$out/artifacts.tgz" -C "$work" $arts
ls -la "$out"
