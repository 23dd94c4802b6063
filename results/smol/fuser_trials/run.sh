#!/bin/sh
# Fuser recipe trials for the smol profile (validation split only, all 144 questions). Run from
# the repository root after `make smol-weights`; each trial's fuser stays in the hub under
# its own variant, so a re-run reuses it.
set -e
out=results/smol/fuser_trials
py="env HF_HUB_OFFLINE=1 .venv/bin/python -m fedrefine_lib.fuser_trial --profile smol --split val"
$py --out $out/profile.json                                  # the profile's recipe: lr 1e-4, 1 epoch
$py --set lr=1e-3 --out $out/lr1e-3.json
$py --set lr=1e-3 --set epochs=3 --out $out/lr1e-3_epochs3.json
