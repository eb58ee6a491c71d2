#!/usr/bin/env bash
# One GPU call on a 2-GPU machine: the qwen3-14b grid, shard i/2 on GPU i, each stopping before the
# call's limit (run again to resume); GPU 0 first profiles where a 14B LoRA cell's start-up goes.
#   bash scripts/gpu_grid_call.sh OUT_DIR LIMIT_S [diag]
# Copy earlier shard files into OUT_DIR first, so the shards resume.
set -u
out=${1:?usage: gpu_grid_call.sh OUT_DIR LIMIT_S [diag]}; limit=${2:?}; diag=${3:-}
P=$out/qwen3-14b-grid
A="--model qwen3-14b --method lora --seq-len 2048 --batch-size 1 --gradient-checkpointing --steps 2"
shard() {  # shard i on GPU i, starting no cell later than 100 s before the limit
  local i=$1 left=$(( limit - SECONDS - 100 ))
  CUDA_VISIBLE_DEVICES=$i timeout -s TERM $(( limit - SECONDS )) python3 -m bench.cli sweep \
    sweeps/qwen3-14b-grid.yaml --shard "$i/2" --out "$P.shard-$i-of-2.jsonl" --timeout 90 \
    --stop-after "$left" >> "$P.shard-$i-of-2.log" 2>&1
}
shard 1 &
if [ -n "$diag" ]; then
  D=$out/diag; mkdir -p "$D"
  export CUDA_VISIBLE_DEVICES=0
  python3 -X importtime -c "import bench.measure, transformers.models.qwen3.modeling_qwen3, peft" 2> "$D/importtime.txt"
  python3 scripts/startup_profile.py "$D/lora" $A > /dev/null 2>&1
  python3 -m bench.cli run $A --json > "$D/run-default.json" 2> "$D/run-default.err"
  FTMEM_NVML_INTERVAL_S=0.1 python3 -m bench.cli run $A --json > "$D/run-nvml100ms.json" 2> /dev/null
  unset CUDA_VISIBLE_DEVICES
  tar czf "$out/diag.tgz" -C "$out" diag && rm -rf "$D"
fi
shard 0 &
wait
tail -n 2 "$P".shard-*-of-2.log
