#!/usr/bin/env bash
# Run a sweep of single-GPU cells on every GPU of one machine at once: shard i of N on GPU i.
#   bash scripts/gpu_shards.sh SWEEP.yaml OUT_PREFIX [N_GPUS] [extra ftmem sweep args...]
# Shard i appends to OUT_PREFIX.shard-i-of-N.jsonl. Shards are deterministic (by cell_id), so running
# the same command again resumes every shard; the shard files together are the sweep's results.
# Each cell still has its GPU to itself: allocator and NVML figures are per process and per device.
set -u
sweep=${1:?usage: gpu_shards.sh SWEEP.yaml OUT_PREFIX [N_GPUS] [args...]}
prefix=${2:?usage: gpu_shards.sh SWEEP.yaml OUT_PREFIX [N_GPUS] [args...]}
n=${3:-$(nvidia-smi -L | wc -l)}
shift $(( $# < 3 ? $# : 3 ))
pids=()
for i in $(seq 0 $((n - 1))); do
  CUDA_VISIBLE_DEVICES=$i python3 -m ftmem.cli sweep "$sweep" --shard "$i/$n" \
    --out "$prefix.shard-$i-of-$n.jsonl" "$@" > "$prefix.shard-$i-of-$n.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
tail -n 1 "$prefix".shard-*-of-"$n".log
exit $status
