#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the wheels that the GPU machine's image lacks, into
# ./wheels (git-ignored), for its Python 3.12; then pass carry=["wheels"] to the device run, and
# benchmarks/gpu_check.sh installs them with --no-deps before building.
#   datasets (+ dill, multiprocess): a runtime dependency of sppo_fast that the image does not hold
#     (5.0.0: the newest that accepts the image's huggingface-hub 1.x);
#   llm-blender (+ dataclasses-json, marshmallow, typing-inspect): the PairRM tests' yardstick;
#   flashdeberta, liger-kernel, cut-cross-entropy: the peers of the attention and fused-linear benchmarks.
# Everything is pure Python (about 2 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p wheels
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform any -d wheels \
  datasets==5.0.0 dill==0.4.0 multiprocess==0.70.18 llm-blender==0.0.2 dataclasses-json==0.6.7 marshmallow==3.26.1 \
  typing-inspect==0.9.0 flashdeberta==0.0.8 liger-kernel==0.8.5 cut-cross-entropy==25.1.1
ls wheels
