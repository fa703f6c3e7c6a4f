#!/usr/bin/env bash
# Short runs of the LoRA variants and of P-Tuning v2 settings on the shipped sample data,
# each scored by eval loss on 40 dev rows after 10 and 20 steps (docs/benchmarks.md, "LoRA variants and
# P-Tuning settings"). One run takes about 3.5 minutes (P-Tuning 4.5) on 2 CPU cores.
# Usage: tools/variant_sweep.sh OUT_DIR [NAME ...]   (no NAME: every run below)
# Runs one after another: on a 2-core machine anything running beside them slows them several-fold.
set -euo pipefail
out=${1:?usage: tools/variant_sweep.sh OUT_DIR [NAME ...]}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
glmtune=${GLMTUNE:-$here/.venv/bin/glmtune}
data=$here/glmtune/sample_data
common=(--train-file "$data/train.jsonl" --dev-file "$data/dev.jsonl" --max-eval-samples 40
        --max-steps 20 --eval-steps 10 --batch-size 8 --save-strategy no)

# Every LoRA run but the rsLoRA ones pins --no-use-rslora: they were measured as variants of plain LoRA,
# before rsLoRA became the default that this sweep chose.
plain="--seed 42 --no-use-rslora"
declare -A runs=(
  [lora]="$plain"
  [lora-seed2]="--seed 2 --no-use-rslora"
  [rslora]="--seed 42 --use-rslora"
  [rslora-seed2]="--seed 2 --use-rslora"
  [lr4e-3]="$plain --learning-rate 4e-3"
  [lr8e-3]="$plain --learning-rate 8e-3"
  [loraplus16]="$plain --loraplus-lr-ratio 16"
  [loraplus16-lr5e-4]="$plain --loraplus-lr-ratio 16 --learning-rate 5e-4"
  [pissa]="$plain --lora-init pissa"
  [pissa-lr5e-4]="$plain --lora-init pissa --learning-rate 5e-4"
  [olora]="$plain --lora-init olora"
  [olora-lr5e-4]="$plain --lora-init olora --learning-rate 5e-4"
  [dora]="$plain --use-dora"
  [neftune5]="$plain --neftune-noise-alpha 5"
  [pt128-2e-2]="--seed 42 --method ptuning --pre-seq-len 128 --learning-rate 2e-2"
  [pt128-5e-3]="--seed 42 --method ptuning --pre-seq-len 128 --learning-rate 5e-3"
  [pt128-5e-2]="--seed 42 --method ptuning --pre-seq-len 128 --learning-rate 5e-2"
  [pt32-2e-2]="--seed 42 --method ptuning --pre-seq-len 32 --learning-rate 2e-2"
  [pt64-2e-2]="--seed 42 --method ptuning --pre-seq-len 64 --learning-rate 2e-2"
  [pt64-5e-2]="--seed 42 --method ptuning --pre-seq-len 64 --learning-rate 5e-2"
)
order=(lora lora-seed2 rslora rslora-seed2 lr4e-3 lr8e-3 loraplus16 loraplus16-lr5e-4 pissa pissa-lr5e-4
       olora olora-lr5e-4 dora neftune5 pt128-2e-2 pt128-5e-3 pt128-5e-2 pt32-2e-2 pt64-2e-2 pt64-5e-2)
[ $# -gt 0 ] && order=("$@")

mkdir -p "$out"
for name in "${order[@]}"; do
  [ -n "${runs[$name]+x}" ] || { echo "unknown run: $name" >&2; exit 2; }
  start=$(date +%s)
  # shellcheck disable=SC2086  # the options are meant to split into words
  "$glmtune" train "${common[@]}" ${runs[$name]} --output-dir "$out/$name" > "$out/$name.log" 2>&1
  secs=$(( $(date +%s) - start ))
  losses=$(grep -o 'step [0-9]*: eval_loss [0-9.]*' "$out/$name.log" | awk '{print $4}' | paste -sd' ')
  printf '%-16s %5ss  eval_loss@10,20: %s\n' "$name" "$secs" "$losses" | tee -a "$out/summary.txt"
done
