#!/usr/bin/env bash
# w9, w10 (2026-11-30): the recipe of ../answer-nearest-late-60min/ (w7, w8) with the editor's weights
# averaged (--ema 0.998: validation, the best checkpoint and last/ hold an exponential moving
# average over about the last 500 steps; training moves the raw weights, which
# last/train_state.pt keeps). w9 is seed 0, w10 seed 1.
# Run on a quiet 2-core machine; ~53 min of training, ~5.5 min per 500-edit evaluation.
set -euo pipefail
val=../shared/data/counterfact/counterfact-val.json
for seed in 0 1; do
  out=runs/w$((9 + seed))
  mend train --data ../shared/data/counterfact/counterfact-train.json --out $out \
    --minutes 58 --max-steps 7400 --cosine --val-every 500 --val-edits 256 --lower-precision bf16 \
    --c-loc-late 4 --late-fraction 0.75 --hard-locality answer --hard-locality-late nearest \
    --ema 0.998 --seed $seed
  mend eval --editor $out/last --data $val --limit 500 --out $out/report500_last_ema.json
  # The same run's raw weights (last/train_state.pt's "raw"), for a paired comparison:
  python - "$out" <<'PY'
import shutil, sys, pathlib, torch
from mend.checkpoint import load_editor, load_train_state, resave_editor
src = pathlib.Path(sys.argv[1]) / "last"
dst = pathlib.Path(sys.argv[1] + "raw")
shutil.copytree(src, dst, dirs_exist_ok=True)
(dst / "train_state.pt").unlink()
editor = load_editor(src)
with torch.no_grad():
    for p, r in zip(editor.parameters(), load_train_state(src)["raw"], strict=True):
        p.copy_(r)
resave_editor(dst, editor)
PY
  mend eval --editor ${out}raw --data $val --limit 500 --out $out/report500_last_raw.json
done
