#!/usr/bin/env bash
# The serving benchmark of docs/benchmarks.md ("glmtune serve under concurrent clients"): the same load against
# the one-at-a-time engine and the continuous-batching one, then one adapter and three adapters in one server.
# Run at the repository root.
#
#   tools/serve_bench.sh OUT [BASELINE_SRC]
#
# OUT collects adapters, server logs and one JSON line per run (OUT/results.jsonl). BASELINE_SRC, optional: a
# checkout of the commit before continuous batching (git worktree add ../old 23f3f22), served the same way as
# the current code with --max-batch 1. Runs one server at a time on the default model; about 30 minutes on 2
# CPU cores. Keep the machine otherwise idle: CPU contention changes every number.
set -euo pipefail
OUT=${1:?usage: tools/serve_bench.sh OUT [BASELINE_SRC]}
BASELINE_SRC=${2:-}
PY=${PYTHON:-.venv/bin/python}
PORT=${PORT:-8123}
REQUESTS=${REQUESTS:-500}
BASELINE_REQUESTS=${BASELINE_REQUESTS:-60}
ADAPTER_REQUESTS=${ADAPTER_REQUESTS:-200}
mkdir -p "$OUT"

adapter() {  # a LoRA adapter of the default shape (rank 16), one step at a tiny rate from its own seed: its
  # answers stay as long as the base's, so every run generates the same number of tokens
  mkdir -p "$OUT/adapters"
  [ -d "$OUT/adapters/$1/adapter" ] || "$PY" -m glmtune train --output-dir "$OUT/adapters/$1" --max-steps 1 \
      --learning-rate 1e-6 --train-file glmtune/sample_data/train.jsonl --batch-size 4 --seed "$2" \
      --save-strategy no > "$OUT/adapters/$1.log" 2>&1
}

run() {  # run NAME REQUESTS [serve arguments...]: serve, load it, stop it
  local name=$1 requests=$2; shift 2
  if [ "${SRC:-}" ]; then  # that checkout's glmtune, not the one installed here (an editable install's finder
    # comes before sys.path, so PYTHONPATH alone would not do)
    "$PY" -c "import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]
sys.path.insert(0, '$SRC'); sys.argv[0] = 'glmtune'; runpy.run_module('glmtune', run_name='__main__')" \
        serve --port "$PORT" "$@" > "$OUT/$name.server.log" 2>&1 &
  else
    "$PY" -m glmtune serve --port "$PORT" "$@" > "$OUT/$name.server.log" 2>&1 &
  fi
  local pid=$!
  for _ in $(seq 600); do grep -q "serving" "$OUT/$name.server.log" && break; sleep 0.5; done
  local models=()
  for m in ${MODELS:-}; do models+=(--model "$m"); done
  "$PY" tools/serve_load.py --url "http://127.0.0.1:$PORT/v1" --requests "$requests" --concurrency 20 \
      --max-tokens 64 --stream --server-pid "$pid" "${models[@]}" | \
      "$PY" -c "import json,sys; r=json.loads(sys.stdin.read()); r['run']='$name'; print(json.dumps(r))" \
      | tee -a "$OUT/results.jsonl"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

adapter a 1; adapter b 2; adapter c 3
if [ "$BASELINE_SRC" ]; then SRC=$BASELINE_SRC run one_at_a_time_engine "$BASELINE_REQUESTS"; fi
if [ "${ONLY_BASELINE:-}" ]; then exit 0; fi
run max_batch_1 "$BASELINE_REQUESTS" --max-batch 1
run continuous_batching "$REQUESTS"
run one_adapter "$ADAPTER_REQUESTS" --adapter "$OUT/adapters/a/adapter"  # merged into the base, as served alone
MODELS="a" run one_adapter_by_name "$ADAPTER_REQUESTS" --adapter a="$OUT/adapters/a/adapter"  # unmerged, as below
MODELS="a b c" run three_adapters "$REQUESTS" --adapter a="$OUT/adapters/a/adapter" \
    --adapter b="$OUT/adapters/b/adapter" --adapter c="$OUT/adapters/c/adapter"
