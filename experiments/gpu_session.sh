#!/usr/bin/env bash
# One prepared script for a session that is lent a GPU (15 minutes of device time):
# the speed figures, then the reference and improved recipes for three seeds each,
# writing logs and results under ${OUT:-outputs/gpu}. Needs chest_xray/ (or DATA=...).
set -uo pipefail
out=${OUT:-outputs/gpu}; data=${DATA:-chest_xray}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python experiments/speed.py --data "$data" --batches 40 2>&1 | grep -v "img/s]" | tee "$out/speed.txt"
for recipe in reference improved; do
  /usr/bin/time -f "%e s wall" python experiments/accuracy.py --recipe "$recipe" --seeds 1 2 3 \
    --data "$data" --out "$out/runs" --train-args "--workers 6" 2>&1 | grep -v "it/s\|batch/s\|img/s" \
    | tail -30 | tee "$out/accuracy_$recipe.txt"
done
