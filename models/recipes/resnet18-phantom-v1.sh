#!/usr/bin/env bash
# Makes models/resnet18-phantom-v1.{onnx,json}: ResNet18 written in models/architectures.py,
# trained from scratch (no pretrained weights can be downloaded here) on the same phantoms and CR
# mixture as the shipped CNN3. Not shipped: on 2 CPU cores one epoch over the 1400 training breasts
# x 6 CRs takes about 10 minutes (75 ms per breast forward + backward), 20 epochs over 3 hours;
# on a GPU (torch picks CUDA when present) it takes minutes. The ONNX file is about 45 MB.
set -euo pipefail
cd "$(dirname "$0")/../.."
CRGATE=${CRGATE:-.venv/bin/crgate}
DATA=$(models/recipes/phantoms.sh)
"$CRGATE" train --data-dir "$DATA" --arch resnet18 --name resnet18-phantom --version v1 \
  --crs 1,25,100,1000,5000,11000 --epochs 20 --seed 0 --out-dir models "$@"
