#!/usr/bin/env bash
# ROME, MEMIT and AlphaEdit on SmolLM2-135M (2-core CPU, one thread per job), next to mend's
# results in ../many-edits and ../counterfact-headline. Run from the repository root.
set -euo pipefail
export OMP_NUM_THREADS=1
R=docs/results/peers
# 1. blocks (and MEMIT's covariance weight) chosen on the last 10 CounterFact *training* edits
python benchmarks/locate_layers.py --threads 1 --edits 10 --rome 3 6 9 12 15 \
  --memit 1-5 4-8 7-11 > $R/layers.txt
python benchmarks/locate_layers.py --threads 1 --edits 10 --memit 8-12 4-8 \
  --mom2-weights 1500 150 > $R/layers-mom2.txt
# 2. the first CounterFact val records: ROME's single edits; MEMIT and AlphaEdit 100 in one change
python benchmarks/compare.py --threads 1 --setting mass --sizes 1 --limit-per-size 1=100 \
  --methods rome --layers 12 --data counterfact-val --limit 100 --out $R/mass
python benchmarks/compare.py --threads 1 --setting mass --sizes 1 --limit-per-size 1=500 \
  --methods rome --layers 12 --data counterfact-val --limit 500 --out $R/single500
python benchmarks/compare.py --threads 1 --setting mass --sizes 100 --methods memit alphaedit \
  --layers 8 9 10 11 12 --mom2-weight 150 --data counterfact-val --limit 100 --out $R/mass
python benchmarks/compare.py --threads 1 --setting mass --sizes 10 --limit-per-size 10=100 --methods memit \
  --layers 8 9 10 11 12 --mom2-weight 150 --data counterfact-val --limit 100 --out $R/mass --force
# 3. AlphaEdit in sequence: 30 edits in batches of 10, all re-scored after each batch
python benchmarks/compare.py --threads 1 --setting lifelong --batch-sizes 10 --methods alphaedit \
  --layers 8 9 10 11 12 --mom2-weight 150 --data counterfact-val --limit 30 --every 10 --out $R/lifelong
# 4. zsRE: ROME's single edits on the first 30 eval records
mend eval --threads 1 --method rome --layers 12 --data zsre-eval --limit 30 --out $R/zsre-rome.json > $R/zsre-rome.txt
