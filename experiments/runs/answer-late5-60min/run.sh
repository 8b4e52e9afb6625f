#!/usr/bin/env bash
# w5 (2026-11-30): w4's recipe (../answer-late4-60min/) with the late locality weight 5
# instead of 4, everything else the same. Run on a quiet 2-core machine; ~54 min of training,
# ~5 min per evaluation. Then the same editor shielded (a key bank of 3,000 training facts,
# less the locality probes of every val record), at beta 0.25 and 0.5.
set -euo pipefail
mend train --data ../shared/data/counterfact/counterfact-train.json --out runs/w5 \
  --minutes 58 --max-steps 7400 --cosine --val-every 500 --val-edits 256 --lower-precision bf16 \
  --c-loc-late 5 --late-fraction 0.75 --hard-locality answer
mend eval --editor runs/w5/last --data ../shared/data/counterfact/counterfact-val.json --limit 500 \
  --out runs/w5/report500_last.json
cp -r runs/w5/last runs/w5L      # the bank is written into the editor's folder
mend fit-shield --editor runs/w5L --data ../shared/data/counterfact/counterfact-train.json \
  --limit 3000 --leave-out ../shared/data/counterfact/counterfact-val.json
for b in 0.25 0.5; do
  mend eval --editor runs/w5L --data ../shared/data/counterfact/counterfact-val.json --limit 500 \
    --shield $b --out runs/w5/report500_last_shield$b.json
done
# Later the same day, with the check that gives an edit no scale brings to its target MEND's own change:
mend eval --editor runs/w5/last --data ../shared/data/counterfact/counterfact-val.json --limit 500 \
  --out runs/w5/report500_last_v2.json
for l in "1.5 2" "1.25 1.5 2"; do   # boost ladders on val records 501-750
  mend eval --editor runs/w5/last --data ../shared/data/counterfact/counterfact-val.json \
    --skip 500 --limit 250 --boost $l --out runs/w5/tune_$(echo $l | tr ' ' _).json
done
