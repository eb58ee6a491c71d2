#!/usr/bin/env bash
# One GPU call: repeat runs, the capacity frontier verified for LoRA/QLoRA under 24 and 40 GB,
# then the rest of the guide sweep. Results go to $OUT (copied from results/ first, so sweeps resume).
set -u
R=results/nvidia-h200-x1
cp $R/*.jsonl "$OUT"/
S="python3 -m ftmem.cli"
$S sweep sweeps/qwen3-14b-repeat.yaml --out "$OUT"/qwen3-14b-guide.jsonl --timeout 120
for m in qlora lora; do for b in rtx4090-24gb a100-40gb; do
  $S capacity --model qwen3-14b --method $m --lora-r 8 --gradient-checkpointing --budget-gb $b \
     --batch-sizes 1 --seq-lens 1024,2048,4096,8192 --verify --out "$OUT"/capacity-verify.jsonl --timeout 120
done; done
$S sweep sweeps/qwen3-14b-guide.yaml --out "$OUT"/qwen3-14b-guide.jsonl --timeout 150
