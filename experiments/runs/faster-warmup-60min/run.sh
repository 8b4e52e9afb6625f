#!/usr/bin/env bash
# w11, w12 (2026-11-30): the recipe of ../ema-60min/ (w9, w10) after the warm-up and prompt keys were
# batched by token count (about 3 minutes sooner to the first step), with the steps that frees.
# w11: seed 1 (the seed w8 and w10 missed locality with), 8,200 steps; run before --minutes
#      counted the key statistics and the prompt keys: 57.1 minutes on the training clock,
#      60.5 minutes of wall time for the whole command.
# w12: seed 2, 7,800 steps, with --minutes counting everything after the model has loaded.
# Run on a quiet 2-core machine; ~5.5 min per 500-edit evaluation.
set -euo pipefail
val=../shared/data/counterfact/counterfact-val.json
recipe=(--data ../shared/data/counterfact/counterfact-train.json --minutes 58 --cosine
  --val-every 500 --val-edits 256 --lower-precision bf16 --c-loc-late 4 --late-fraction 0.75
  --hard-locality answer --hard-locality-late nearest --ema 0.998)
mend train "${recipe[@]}" --out runs/w11 --max-steps 8200 --seed 1
mend eval --editor runs/w11/last --data $val --limit 500 --out runs/w11/report500_last_ema.json
mend train "${recipe[@]}" --out runs/w12 --max-steps 7800 --seed 2
mend eval --editor runs/w12/last --data $val --limit 500 --out runs/w12/report500_last_ema.json
