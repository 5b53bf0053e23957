#!/usr/bin/env bash
# Install SAELens and sparsify into a throwaway virtual environment (reusing this environment's torch and
# saecompress) and run the tests that load saecompress's exports with the libraries themselves.
#   bash tests/check_libraries.sh
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m venv --system-site-packages "$work/venv"
torch_version="$(python -c 'import torch; print(torch.__version__.split("+")[0])')"
"$work/venv/bin/pip" install -q sae-lens eai-sparsify "torch==$torch_version"
"$work/venv/bin/python" -m pytest -q -rs tests/test_export_library.py -k "itself_loads"
