#!/usr/bin/env bash
# w6 (2026-11-30): w4's recipe (../answer-late4-60min/) with hard locality inputs chosen by
# key nearness (--hard-locality nearest, 16 per record, same true answer first) instead of by
# true answer alone. Run on a quiet 2-core machine; ~53 min of training (100 s of it finding the
# nearest records, 9 min warming the row cache), ~5 min per 500-edit evaluation.
set -euo pipefail
val=../shared/data/counterfact/counterfact-val.json
mend train --data ../shared/data/counterfact/counterfact-train.json --out runs/w6 \
  --minutes 58 --max-steps 7400 --cosine --val-every 500 --val-edits 256 --lower-precision bf16 \
  --c-loc-late 4 --late-fraction 0.75 --hard-locality nearest

# With the check as it is now (an edit that no scale brings to its target gets MEND's own change):
mend eval --editor runs/w6/last --data $val --limit 500 --out runs/w6/report500_last_v2.json
mend eval --editor runs/w6/last --data $val --limit 500 --boost \
  --out runs/w6/report500_last_unchecked.json                       # plain MEND, unchecked
# Boost ladders compared on val records 501-750 (not scored by the benchmark), then the
# chosen one on the first 500:
for l in "1.5 2" "1.25 1.5 2" "1.5 2 3" "1.25 1.5 2 3"; do
  mend eval --editor runs/w6/last --data $val --skip 500 --limit 250 --boost $l \
    --out runs/w6/tune_$(echo $l | tr ' ' _).json
done
mend eval --editor runs/w6/last --data $val --limit 500 --boost 1.25 1.5 2 \
  --out runs/w6/report500_last_v2_boost125.json       # the ladder chosen on 501-750

# With the earlier check (commit 9f4e5c0: an edit that no scale brought to its
# target kept the last scale), the *_oldcheck.json reports:
#   mend eval --editor runs/w6/last --data $val --limit 500 --out .../report500_last.json
#   the same with --boost 1.25 1.5 2.0 (report500_last_boost125.json)
#   at commit c30a49e, the same with --steps 1: one extra editor step before scaling up
#     (report500_last_steps1.json; the option was removed again)
#   shielded: cp -r runs/w6/last runs/w6L; mend fit-shield --editor runs/w6L \
#     --data ../shared/data/counterfact/counterfact-train.json --limit 3000 --leave-out $val
#     mend eval --editor runs/w6L --data $val --limit 500 --shield 0.25 (..._shield0.25.json)
