#!/usr/bin/env bash
# The demo again with another seed (initial weights, data order, pools), then the mean and spread of the
# changes over the two seeds: how much of a difference between EMO and the standard MoE is real.
#   bash scripts/two_seeds.sh            # after `make demo` (seed 1337); writes out/sweep_tiny_seed7/, out/seeds.md
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SEED=${SEED:-7}
for model in emo_tiny std_tiny; do
  resume=""
  test -f "out/${model}_seed$SEED/ckpt.pt" && resume="--init_from=resume"
  OMP_NUM_THREADS=1 $PY train.py "config/$model.py" --seed="$SEED" --out_dir="out/${model}_seed$SEED" $resume \
    > "out/${model}_seed$SEED.log" 2>&1 &
done
wait
for model in emo_tiny std_tiny; do
  OMP_NUM_THREADS=1 $PY -m experiments.sweep --ckpt "out/${model}_seed$SEED" --out "out/sweeps/${model}_seed$SEED" \
    > "out/sweeps_${model}_seed$SEED.log" 2>&1 &
done
wait
$PY -m experiments.report --combine "out/sweeps/emo_tiny_seed$SEED,out/sweeps/std_tiny_seed$SEED" --out "out/sweep_tiny_seed$SEED"
$PY -m experiments.report --seeds "out/sweep_tiny,out/sweep_tiny_seed$SEED" --out out/seeds.md
