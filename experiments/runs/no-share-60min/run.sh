#!/usr/bin/env bash
# w13, w14 (2026-11-30): the recipe of ../faster-warmup-60min/ (w11, w12) with one editor network per
# edited matrix (--no-share: 39M parameters instead of 8.7M).
# w13: seed 0, --c-loc-late 4, max 6,800 steps; the hour's budget stopped it at 6,022
#      (the optimizer update as it was then: 0.48 s a step against w12's 0.37 s).
# w14: seed 1, --c-loc-late 5, max 7,000 steps, with the fused optimizer update
#      (experiments/optimizer_step.py).
# Run on a quiet 2-core machine; ~5 min per 500-edit evaluation.
set -euo pipefail
val=../shared/data/counterfact/counterfact-val.json
recipe=(--data ../shared/data/counterfact/counterfact-train.json --minutes 58 --cosine
  --val-every 500 --val-edits 256 --lower-precision bf16 --late-fraction 0.75
  --hard-locality answer --hard-locality-late nearest --ema 0.998 --no-share)
mend train "${recipe[@]}" --out runs/w13 --max-steps 6800 --c-loc-late 4 --seed 0
mend eval --editor runs/w13/last --data $val --limit 500 --out runs/w13/report500_last_ema.json
mend train "${recipe[@]}" --out runs/w14 --max-steps 7000 --c-loc-late 5 --seed 1
mend eval --editor runs/w14/last --data $val --limit 500 --out runs/w14/report500_last_ema.json
# 2026-12-01: w15, and w14's check started at 0.9 (chosen on val 501-750, then the first 500 once)
mend train "${recipe[@]}" --out runs/w15 --max-steps 7000 --c-loc-late 6 --seed 2
mend eval --editor runs/w15/last --data $val --limit 500 --out runs/w15/report500_last_ema.json
PYTHONPATH=src python experiments/check_variants.py --editor runs/w14/last --data $val --skip 500 --limit 250 \
  --variants '{}' '{"boost": [1.25, 1.5, 2]}' '{"boost": [1.1, 1.25, 1.5, 1.75, 2]}' \
  '{"start": 0.9, "boost": [1, 1.25, 1.5, 2]}' '{"start": 0.8, "boost": [1, 1.25, 1.5, 2]}'
PYTHONPATH=src python experiments/check_variants.py --editor runs/w14/last --data $val --limit 500 \
  --variants '{"start": 0.9, "boost": [1, 1.25, 1.5, 2]}'
# then the same check through mend eval (MendEditor's start, --start); identical scores
mend eval --editor runs/w14/last --data $val --limit 500 --start 0.9 --boost 1 1.25 1.5 2 \
  --out runs/w14_start09_val500.json
mend eval --editor runs/w14/last --data $val --limit 500 --boost --out runs/w14_unchecked_val500.json  # plain MEND
# then w16 = w14's recipe at seed 3, trained after the check was chosen; then the check
# started at 0.9 on every run of this folder
mend train "${recipe[@]}" --out runs/w16 --max-steps 7000 --c-loc-late 5 --seed 3
for w in w16 w15 w13; do
  mend eval --editor runs/$w/last --data $val --limit 500 --start 0.9 --boost 1 1.25 1.5 2 \
    --out runs/${w}_start09_val500.json
done
mend eval --editor runs/w16/last --data $val --limit 500 --out runs/w16_default_val500.json
