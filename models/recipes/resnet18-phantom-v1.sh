#!/usr/bin/env bash
# Makes models/resnet18-phantom-v1.{onnx,json}: ResNet18 written in models/architectures.py,
# trained from scratch (no pretrained weights can be downloaded here) on the same phantoms, CR
# mixture (original + one copy per breast at a CR up to 1K) and input geometry as
# cnn3-phantom-v2, 6 epochs. It reuses the compressed copies the CNN3 recipe cached (same cache
# folder); on 2 CPU cores fitting takes most of the time (figures in docs/classifier.md); on a
# GPU (torch picks CUDA when present) minutes. The ONNX file is about 45 MB.
set -euo pipefail
cd "$(dirname "$0")/../.."
CRGATE=${CRGATE:-.venv/bin/crgate}
DATA=$(models/recipes/phantoms.sh)
"$CRGATE" train --data-dir "$DATA" --arch resnet18 --name resnet18-phantom --version v1 \
  --crs 1,15,20,25,50,100,500,1000 --lossy-copies 1 \
  --test-crs 1,15,25,50,100,500,1000,5000,11000 --align 32 --view-gap 64 \
  --epochs 6 --seed 0 --out-dir models "$@"
