#!/usr/bin/env bash
# One command for the day a GPU is lent: its steps' time limits add up to 8 minutes on one H100 (a lent GPU
# gives a task 15 minutes in all, its start included), and it needs only the repository (no corpus: the
# benchmarks use synthetic batches). Writes two files to $OUT, gpu_check.json (every result, and the end of
# each step's log) and summary.md (the figures against the project's targets), since a lent machine sends back
# only a few files; the steps' own logs and results stay in $WORK. A step that fails or runs past its limit is
# recorded and the next ones still run.
#
#   bash scripts/gpu_check.sh                  # OUT and WORK default to out/gpu_check
#   DRY_RUN=1 bash scripts/gpu_check.sh        # the same steps at toy sizes on a CPU (tests/test_gpu_check.py)
#
# Steps: the kernel tests on the GPU (Triton kernels compiled for real, bfloat16 included); bench/kernels.py at
# the release's layer and the small shape (Triton vs grouped_mm vs loop vs dense); training throughput and MFU
# of emo_small vs std_small and of a 2-layer slice of emo_full, eager and compiled.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-out/gpu_check}
WORK=${WORK:-out/gpu_check}
mkdir -p "$OUT" "$WORK"
: > "$WORK/steps.txt"

step() {  # step NAME LIMIT_SECONDS COMMAND...: run it, log it, record "NAME exit seconds"
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  echo "$name $rc $((SECONDS - start))" >> "$WORK/steps.txt"
  tail -n 3 "$WORK/$name.log"
}

if [ -n "${DRY_RUN:-}" ]; then
  TINY=(--n_layer=1 --d_model=32 --n_head=2 --expert_hidden=16 --vocab_size=256 --eos_id=255 --seq_len=32
        --batch_size=2 --steps=2 --warmup=1)
  step tests 300 $PY -m pytest -q -p no:cacheprovider tests/test_lm_loss.py
  step kernels 300 $PY bench/kernels.py --shapes cpu --repeats 1 --skip_loops --json "$WORK/kernels.json"
  step small 300 $PY bench/train_throughput.py config/emo_small.py "${TINY[@]}" --json="$WORK/small.json"
  step small_compiled 300 $PY bench/train_throughput.py config/emo_small.py "${TINY[@]}" --compile=True \
    --json="$WORK/small_compiled.json"
  step full_slice 300 $PY bench/train_throughput.py config/emo_full.py "${TINY[@]}" --parallel=ddp --dtype=float32 \
    --json="$WORK/full_slice.json"
else
  SLICE=(--n_layer=2 --batch_size=2 --parallel=ddp --steps=10 --warmup=3)
  step tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_lm_loss.py tests/test_compile.py
  step kernels 90 $PY bench/kernels.py --shapes release,small --repeats 10 --json "$WORK/kernels.json"
  step small 60 $PY bench/train_throughput.py config/emo_small.py --steps=15 --json="$WORK/small.json"
  step small_compiled 90 $PY bench/train_throughput.py config/emo_small.py --steps=15 --compile=True \
    --json="$WORK/small_compiled.json"
  step full_slice 45 $PY bench/train_throughput.py config/emo_full.py "${SLICE[@]}" --json="$WORK/full_slice.json"
  step full_slice_compiled 75 $PY bench/train_throughput.py config/emo_full.py "${SLICE[@]}" --compile=True \
    --json="$WORK/full_slice_compiled.json"
fi
$PY bench/gpu_report.py "$WORK" "$OUT"
