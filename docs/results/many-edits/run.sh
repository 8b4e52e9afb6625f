#!/usr/bin/env bash
# Many edits on SmolLM2-135M (2-core CPU, one thread per job, two jobs side by side): the
# least-squares editor trained through the solve (`counterfact-mass` recipe), and the identity
# control `ls`, on the first CounterFact val records (never seen in training, checkpoint
# choice or any choice of settings). Run from the repository root.
set -euo pipefail
export OMP_NUM_THREADS=1
E=runs/mass; R=docs/results/many-edits
mend train --recipe counterfact-mass --threads 1 --out $E                      # 62 minutes
cp $E/editor_config.json $E/train_curves.png $R/                               # (+ log summary)
python benchmarks/mass_step.py --edits 100 1000 --plain 100 > $R/mass_step.txt   # peak memory
# single edits through the solve (the editor's default), checked
mend eval --threads 1 --editor $E --data counterfact-val --limit 200 --out $R/single-ls.json > $R/single-ls.txt
# 10, 100, 1,000 edits in one change (100 edits at k = 10, 500 at k = 100, 1,000 at k = 1,000;
# ls finished at k = 10 only: k = 100 is the command after it; k = 1,000 was not run)
python benchmarks/compare.py --threads 1 --setting mass --sizes 10 100 1000 --limit-per-size 100=500 \
  --methods mend ls --editor $E --data counterfact-val --limit 1000 --out $R/mass > $R/mass.txt
mend eval --threads 1 --method ls --data counterfact-val --limit 100 --batch-size 100 --out $R/ls-k100.json > $R/ls-k100.txt
# zsRE, the same editor (trained on CounterFact only), 100 edits in one change
mend eval --threads 1 --editor $E --data zsre-eval --limit 100 --batch-size 100 --out $R/zsre-k100.json > $R/zsre-k100.txt
# a 1,000-request edit against a forward pass over the same prompts
python benchmarks/mass_edit_time.py --editor $E --sizes 100 1000 --threads 1 > $R/mass_edit_time.txt
# 1,000 edits in sequence in batches of 100 and of 1, all re-scored after 500 and 1,000; the same with
# the editor's input statistics adapted at every edit
python benchmarks/compare.py --threads 1 --setting lifelong --batch-sizes 100 --methods mend \
  --editor $E --data counterfact-val --limit 1000 --every 500 --out $R/lifelong > $R/lifelong.txt
python benchmarks/compare.py --threads 1 --setting lifelong --batch-sizes 1 --methods mend \
  --editor $E --data counterfact-val --limit 1000 --every 500 --out $R/lifelong > $R/lifelong-b1.txt
mend eval --threads 1 --editor $E --data counterfact-val --limit 1000 --batch-size 100 --sequential \
  --adapt-stats --every 500 --out $R/lifelong-b100-adapt-stats.json > $R/lifelong-b100-adapt-stats.txt
# a single-edit editor's own edits combined by least squares (the demo editor, `make demo`)
mend eval --threads 1 --editor runs/demo --aggregate singles --data counterfact-val --limit 500 \
  --batch-size 100 --sequential --out $R/singles/lifelong-b100.json > $R/singles/lifelong-b100.txt
