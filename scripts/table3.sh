#!/usr/bin/env bash
# The paper's Table 3 (MMLU, experts kept 8/16/32/64/128 of 128, as is and fine-tuned) and Figure 3's standard-MoE
# curve, on the release, with the EMO paper's protocol (benchmarks.py --protocol emo): for each model and each of
# MMLU's 17 categories, greedy pruning on the category's whole pool (the first 60% of each subject's shuffled test
# rows and the validation rows), the last 40% scored as is, then after fine-tuning on the same pool (1 epoch,
# lr 5e-5, batches of 32); the full model once on all categories. Writes OUT/table3.md (the 16-category mean and
# every category) and OUT/figure3.png.
#   bash scripts/table3.sh                       # on one GPU, the release's folders or hub ids (network once)
#   MODELS="path/to/Emo_1b14b_1T path/to/StdMoE_1b14b_1T" KEEPS="8 16" CATEGORIES="math law" bash scripts/table3.sh
#   LIMIT=2 CALIB=2 DEVICE=cpu OUT=/tmp/t3 MODELS=... bash scripts/table3.sh     # a dry run (tests/test_table3.py)
# GPU time (python bench/plan.py config/emo_full.py --world_size=1 --total_tokens=44e6 --forward_tokens=271e6
# --mfu=0.1): about 3.5 hours on one H100 at 10% MFU. The count: per model, pruning reads each category's pool
# once (about 5.5M tokens in all, at 4 characters a token), fine-tuning trains on it, and each of the 4 pruned
# models and the fine-tuned ones are scored on 12.6M tokens (every choice after its context, and after
# "Answer:"); two models, 4 fractions: 44M training tokens and 271M forward-only ones.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MODELS=${MODELS:-"allenai/Emo_1b14b_1T allenai/StdMoE_1b14b_1T"}
KEEPS=${KEEPS:-"8 16 32 64"}
CATEGORIES=${CATEGORIES:-"math health physics business biology chemistry computer_science economics engineering \
philosophy other history geography politics psychology culture law"}
LIMIT=${LIMIT:-0}  # questions scored per category (0: all)
CALIB=${CALIB:-1000000}  # calibration and fine-tuning examples per category: all of them (the release caps none)
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-out/table3}
EMO=(--protocol emo --device "$DEVICE")

for model in $MODELS; do
  name=$(basename "$model")
  mkdir -p "$OUT/$name"
  test -f "$OUT/$name/full.json" || $PY eval.py --ckpt "$model" --benchmark mmlu_cats "${EMO[@]}" --limit "$LIMIT" \
    --out "$OUT/$name/full.json"
  for keep in $KEEPS; do
    for category in $CATEGORIES; do
      pruned=$OUT/$name/keep$keep/$category
      test -f "$pruned.pt" || $PY prune.py --ckpt "$model" --benchmark "mmlu_cat_$category" "${EMO[@]}" --keep "$keep" \
        --calib_docs "$CALIB" --out "$pruned"
      test -f "$pruned.scores.json" || $PY eval.py --ckpt "$pruned.pt" --benchmark "mmlu_cat_$category" "${EMO[@]}" \
        --limit "$LIMIT" --out "$pruned.scores.json"
      test -f "$pruned-ft.pt" || $PY finetune.py --ckpt "$pruned.pt" --benchmark "mmlu_cat_$category" "${EMO[@]}" \
        --n_examples "$CALIB" --batch_size 32 --out "$pruned-ft.pt"
      test -f "$pruned-ft.scores.json" || $PY eval.py --ckpt "$pruned-ft.pt" --benchmark "mmlu_cat_$category" \
        "${EMO[@]}" --limit "$LIMIT" --out "$pruned-ft.scores.json"
    done
  done
done
$PY -m experiments.report --table3 "$OUT" --out "$OUT"
