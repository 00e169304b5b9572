#!/usr/bin/env bash
# The training phantoms both recipes use: 1000 studies at 832x1024 with lesions scaled for that
# resolution (phantom-train.json). Made once; prints the folder.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-var/train/phantoms-832x1024}
CRGATE=${CRGATE:-.venv/bin/crgate}
test -f "$DATA/truth.csv" || "$CRGATE" synth --out-dir "$DATA" --studies 1000 --size 832x1024 \
  --seed 2026 --config models/recipes/phantom-train.json >&2
echo "$DATA"
