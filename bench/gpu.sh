#!/usr/bin/env bash
# The overhead bench on a GPU, for when one is available: the flight recorder alone (eager and
# compiled), the default schedule with it, and device->host transfers per step. About 3-4
# minutes on one GPU (most of it torch.compile); results in bench-gpu.txt (or $OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}/bench-gpu.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out"
python bench/overhead.py --device cuda --rounds 10 --steps-per-round 8 --schedule-steps 300 \
    --modes plain,plain-b,unrecorded,flight,flight-offline,standard | tee -a "$out"
timeout 240 python bench/overhead.py --device cuda --compile --rounds 10 --steps-per-round 8 \
    --schedule-steps 0 --modes plain,plain-b,flight,flight-offline | tee -a "$out"
python bench/flight_share.py --device cuda --steps 40 | tee -a "$out"
