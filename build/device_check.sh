#!/usr/bin/env bash
# The GPU checks of one device session, as one call (the device machine has torch + CUDA + triton, not our other
# packages: carry them as wheels, `../shared/device/fetch-wheels` fills .whl/). Everything lands under $OUT.
#   run: bash build/device_check.sh [tests|bench|all] [shape ...]     (default: all, both shapes)
set -uo pipefail
what=${1:-all}; shift || true
shapes=${*:-tinyllama-1.1b llama-2-7b}
out=${OUT:-/tmp/device-check}; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
if [ "$what" != bench ]; then
  python3 -m pytest -q -m gpu tests/engine -p no:cacheprovider 2>&1 | tail -40 | tee "$out/gpu-tests.txt"
fi
if [ "$what" != tests ]; then
  python3 -m predictor.tools.bench.kernel 2>&1 | tail -40 | tee "$out/kernel.txt"  # the decode kernel alone
  for shape in $shapes; do
    # The workload: 128-token prompts, 128 new tokens, ignore_eos; 1 and 64 streams, then 64 sampling.
    python3 -m predictor bench --device cuda --dtype bfloat16 --shape "$shape" --concurrency 1,64 \
      --prompt_tokens 128 --max_tokens 128 --max_num_seqs 256 --max_model_len 2048 --baseline_requests 1 \
      --sampled --results_dir "$out/bench" --models_dir /tmp/bench-models 2>&1 | tail -40 | tee "$out/bench-$shape.txt"
  done
fi
