#!/usr/bin/env bash
# Refresh constraints.txt: resolve the newest releases that cxrlite's requirements allow in a new
# virtual environment (torch pinned to the CPU wheel), then write every installed version.
# Run `make test` in a new environment afterwards and commit constraints.txt only if it passes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
$PYTHON -m venv "$venv"
"$venv/bin/python" -m pip install -q -U pip
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q -e ".[dev,pacs]"
PYTHON="$venv/bin/python" CONSTRAINTS=/dev/null bash scripts/install_gptq.sh
{
    sed -n '/^#/p' constraints.txt
    "$venv/bin/python" -m pip freeze --exclude-editable | sed 's/+cpu$//'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)"
