#!/usr/bin/env bash
# EMO's full-model gap to the standard MoE, diagnosed (experiments/regime.py --diagnose tabulates it): each change
# trained with two seeds, two jobs at a time (one core each), in the micro regime (after make regime) or at
# emo_tiny (after make demo; its seed-7 twins are trained here):
#   evaluation with document pools      the base runs evaluated with pools of a quarter of the experts
#   balance over more documents         batches of 4 x 16 sequences (a quarter of the steps: the same tokens),
#                                       balanced per micro-batch of 16, or over the step's 64 (lb_scope=step)
#   learning rate, z-loss               lr halved, doubled and quadrupled for each family; EMO without its
#                                       router z-loss
#   the release's final anneal          the last tenth of the steps linear to 0, both families
# Interrupted, it continues.
#   bash scripts/diagnose.sh micro           # or: bash scripts/diagnose.sh tiny
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
REGIME=${1:?give micro or tiny}
SEEDS=${SEEDS:-1337 7}
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 OMP_NUM_THREADS=1
if [ "$REGIME" = micro ]; then
  DATA=data/multidomain_1k; STEPS=2400; LR=3e-3; BASE=out/regime; POOL=16
else
  DATA=data/multidomain; STEPS=600; LR=3e-3; BASE=out; POOL=16
fi
RUNS=out/diagnose_$REGIME

base_run() {  # family seed: the run the changes are compared with
  if [ "$REGIME" = micro ]; then echo "$BASE/${1}_micro_seed${2}_steps$STEPS"
  elif [ "$2" = 1337 ]; then echo "$BASE/${1}_tiny"; else echo "$RUNS/${1}_base_seed$2"; fi
}

train() {  # family variant seed [overrides...]: one training of the family's config with the variant's changes
  local family=$1 variant=$2 seed=$3; shift 3
  local out=$RUNS/${family}_${variant}_seed$seed
  test -f "$out/done" && return 0
  local resume=""
  test -f "$out/ckpt.pt" && resume="--init_from=resume"
  $PY train.py "config/${family}_$REGIME.py" --data_dir=$DATA --seed="$seed" --out_dir="$out" "$@" $resume \
    > "$out.log" 2>&1
  touch "$out/done"
}

pool_eval() {  # seed: the base EMO run evaluated with document pools, and with token routing for the same tokens
  local out=$RUNS/pool_eval_seed$1.json
  test -f "$out" && return 0
  $PY eval.py --ckpt "$(base_run emo "$1")" --data_dir $DATA --pool_eval $POOL --out "$out.pools" > /dev/null
  $PY eval.py --ckpt "$(base_run emo "$1")" --data_dir $DATA --pool_eval 0 --out "$out.tokens" > /dev/null
  $PY -c "import json, sys; json.dump({'pools': json.load(open(sys.argv[1])), 'tokens': json.load(open(sys.argv[2]))},
open(sys.argv[3], 'w'))" "$out.pools" "$out.tokens" "$out"
}

if [ $# -gt 1 ]; then shift; "$@"; exit; fi

mkdir -p $RUNS
quarter=$((STEPS / 4))
BATCH64="--batch_size=16 --grad_accum=4 --max_steps=$quarter --warmup_steps=$((quarter / 20)) --eval_interval=$quarter"
BATCH64="$BATCH64 --checkpoint_interval=$quarter"
each_seed() {  # families change [overrides...]: one training line per seed and family
  local families=$1 change=$2; shift 2
  for seed in $SEEDS; do for family in $families; do echo "train $family $change $seed $*"; done; done
}
{  # each change with both seeds before the next, so that an interrupted run leaves whole rows
  if [ "$REGIME" = tiny ]; then
    for seed in $SEEDS; do [ "$seed" = 1337 ] || printf 'train %s base %s\n' emo "$seed" std "$seed"; done
  fi
  each_seed "emo std" anneal --anneal_steps=$((STEPS / 10))
  each_seed "emo std" batch64 $BATCH64
  each_seed emo batch64_step $BATCH64 --lb_scope=step
  each_seed emo z0 --z_weight=0
  each_seed "emo std" lr_quadruple --lr="$(python3 -c "print($LR * 4)")"  # the micro regime's best rate first
  each_seed "emo std" lr_double --lr="$(python3 -c "print($LR * 2)")"
  each_seed "emo std" lr_half --lr="$(python3 -c "print($LR / 2)")"
} | xargs -P 2 -L 1 bash "$0" "$REGIME"
for seed in $SEEDS; do echo "pool_eval $seed"; done | xargs -P 2 -L 1 bash "$0" "$REGIME"
$PY -m experiments.regime --diagnose "$RUNS" --regime "$REGIME" --out "results/${REGIME}_cpu"
