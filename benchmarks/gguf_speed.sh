#!/usr/bin/env bash
# Speed of the default model (SmolLM2-135M-Instruct, Q4_1 as shipped) in llama.cpp, whole and with
# the default selection's M = 8 and M = 12 picks removed inside the GGUF (docs/gguf.md):
#   bash benchmarks/gguf_speed.sh [OUTPUT_DIR] [REPEATS]
# Needs `make setup-gguf`. The picks are the ones docs/study.md records for the default selection
# at full size (M = 8: 4-7, 14, 16-18; M = 12: 3-7, 12-18), not recomputed here.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/gguf-speed}
REPEATS=${2:-7}
BIN=.venv/bin/cboprune
mkdir -p "$OUT"
time $BIN prune --model default --blocks 4,5,6,7,14,16,17,18 --output "$OUT/M8.gguf" --overwrite
time $BIN prune --model default --blocks 3,4,5,6,7,12,13,14,15,16,17,18 --output "$OUT/M12.gguf" --overwrite
$BIN bench --engine llama.cpp default "$OUT/M8.gguf" "$OUT/M12.gguf" --lengths 128,512 --new-tokens 64 \
    --repeats "$REPEATS" --warmup 1 --threads "$(nproc)" -o "$OUT/bench" --overwrite
