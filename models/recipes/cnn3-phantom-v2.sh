#!/usr/bin/env bash
# Reproduces models/cnn3-phantom-v2.{onnx,json} from nothing in about 30 minutes on 2 CPU cores
# (figures in docs/classifier.md): 700 phantom studies at 832x1024 (phantoms.sh), CNN3 trained on
# the original of every training breast plus one compressed copy at a CR drawn from the study's
# CRs up to 1K, 18 epochs, tested at nine of the study's eleven CRs. Extra arguments go to `crgate train`
# (e.g. --out-dir var/try --cache-dir var/cache/try).
set -euo pipefail
cd "$(dirname "$0")/../.."
CRGATE=${CRGATE:-.venv/bin/crgate}
DATA=$(models/recipes/phantoms.sh)
"$CRGATE" train --data-dir "$DATA" --arch cnn3 --name cnn3-phantom --version v2 \
  --crs 1,15,20,25,50,100,500,1000 --lossy-copies 1 \
  --test-crs 1,15,25,50,100,500,1000,5000,11000 --align 32 --view-gap 64 \
  --epochs 18 --seed 0 --out-dir models "$@"
