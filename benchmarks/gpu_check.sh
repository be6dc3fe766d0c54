#!/usr/bin/env bash
# A short prepared GPU check of the published recipes, sized to finish within 8 minutes on one modern
# GPU (not run yet: the course was built without one):
#   1. 200 AMP training steps of dino_r50_coco on synthetic COCO-sized images (800 x 1066, the
#      recipe's 2 images per GPU): the loss must stay finite, images/s and peak memory are measured;
#   2. the throughput table of every *_r50_coco preset (20 timed steps each).
# Results: benchmarks/results/gpu_check.md (+ .json) and benchmarks/results/gpu_throughput.md (+ .json).
# Usage: bash benchmarks/gpu_check.sh   (PYTHON=... to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh needs a CUDA GPU')"
start=$(date +%s)
"$py" benchmarks/gpu_throughput.py --presets dino_r50_coco --steps 200 --warmup 10 \
  --out benchmarks/results/gpu_check.md
"$py" benchmarks/gpu_throughput.py --steps 20 --warmup 5 --out benchmarks/results/gpu_throughput.md
echo "gpu_check.sh finished in $(( $(date +%s) - start )) s"
