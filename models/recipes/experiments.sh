#!/usr/bin/env bash
# The seed study's three training experiments on phantoms (docs/cr-study.md "Training experiments"):
# 300 studies at 832x1024 made like the shipped model's training data (phantoms.sh), CNN3, the
# study's eleven CRs, 700 optimisation steps per model. matrix trains one model per CR and tests
# each on every CR (its diagonal is the same-cr experiment, which then trains nothing);
# augmentation trains the ten CR ranges 1-15 ... 1-11K and reuses M-CR1. Reruns resume.
# Extra arguments go to every `crgate experiment` call (e.g. --arch cnn3,resnet18).
set -euo pipefail
cd "$(dirname "$0")/../.."
CRGATE=${CRGATE:-.venv/bin/crgate}
DATA=$(STUDIES=${STUDIES:-300} models/recipes/phantoms.sh)
OUT=${OUT:-var/experiments}
for name in matrix same-cr augmentation; do
  "$CRGATE" experiment "$name" --data-dir "$DATA" --out "$OUT" --steps 700 "$@"
done
