#!/usr/bin/env bash
# The main job end to end on phantom radiographs: `make demo` (or `bash scripts/demo.sh DIR`).
# phantoms -> train (4 stages, a shortened `small` schedule) -> export -> quantize -> report -> bench.
# Each step is a plain cxrlite command, echoed before it runs; re-running resumes training.
set -euo pipefail
OUT=${1:-demo}
# 6,000 phantoms rendered at the model's 128 px: the ViT learns from scratch, and fewer images
# overfit it (2,000: held-out findings F1 ~0.1 at this schedule).
N_PHANTOMS=${N_PHANTOMS:-6000}
STEPS_SCALE=${STEPS_SCALE:-0.35}
mkdir -p "$OUT"
run() { echo "+ $*"; "$@"; }

run cxrlite data phantoms --n "$N_PHANTOMS" --out "$OUT/phantoms" --seed 0 --size 128 --workers 2
run cxrlite data show "$OUT/phantoms" --out "$OUT/sheet.png"
run cxrlite train --preset small --data "$OUT/phantoms" --out "$OUT/run" --steps-scale "$STEPS_SCALE"
ckpt="$OUT/run/stage3-instruction/checkpoint"
run cxrlite export "$ckpt" --out "$OUT/bundle" --int8 --overwrite
run cxrlite quantize "$OUT/bundle" --gguf q8_0,q4_k_m --gptq --eval-studies 12
# A held-out phantom, as a MONOCHROME1 12-bit DICOM: the path hospital IT will use.
test_image=$(python3 -c "
import json, sys
for line in open(sys.argv[1]):
    s = json.loads(line)
    if s['split'] == 'test':
        print(s['image']); break" "$OUT/phantoms/manifest.jsonl")
run cxrlite data dicom "$OUT/phantoms/$test_image" --out "$OUT/study.dcm" --monochrome1
run cxrlite data inspect "$OUT/study.dcm" --png "$OUT/study-model-input.png"
run cxrlite report "$OUT/study.dcm" --bundle "$OUT/bundle"
run cxrlite bench "$OUT/bundle" --image "$OUT/study.dcm" --runs 5 --threads 1 --out "$OUT/bench"
echo "demo finished: sheet $OUT/sheet.png, bundle $OUT/bundle, benchmark $OUT/bench/bench.md"
