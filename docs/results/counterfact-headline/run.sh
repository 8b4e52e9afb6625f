#!/usr/bin/env bash
# The CounterFact headline editor (w14) and its reports; w16 is the same recipe at seed 3.
# Run from the repository root on a quiet 2-core machine: ~58 min of training per editor,
# ~5 min per 500-edit evaluation, ~2.5 min per 250-edit variant. Reports are written under
# runs/ (not kept in git); the committed copies in this folder are named in README.md.
# The shipped `counterfact` recipe holds the training settings (README.md lists them as flags).
set -euo pipefail
val=../shared/data/counterfact/counterfact-val.json

mend train --recipe counterfact --out runs/w14                 # the recipe's seed, 1

# The check's start and ladder, chosen on val records 501-750 (not scored by the benchmark):
# w14_variants_val501-750.json
PYTHONPATH=src python experiments/check_variants.py --editor runs/w14/last --data $val --skip 500 --limit 250 \
  --variants '{}' '{"boost": [1.25, 1.5, 2]}' '{"boost": [1.1, 1.25, 1.5, 1.75, 2]}' \
  '{"start": 0.9, "boost": [1, 1.25, 1.5, 2]}' '{"start": 0.8, "boost": [1, 1.25, 1.5, 2]}'

# The headline and the two comparison columns (first 500 val records):
mend eval --editor runs/w14/last --data $val --limit 500 --start 0.9 --boost 1 1.25 1.5 2 \
  --editor-fp32 --out runs/w14/report500_start09.json     # w14_report_val500_last_ema_start09.json
mend eval --editor runs/w14/last --data $val --limit 500 \
  --out runs/w14/report500.json                           # w14_report_val500_last_ema.json (default check)
mend eval --editor runs/w14/last --data $val --limit 500 --boost \
  --out runs/w14/report500_unchecked.json                 # w14_report_val500_last_ema_unchecked.json

# Precision: bf16 editor branches (today's default, with the chunked head) and the model in bf16
mend eval --editor runs/w14/last --data $val --limit 500 --start 0.9 --boost 1 1.25 1.5 2 \
  --out runs/w14/report500_start09_bf16_branches.json     # ..._bf16_branches_chunked_head.json
mend eval --editor runs/w14/last --data $val --limit 500 --start 0.9 --boost 1 1.25 1.5 2 \
  --dtype bf16 --out runs/w14/report500_start09_model_bf16.json

# Another seed of the same recipe
mend train --recipe counterfact --seed 3 --out runs/w16
mend eval --editor runs/w16/last --data $val --limit 500 --start 0.9 --boost 1 1.25 1.5 2 \
  --out runs/w16/report500_start09.json                   # w16_report_val500_last_ema_start09.json
mend eval --editor runs/w16/last --data $val --limit 500 \
  --out runs/w16/report500.json                           # w16_report_val500_last_ema.json
