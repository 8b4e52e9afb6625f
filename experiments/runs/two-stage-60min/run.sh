#!/bin/bash
# The c_loc 3 fine-tune inside the 60-minute budget (39 + 17 min of training).
set -e
cd "$(dirname "$0")/../../.."   # the repository root
source .venv/bin/activate
D=../shared/data/counterfact
date
mend train --data $D/counterfact-train.json --out runs/ts1 \
  --minutes 39 --max-steps 3600 --cosine --val-every 500 --val-edits 256 --lower-precision bf16
date
mend train --init runs/ts1 --data $D/counterfact-train.json --out runs/ts2 \
  --minutes 17 --max-steps 1300 --cosine --lr 3e-5 --val-every 250 --val-edits 256 --lower-precision bf16 --c-loc 3
date
mend eval --editor runs/ts2 --data $D/counterfact-val.json --limit 500 --out runs/ts2/report500.json
date
mend fit-shield --editor runs/ts2 --data $D/counterfact-train.json --limit 3000
mend eval --editor runs/ts2 --data $D/counterfact-val.json --limit 500 --shield 0.5 --out runs/ts2/report500_shield0.5.json
date
