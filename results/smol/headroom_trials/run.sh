#!/bin/sh
# The validation trials behind the smol profile's scoring and task settings (val split only;
# 48 questions each, 8 per relation). Run from the repository root after `make smol-weights`.
set -e
out=results/smol/headroom_trials
py=".venv/bin/python -m fedrefine_lib.headroom --profile smol --split val --limit 48"
for scoring in loglik loglik_norm cloze; do
  $py --scoring $scoring --task distractors=3 --out $out/${scoring}_distractors3.json
done
for d in 0 1; do
  $py --scoring cloze --task distractors=$d --out $out/cloze_distractors$d.json
done
