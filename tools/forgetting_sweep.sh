#!/usr/bin/env bash
# The forgetting measurement of docs/data.md ("Mixing data against forgetting"): LoRA and P-Tuning v2 on the
# shipped sample task, each without and with 30 percent general conversations mixed in, on the default model.
# Every run trains 30 steps of 8 (the demo's length) and is scored twice:
#   - general ability: eval loss on the held-out general_dev.jsonl (40 conversations), before training (the
#     base model, eval_on_start) and after;
#   - the task: `glmtune eval` on the first 40 rows of the sample dev set (extraction F1, classification
#     accuracy), as the demo scores it.
# Usage: tools/forgetting_sweep.sh OUT_DIR [NAME ...]   (no NAME: all five runs; about 30 minutes on 2 CPU cores)
# Runs one after another: on a 2-core machine anything running beside them slows them several-fold.
set -euo pipefail
out=${1:?usage: tools/forgetting_sweep.sh OUT_DIR [NAME ...]}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
glmtune=${GLMTUNE:-$here/.venv/bin/glmtune}
data=$here/glmtune/sample_data
common=(--dev-file "$data/general_dev.jsonl" --eval-on-start --eval-steps 30 --max-steps 30 --batch-size 8
        --logging-steps 5 --seed 42 --save-strategy no)
declare -A runs=(
  [lora]="--train-file $data/train.jsonl"
  [lora-mix30]="--train-file $data/train.jsonl $data/general_train.jsonl:0.3"
  [ptuning]="--method ptuning --train-file $data/train.jsonl"
  [ptuning-mix30]="--method ptuning --train-file $data/train.jsonl $data/general_train.jsonl:0.3"
  # as many task samples as `lora` sees: 43 steps, 30 percent of them general (later options win)
  [lora-mix30-43steps]="--train-file $data/train.jsonl $data/general_train.jsonl:0.3 --max-steps 43 --eval-steps 43"
)
order=(lora lora-mix30 ptuning ptuning-mix30 lora-mix30-43steps)
[ $# -gt 0 ] && order=("$@")

mkdir -p "$out"
for name in "${order[@]}"; do
  [ -n "${runs[$name]+x}" ] || { echo "unknown run: $name" >&2; exit 2; }
  start=$(date +%s)
  # shellcheck disable=SC2086  # the options are meant to split into words
  "$glmtune" train "${common[@]}" ${runs[$name]} --output-dir "$out/$name" > "$out/$name.log" 2>&1
  "$glmtune" eval --adapter "$out/$name/adapter" --data "$data/dev.jsonl" --max-samples 40 --batch-size 64 \
    --max-new-tokens 200 --output "$out/$name/task_eval" --overwrite > "$out/$name.eval.log" 2>&1
  secs=$(( $(date +%s) - start ))
  losses=$(grep -o 'step [0-9]*: eval_loss [0-9.]*' "$out/$name.log" | awk '{print $4}' | paste -sd' ')
  metrics=$(python3 - "$out/$name/task_eval/metrics.json" <<'PY'
import json, sys
tasks = json.load(open(sys.argv[1]))["tasks"]
print("extraction F1 %.1f, classification accuracy %.1f" % (tasks["extraction"]["f1"], tasks["classification"]["accuracy"]))
PY
)
  printf '%-14s %5ss  general eval_loss (start, end): %s  task: %s\n' "$name" "$secs" "$losses" "$metrics" \
    | tee -a "$out/summary.txt"
done
