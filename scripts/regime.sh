#!/usr/bin/env bash
# make regime: the regime where sparsity pays, on a 2-core CPU (experiments/regime.py says what it measures).
# The BPE-1024 corpus, then every training two at a time (one core each): the four micro models with two seeds
# at the main budget, and with the first seed at 1/4 and 1/16 of it (the token-budget trend); then the sweeps of
# EMO and the standard MoE (50/25/12.5/6.25% of the experts), the baselines' evaluation, and the report
# (results/micro_cpu/). Interrupted, it continues: a finished run or evaluation is skipped, a started one resumes.
#   bash scripts/regime.sh                 # STEPS=... SEEDS="1337 7" to change the budget or the seeds
#   bash scripts/regime.sh train emo_micro 1337 2400    # one job, as the queue runs it
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DATA=data/multidomain_1k
RUNS=out/regime
STEPS=${STEPS:-2400}
SEEDS=${SEEDS:-1337 7}
MODELS="emo_micro std_micro std_micro_e8 dense_micro"
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 OMP_NUM_THREADS=1

run_name() { echo "$RUNS/${1}_seed${2}_steps${3}"; }

train() {  # model seed steps: warmup, evaluations and checkpoints scale with the budget
  local out; out=$(run_name "$1" "$2" "$3")
  test -f "$out/done" && return 0
  local resume=""
  test -f "$out/ckpt.pt" && resume="--init_from=resume"
  $PY train.py "config/$1.py" --data_dir=$DATA --seed="$2" --max_steps="$3" --warmup_steps=$(($3 / 20)) \
    --eval_interval=$(($3 / 8 + ($3 < 8))) --checkpoint_interval=$(($3 / 4 + ($3 < 4))) --out_dir="$out" $resume \
    > "$out.log" 2>&1
  touch "$out/done"
}

sweep() {  # model seed
  local out=$RUNS/sweeps/${1}_seed$2
  test -f "$out/results.json" && return 0
  $PY -m experiments.sweep --ckpt "$(run_name "$1" "$2" "$STEPS")" --data_dir $DATA --keep 1.0,0.5,0.25,0.125,0.0625 \
    --out "$out" > "$out.log" 2>&1
}

baselines() {  # seed
  local out=$RUNS/baselines_seed$1
  test -f "$out/rows.json" && return 0
  $PY -m experiments.paper baselines --ckpt "$(run_name std_micro_e8 "$1" "$STEPS"),$(run_name dense_micro "$1" "$STEPS")" \
    --data_dir $DATA --out "$out" > "$out.log" 2>&1
}

if [ $# -gt 0 ]; then "$@"; exit; fi

test -f $DATA/meta.json || $PY -m data.prepare --vocab_size 1024 --out $DATA
mkdir -p $RUNS/sweeps
first=${SEEDS%% *}
{  # the longest first, so that the two cores finish together
  for model in emo_micro std_micro std_micro_e8 dense_micro; do
    for seed in $SEEDS; do echo "train $model $seed $STEPS"; done
  done
  for steps in $((STEPS / 4)) $((STEPS / 16)); do
    for model in $MODELS; do echo "train $model $first $steps"; done
  done
} | xargs -P 2 -L 1 bash "$0"
{
  for model in emo_micro std_micro; do for seed in $SEEDS; do echo "sweep $model $seed"; done; done
  for seed in $SEEDS; do echo "baselines $seed"; done
} | xargs -P 2 -L 1 bash "$0"
$PY -m experiments.regime --runs $RUNS --out results/micro_cpu
