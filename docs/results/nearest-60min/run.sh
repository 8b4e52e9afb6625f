#!/usr/bin/env bash
# Session 17: the session-15 recipe (../answer-late4-60min/) with hard locality inputs chosen by
# key nearness (--hard-locality nearest, 16 per record, same true answer first) instead of by
# true answer alone. Run on a quiet 2-core machine; ~53 min of training (100 s of it finding the
# nearest records, 9 min warming the row cache), ~5 min per evaluation.
set -euo pipefail
mend train --data ../shared/data/counterfact/counterfact-train.json --out runs/w6 \
  --minutes 58 --max-steps 7400 --cosine --val-every 500 --val-edits 256 --lower-precision bf16 \
  --c-loc-late 4 --late-fraction 0.75 --hard-locality nearest
mend eval --editor runs/w6/last --data ../shared/data/counterfact/counterfact-val.json --limit 500 \
  --out runs/w6/report500_last.json
for s in 1 2; do   # the check may take extra editor steps before it scales up (--steps)
  mend eval --editor runs/w6/last --data ../shared/data/counterfact/counterfact-val.json \
    --limit 500 --steps $s --out runs/w6/report500_last_steps$s.json
done
cp -r runs/w6/last runs/w6L      # the bank is written into the editor's folder
mend fit-shield --editor runs/w6L --data ../shared/data/counterfact/counterfact-train.json \
  --limit 3000 --leave-out ../shared/data/counterfact/counterfact-val.json
mend eval --editor runs/w6L --data ../shared/data/counterfact/counterfact-val.json --limit 500 \
  --shield 0.25 --out runs/w6/report500_last_shield0.25.json
