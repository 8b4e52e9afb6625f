#!/usr/bin/env bash
# w3, w2 (2026-11-28): two 60-minute variants of w1's recipe (experiments/runs/late-loc-60min/run.sh),
# one change each. Run on a quiet 2-core machine, one after the other; ~53 min of training and
# ~5 min per evaluation each.
set -euo pipefail
# (a) hard locality inputs by true answer (then new), else w1's recipe
mend train --data ../shared/data/counterfact/counterfact-train.json --out runs/w3 \
  --minutes 56 --max-steps 6800 --cosine --val-every 500 --val-edits 256 --lower-precision bf16 \
  --c-loc-late 3 --late-fraction 0.75 --hard-locality answer
mend eval --editor runs/w3/last --data ../shared/data/counterfact/counterfact-val.json --limit 500 \
  --out runs/w3/report500_last.json
# (b) a longer, stronger late locality phase (c_loc 4 from 60% of the steps), hard inputs by relation
mend train --data ../shared/data/counterfact/counterfact-train.json --out runs/w2 \
  --minutes 56 --max-steps 6800 --cosine --val-every 500 --val-edits 256 --lower-precision bf16 \
  --c-loc-late 4 --late-fraction 0.6
mend eval --editor runs/w2/last --data ../shared/data/counterfact/counterfact-val.json --limit 500 \
  --out runs/w2/report500_last.json
# (a) shielded: bank of the first 3,000 training records less the 7 whose prompt is one of these
# 500 edits' locality probes (as in late-loc-60min/run.sh)
python - <<'PY'
import json
val = json.load(open("../shared/data/counterfact/counterfact-val.json"))[:500]
probes = {r["locality_prompt"] for r in val}
train = json.load(open("../shared/data/counterfact/counterfact-train.json"))[:3000]
json.dump([r for r in train if r["prompt"] not in probes], open("/tmp/bank_facts.json", "w"))
PY
cp -r runs/w3/last runs/w3L
mend fit-shield --editor runs/w3L --data /tmp/bank_facts.json
mend eval --editor runs/w3L --data ../shared/data/counterfact/counterfact-val.json --limit 500 \
  --shield 0.5 --out runs/w3L/report500_shield0.5.json
