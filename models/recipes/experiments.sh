#!/usr/bin/env bash
# The seed study's three training experiments on phantoms, as recorded in docs/cr-study.md
# "Results on phantoms": the shipped model's 700 phantom studies at 832x1024 (phantoms.sh),
# CNN3, 800 optimisation steps per model. matrix trains one model per CR of the study's eleven
# and tests each on every CR (its diagonal is the same-cr experiment, which then trains
# nothing); augmentation trains the CR ranges 1-15, 1-100, 1-1K, 1-5K and 1-11K (the original
# plus one copy per breast at a CR drawn from the range) and reuses M-CR1. Reruns resume.
# Extra arguments go to every `crgate experiment` call (e.g. --arch cnn3,resnet18).
set -euo pipefail
cd "$(dirname "$0")/../.."
CRGATE=${CRGATE:-.venv/bin/crgate}
DATA=$(STUDIES=${STUDIES:-700} models/recipes/phantoms.sh)
OUT=${OUT:-var/experiments}
for name in matrix same-cr; do
  "$CRGATE" experiment "$name" --data-dir "$DATA" --out "$OUT" --steps 800 "$@"
done
"$CRGATE" experiment augmentation --data-dir "$DATA" --out "$OUT" --steps 800 \
  --crs 1,15,100,1000,5000,11000 "$@"
