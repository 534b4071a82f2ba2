#!/usr/bin/env bash
# make paper: the paper's experiments at toy size on make demo's two models (experiments/paper.py says what
# each measures), with a second seed for every number that compares models. Every job runs two at a time (one
# core each); interrupted, it continues: a finished training or experiment is skipped, a started training resumes.
#   1. trains what the demo did not: the models trained from scratch paired with the subsets (std_tiny_e16 with
#      25%, std_tiny_e8 with 12.5%, dense_tiny with 6.25%: the paper's Dense @ 8 beside its keep-8 subset); the
#      demo's two models and those three again with seed 7; the fixed-pool and no-shared-expert twins
#      (config/emo_tiny_fixed.py, emo_tiny_noshared.py) and EMO-anneal, with both seeds;
#   2. runs paper.py: every experiment on emo_tiny and std_tiny, the pruned and merge experiments on their seed-7
#      twins, the baselines of both seeds, the retention of EMO, the standard MoE and the three twins (both seeds);
#   3. writes results/tiny_cpu/paper/ (experiments/report.py --paper, experiments/analyze.py).
#   bash scripts/paper.sh                      # after make demo
#   bash scripts/paper.sh train std_tiny_e8 7  # one job, as the queue runs it
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SEED=${SEED:-7}
RESULTS=results/tiny_cpu/paper
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 OMP_NUM_THREADS=1

run_name() { if [ "$2" = 1337 ]; then echo "out/$1"; else echo "out/${1}_seed$2"; fi; }

train() {  # config seed [overrides...]: out/CONFIG (seed 1337, the configs' own) or out/CONFIG_seedSEED
  local config=$1 seed=$2; shift 2
  local out; out=$(run_name "$config" "$seed")
  test -f "$out/done" && return 0
  local resume=""
  test -f "$out/ckpt.pt" && resume="--init_from=resume"
  $PY train.py "config/$config.py" --seed="$seed" --out_dir="$out" "$@" $resume > "$out.log" 2>&1
  touch "$out/done"
}

anneal() {  # seed: EMO-anneal (the paper's App. B.4): std_tiny's 600 steps, the last 30 (5%, the release's 50B
  # of 1T tokens) with EMO's router and the learning rate linear to 0; the first 570 stop with a checkpoint
  local seed=$1 out; out=$(run_name emo_anneal_tiny "$seed")
  test -f "$out/done" && return 0
  if [ ! -f "$out/standard_done" ]; then
    local resume=""
    test -f "$out/ckpt.pt" && resume="--init_from=resume"
    $PY train.py config/std_tiny.py --seed="$seed" --out_dir="$out" --anneal_steps=30 --stop_after=570 $resume \
      > "$out.log" 2>&1
    touch "$out/standard_done"
  fi
  $PY train.py config/std_tiny.py --seed="$seed" --out_dir="$out" --anneal_steps=30 --init_from=resume --router=emo \
    >> "$out.log" 2>&1
  touch "$out/done"
}

paper() {  # step folder checkpoints [paper.py options...]
  local step=$1 out=out/paper/$2 ckpts=$3; shift 3
  test -f "$out/rows.json" && return 0
  $PY -m experiments.paper "$step" --ckpt "$ckpts" --out "$out" "$@" > "$out.log" 2>&1
}

if [ $# -gt 0 ]; then "$@"; exit; fi

if [ ! -f out/emo_tiny/ckpt.pt ] || [ ! -f out/std_tiny/ckpt.pt ]; then
  echo "make paper uses make demo's models: run make demo first"
  exit 2
fi
mkdir -p out/paper
BASELINES="std_tiny_e16 std_tiny_e8 dense_tiny"  # paired with 25%, 12.5% and 6.25% of the experts
{  # trainings first, the experiments of the demo's models beside them
  echo "paper run emo_tiny out/emo_tiny"
  echo "paper run std_tiny out/std_tiny"
  for model in emo_tiny std_tiny; do echo "train $model $SEED"; done
  for model in $BASELINES; do echo "train $model 1337"; echo "train $model $SEED"; done
  for seed in 1337 $SEED; do
    for twin in emo_tiny_fixed emo_tiny_noshared; do echo "train $twin $seed"; done
    echo "anneal $seed"
  done
} | xargs -P 2 -L 1 bash "$0"
{
  for model in emo_tiny std_tiny; do echo "paper run ${model}_seed$SEED $(run_name $model $SEED) --only pruned"; done
  echo "paper baselines baselines out/${BASELINES// /,out/}"
  seeded=$(for model in $BASELINES; do echo -n "$(run_name "$model" "$SEED"),"; done)
  echo "paper baselines baselines_seed$SEED ${seeded%,}"
  for seed in 1337 $SEED; do
    twins=$(for model in emo_tiny std_tiny emo_tiny_fixed emo_tiny_noshared emo_anneal_tiny; do
      echo -n "$(run_name "$model" "$seed"),"; done)
    echo "paper retention retention$([ "$seed" = 1337 ] || echo "_seed$seed") ${twins%,}"
  done
} | xargs -P 2 -L 1 bash "$0"
folders=""
for f in emo_tiny std_tiny emo_tiny_seed$SEED std_tiny_seed$SEED baselines baselines_seed$SEED retention \
    retention_seed$SEED; do
  folders="$folders,out/paper/$f"
done
$PY -m experiments.report --paper "${folders#,}" --out $RESULTS
$PY -m experiments.analyze --ckpt out/emo_tiny,out/std_tiny --out $RESULTS
