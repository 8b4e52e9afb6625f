#!/usr/bin/env bash
# w4 (2026-11-28): the best recipe of ../hard-locality-60min/ ((a): hard locality inputs by true
# answer) with a stronger late locality phase (c_loc 4 instead of 3 for the last quarter) and
# 600 more steps, still inside the hour. Run on a quiet 2-core machine; ~56 min of training,
# ~5 min per evaluation.
set -euo pipefail
mend train --data ../shared/data/counterfact/counterfact-train.json --out runs/w4 \
  --minutes 58 --max-steps 7400 --cosine --val-every 500 --val-edits 256 --lower-precision bf16 \
  --c-loc-late 4 --late-fraction 0.75 --hard-locality answer
mend eval --editor runs/w4/last --data ../shared/data/counterfact/counterfact-val.json --limit 500 \
  --out runs/w4/report500_last.json
mend eval --editor runs/w4/last --data ../shared/data/counterfact/counterfact-val.json --limit 500 \
  --boost --out runs/w4/report500_last_unchecked.json     # plain MEND's edit, same editor
