#!/usr/bin/env bash
# The training phantoms both recipes use: 700 studies at 832x1024 (a quarter of the seed study's
# geometry per side, 0.28 mm pixels) with lesions scaled for that resolution (phantom-train.json;
# the folder name carries a hash of it). Made once; prints the folder. STUDIES and DATA override
# the count and the folder.
set -euo pipefail
cd "$(dirname "$0")/../.."
STUDIES=${STUDIES:-700}
CONFIG=models/recipes/phantom-train.json
DATA=${DATA:-var/train/phantoms-832x1024-$(sha256sum "$CONFIG" | cut -c1-8)-n$STUDIES}
CRGATE=${CRGATE:-.venv/bin/crgate}
test -f "$DATA/truth.csv" || "$CRGATE" synth --out-dir "$DATA" --studies "$STUDIES" \
  --size 832x1024 --seed 2026 --config "$CONFIG" >&2
echo "$DATA"
