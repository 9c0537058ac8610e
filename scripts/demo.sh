#!/usr/bin/env bash
# The main job end to end on phantom radiographs: run as `make demo` (or `bash scripts/demo.sh DIR`).
# Each step is a plain cxrlite command, echoed before it runs.
set -euo pipefail
OUT=${1:-demo}
mkdir -p "$OUT"
run() { echo "+ $*"; "$@"; }

run cxrlite data phantoms --n 2000 --out "$OUT/phantoms" --seed 0
run cxrlite data show "$OUT/phantoms" --out "$OUT/sheet.png"
first=$(python3 -c "import json,sys; print(json.loads(open(sys.argv[1]).readline())['image'])" "$OUT/phantoms/manifest.jsonl")
run cxrlite data dicom "$OUT/phantoms/$first" --out "$OUT/study.dcm" --monochrome1
run cxrlite data inspect "$OUT/study.dcm" --png "$OUT/study-model-input.png"
python3 -c "
import json, sys
with open(sys.argv[1]) as f, open(sys.argv[2], 'w') as out:
    for line in f:
        s = json.loads(line)
        out.write(json.dumps({'id': s['id'], 'text': (s['findings'] or '') + ' ' + (s['impression'] or '')}) + '\n')
" "$OUT/phantoms/manifest.jsonl" "$OUT/reports.jsonl"
run cxrlite data label "$OUT/reports.jsonl" --out "$OUT/labels.jsonl"
run cxrlite data tasks "$OUT/phantoms" --out "$OUT/tasks.jsonl"
echo "demo finished: see $OUT/sheet.png and $OUT/study-model-input.png"
