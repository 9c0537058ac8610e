#!/usr/bin/env bash
# GPTQModel (the maintained successor of the archived AutoGPTQ) on a CPU install, without
# letting it replace torch or numpy:
# - 7.7+ requires torch >= 2.14.1 (CUDA wheels only here); 7.6.0 accepts the CPU torch 2.13.0.
# - 7.6.0 pins numpy==2.2.6, which would downgrade numpy: install it --no-deps with its runtime
#   requirements listed here under a constraint file.
# - torchao (its FP4 path, which cxrlite does not use) is left out: once installed, transformers
#   imports it on every model load and it prints native-library warnings.
# - Everything else comes from constraints.txt (the versions CI passed with), like `make install`.
set -euo pipefail
PYTHON=${PYTHON:-python3}
LOCK=${CONSTRAINTS:-$(dirname "$0")/../constraints.txt}
if $PYTHON -c "import gptqmodel" >/dev/null 2>&1; then exit 0; fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
printf 'torch==%s\nnumpy==%s\n' "$($PYTHON -c 'import torch; print(torch.__version__.split("+")[0])')" \
    "$($PYTHON -c 'import numpy; print(numpy.__version__)')" > "$constraints"
$PYTHON -m pip install -q -c "$constraints" -c "$LOCK" defuser==0.0.28 device-smi==0.5.7 logbar==0.4.15 pypcre==0.6.4 \
    tokenicer==0.0.14 "datasets>=3.6.0" "dill>=0.3.8" "maturin>=1.9.4" "ninja>=1.13.0" "pyarrow>=21.0" \
    "threadpoolctl>=3.6.0"
$PYTHON -m pip install -q --no-deps -c "$constraints" -c "$LOCK" "gptqmodel==7.6.0"
