#!/usr/bin/env bash
# Issue 2's GPU cells: Qwen3-14B, random bf16 weights, one fresh process per cell.
#   bash scripts/gpu_foundation.sh OUT.jsonl
set -u
out=${1:?usage: gpu_foundation.sh OUT.jsonl}
run() { python3 -m ftmem.cli run --model qwen3-14b --seq-len 2048 --batch-size 1 --timeout 400 --out "$out" "$@"; }
run --method lora --lora-r 8 --no-gradient-checkpointing
run --method lora --lora-r 8 --gradient-checkpointing
run --method qlora --lora-r 64 --gradient-checkpointing --kbit-fp32-upcast
run --method qlora --lora-r 64 --gradient-checkpointing --no-kbit-fp32-upcast
run --method lora --lora-r 8 --gradient-checkpointing --batch-size 4 --seq-len 4096
run --method full --optimizer adamw --gradient-checkpointing --budget-gb h100-80gb
run --method qlora --lora-r 64 --gradient-checkpointing --kbit-fp32-upcast --budget-gb 24
run --method qlora --lora-r 64 --gradient-checkpointing --kbit-fp32-upcast --budget-gb rtx4090-24gb
run --method lora --lora-r 8 --gradient-checkpointing --attn-impl flash_attention_2
