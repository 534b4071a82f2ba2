#!/usr/bin/env bash
# An example of "your own domain" (README): French man pages, a language the built-in corpus does not have,
# from Debian's manpages-fr, rendered to plain text files: 16 to calibrate on, 50 held out for evaluation.
#   bash scripts/example_domain.sh          # writes out/french/calib/*.txt and out/french/eval/*.txt
# Then, for example:
#   python -m experiments.sweep --ckpt out/emo_tiny,out/std_tiny --calib french=out/french/calib \
#       --data french=out/french/eval --out out/sweep_french
# Needs apt-get (Debian/Ubuntu; `apt-get update` once on a fresh machine) and groff.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/french}
mkdir -p "$OUT/deb" "$OUT/root" "$OUT/calib" "$OUT/eval"
if ! ls "$OUT"/deb/manpages-fr_*.deb > /dev/null 2>&1; then
  (cd "$OUT/deb" && apt-get download manpages-fr)
fi
dpkg -x "$OUT"/deb/manpages-fr_*.deb "$OUT/root"
n=0
# every 5th page in name order: a fixed sample across sections; .so stubs (aliases) skipped
for page in $(find "$OUT/root/usr/share/man/fr" -name '*.gz' | LC_ALL=C sort | awk 'NR % 5 == 0'); do
  zcat "$page" | head -c 4 | grep -q '^\.so' && continue
  name=$(basename "$page" .gz)
  split=$([ $n -lt 16 ] && echo calib || echo eval)
  zcat "$page" | groff -k -t -man -Tutf8 -rHY=0 -dAD=l -P-cbou 2> /dev/null > "$OUT/$split/$name.txt"
  n=$((n + 1))
  [ $n -ge 66 ] && break
done
echo "$(ls "$OUT/calib" | wc -l) calibration and $(ls "$OUT/eval" | wc -l) evaluation pages in $OUT"
