#!/usr/bin/env bash
# The GPU checks, as ONE device call of under 10 minutes; the first thing to run wherever a GPU is at hand.
#   1. the GPU tests (pytest -m gpu tests/engine): bf16 parity with generate, CUDA-graph replay against eager
#      (fp32 exact, bf16), preemption, graph memory (buckets stop at 512), the worst step's memory, and the server
#      on CUDA: graphs captured and budgeted, forced fallbacks (Triton unable to build its launcher: CC=/bin/false
#      with an empty TRITON_CACHE_DIR; a failed capture: PREDICTOR_FAIL_GRAPH_CAPTURE=1) serving eagerly; async
#      scheduling: fp32 parity with generate (eager and graphs, through preemption), decode steps launched without
#      the host waiting for the device (torch's sync debug mode), and a server started with --async_scheduling;
#   2. the kernel microbenchmark, if predictor/tools/bench/kernel.py exists;
#   3. the benchmark of both shapes (TinyLlama first, the slow Llama-2-7B last): 128-token prompts, 128 new
#      tokens, 1 and 64 streams, then 64 sampling. Targets: 7B >= 125 tok/s at 1 stream, >= 5,200 at 64;
#      TinyLlama >= 360 / >= 9,900. Each shape twice: synchronous steps, then --async_scheduling (bench-<shape>-
#      async.txt; compare its tok/s and ITL with the synchronous run's); a run that no longer fits is skipped.
# Results in $OUT (at most 8 files come back): summary.txt (GPU, test outcome, what the servers logged about
# graphs and KV memory, the bench tables), gpu-tests.txt, kernel-bench.txt, bench-<shape>[-async].txt, and everything
# else (bench results, server logs) in device-check.tar.gz.
#
# The device machine has torch + CUDA + triton, not our other packages, and no network. Before the call, here:
#   ../shared/device/fetch-wheels                  # our wheels into .whl/
#   mkdir -p .cache/vocab && cp ../shared/tokenizers/ggml-vocab-llama-spm.gguf .cache/vocab/   # the tokenizer
# (.whl over the call's 64 MiB? these checks import only the server's own packages: the test tools' wheels,
# guidellm datasets schemathesis langchain-* hypothesis* faker sanic*, can go.)
# The call (device tool): run(command="bash build/device_check.sh", carry=[".whl", ".cache/vocab"], timeout_s=600)
#   bash build/device_check.sh [tests|bench|all] [shape ...]     (default: all, both shapes)
set -uo pipefail
what=${1:-all}; shift || true
shapes=${*:-tinyllama-1.1b llama-2-7b}
out=${OUT:-/tmp/device-check-out}; work=/tmp/device-check; mkdir -p "$out" "$work"
start=$SECONDS; budget=${DEVICE_CHECK_BUDGET_S:-570}   # under the call's 600 s, with room to pack up
left() { echo $((budget - (SECONDS - start))); }
summary="$out/summary.txt"
note() { echo "$*" | tee -a "$summary"; }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || note "!! installing .whl/ failed: run ../shared/device/fetch-wheels here and carry .whl"
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
[ -f .cache/vocab/ggml-vocab-llama-spm.gguf ] \
  || note "!! .cache/vocab/ggml-vocab-llama-spm.gguf missing (carry .cache/vocab): the server tests and the bench need it"
note "== $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
note "== $(python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' 2>&1)"
compiler=$(command -v cc gcc clang 2>/dev/null | head -1); note "== C compiler for Triton's launcher: ${compiler:-none}"

if [ "$what" != bench ]; then
  timeout $(( $(left) < 300 ? $(left) : 300 )) python3 -m pytest -q -m gpu tests/engine -p no:cacheprovider -rA \
    --durations=12 -s > "$work/gpu-tests.txt" 2>&1
  note "== GPU tests (exit $?): $(grep -E ' in [0-9.]+s' "$work/gpu-tests.txt" | tail -1)"
  grep -E "^(FAILED|ERROR)|graph memory:|peak: worst step|CUDA graphs|CUDA memory|KV cache \(" "$work/gpu-tests.txt" \
    | sort -u | head -40 >> "$summary"
  cp "$work/gpu-tests.txt" "$out/"
fi

if [ "$what" != tests ] && [ -f predictor/tools/bench/kernel.py ]; then
  timeout 90 python3 -m predictor.tools.bench.kernel > "$work/kernel-bench.txt" 2>&1
  note "== kernel microbenchmark (exit $?)"; tail -25 "$work/kernel-bench.txt" >> "$summary"
  cp "$work/kernel-bench.txt" "$out/"
fi

if [ "$what" != tests ]; then
  for shape in $shapes; do
    for mode in sync async; do
      name=bench-$shape; flags=()
      [ "$mode" = async ] && { name=bench-$shape-async; flags=(--server_args=--async_scheduling); }
      [ "$(left)" -gt 60 ] || { note "!! no time left for $name"; continue; }
      timeout "$(left)" python3 -m predictor bench --device cuda --dtype bfloat16 --shape "$shape" \
        --concurrency 1,64 --prompt_tokens 128 --max_tokens 128 --max_num_seqs 256 --max_model_len 2048 \
        --baseline_requests 1 --sampled ${flags[@]+"${flags[@]}"} --results_dir "$work/$name" --models_dir /tmp/bench-models \
        > "$work/$name.txt" 2>&1
      note "== $name (exit $?)"
      grep -hE "CUDA graphs|CUDA memory|KV cache \(|async scheduling" "$work/$name"/*/server.log 2>/dev/null \
        | cut -c1-400 >> "$summary"
      tail -30 "$work/$name.txt" >> "$summary"
      cp "$work/$name.txt" "$out/"
    done
  done
fi
tar czf "$out/device-check.tar.gz" -C "$work" . 2>/dev/null
note "== done in $((SECONDS - start)) s"
