#!/usr/bin/env bash
# MiniLM-L6 fact-checking: the claims and edits, the verdict classifier, its editor, and the
# edits scored for mend and for fine-tuning (ft). One thread of a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/../../.."
export OMP_NUM_THREADS=1
OUT=docs/results/fact-checking-minilm
MEND=.venv/bin/mend

$MEND factcheck-data --out runs/factcheck-data
$MEND finetune --threads 1 --model minilm-l6 --recipe factcheck-minilm --out runs/minilm-verdict
cp runs/minilm-verdict/finetune_report.json $OUT/
# stdout: the validation lines and the run's summary
$MEND train --threads 1 --model runs/minilm-verdict --recipe factcheck-minilm \
  --out runs/factcheck-editor > $OUT/train.log
cp runs/factcheck-editor/train_curves.png $OUT/
$MEND eval --threads 1 --model runs/minilm-verdict --editor runs/factcheck-editor \
  --data runs/factcheck-data/edits-test.jsonl --ppl-windows 0 --out $OUT/mend.json
$MEND eval --threads 1 --model runs/minilm-verdict --method ft \
  --data runs/factcheck-data/edits-test.jsonl --ppl-windows 0 --out $OUT/ft.json
