#!/usr/bin/env bash
# Reproduces models/cnn3-phantom-v1.{onnx,json}: 1000 phantom studies at 832x1024 (a quarter of
# the seed study's geometry per side) with lesions scaled for that resolution
# (models/recipes/phantom-train.json), CNN3 trained on the CR mixture 1, 25, 100, 1K, 5K, 11K,
# tested at the seed study's eleven CRs. About 25 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-var/train/phantoms-832x1024}
CRGATE=${CRGATE:-.venv/bin/crgate}
test -f "$DATA/truth.csv" || "$CRGATE" synth --out-dir "$DATA" --studies 1000 --size 832x1024 \
  --seed 2026 --config models/recipes/phantom-train.json
"$CRGATE" train --data-dir "$DATA" --arch cnn3 --name cnn3-phantom --version v1 \
  --crs 1,25,100,1000,5000,11000 --epochs 20 --seed 0 --out-dir models "$@"
