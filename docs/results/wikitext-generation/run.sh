#!/usr/bin/env bash
# WikiText generation edits on SmolLM2-135M (2-core CPU shared with other jobs, one thread):
# records from ../shared/data/wikitext/wiki.valid.raw, an editor trained for 40 minutes with the
# `wikitext` recipe, then MEND and fine-tuning on the same first 200 evaluation records.
# Run from the repository root.
set -euo pipefail
export OMP_NUM_THREADS=1
W=runs/wikitext; R=docs/results/wikitext-generation
mend data wikitext --threads 1 --split eval --out $W/eval.jsonl     # 821 records, 11 articles
mend data wikitext --threads 1 --split train --out $W/train.jsonl   # 22 other articles
mend train --recipe wikitext --data $W/train.jsonl --threads 1 --minutes 40 --out $W/editor
cp $W/editor/editor_config.json $W/editor/train_curves.png $R/
# every validation, every 100th step and the last, of the full log
python - $W/editor/train_log.jsonl > $R/train_log.summary.jsonl <<'P'
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1])]
for r in rows:
    if "val" in r or r.get("step", 1) % 100 == 0 or r is rows[-1]:
        print(json.dumps(r))
P
# MEND with the default check (a single edit whose continuation is not yet the model's answer
# is scaled by 1.5, then 2), and fine-tuning of the same matrices, on the same 200 edits
mend eval --threads 1 --editor $W/editor --data $W/eval.jsonl --limit 200 --generation \
  --out $R/mend.json > $R/mend.txt
mend eval --threads 1 --method ft --data $W/eval.jsonl --limit 200 --generation \
  --out $R/ft.json > $R/ft.txt
