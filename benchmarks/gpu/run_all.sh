#!/usr/bin/env bash
# What needs the GPU machine, in sections that each fit one device call (10 minutes) with room:
#   bash benchmarks/gpu/run_all.sh tests       # the CUDA tests                      (~2 min)
#   bash benchmarks/gpu/run_all.sh sweep       # launch configs swept (bf16 shapes), written to
#                                              # daop_vllm/core/triton_configs and $OUT (~4 min)
#   bash benchmarks/gpu/run_all.sh kernel      # check_kernel.py with those configs  (~3 min)
#   bash benchmarks/gpu/run_all.sh formats     # check_kernel.py on int8/int4/fp8 slots, Mixtral (~4 min)
#   bash benchmarks/gpu/run_all.sh lifecycle   # engine_lifecycle.py, real-size      (~3 min)
#   bash benchmarks/gpu/run_all.sh policies    # policies.py on the Mixtral trace    (~5 min)
#   bash benchmarks/gpu/run_all.sh streaming   # policies.py with and without streaming: batch 1
#                                              # and 32, prompts of 256 and 2048 tokens (~6 min, untimed yet)
#   bash benchmarks/gpu/run_all.sh             # tests, kernel and lifecycle (one call)
# policies and streaming read the trace from .gpu/ (git-ignored), copied here before the call and carried:
#   mkdir -p .gpu && cp ../shared/traces/mixtral-8x7b-vllm.jsonl.gz .gpu/     (carry [".gpu"])
# The machine has torch and Triton but no vLLM; the C extension is built in place when a
# compiler is there (else the CPU executor runs on torch, and the JSON says so). Results land in $OUT.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/daop-gpu-out}
mkdir -p "$OUT"
sections=${*:-tests kernel lifecycle}
python setup.py build_ext --inplace > "$OUT/build_ext.log" 2>&1 || echo "C extension not built (see build_ext.log)"
rm -rf build
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
status=0
for section in $sections; do
  echo "== $section"
  case $section in
    tests)
      timeout 240 python -m pytest -q -p no:cacheprovider tests/core/test_moe.py tests/core/test_realloc.py \
        tests/core/test_triton_kernel.py tests/core/test_prediction.py tests/core/test_cuda_path.py \
        tests/core/test_device_budget.py 2>&1 | tee "$OUT/cuda_tests.log" | tail -5 ;;
    sweep)
      timeout 420 python benchmarks/gpu/check_kernel.py --shapes mixtral-8x7b phi-3.5-moe deepseek-v2-lite \
        qwen3-30b-a3b --tokens-per-expert 1 64 --sweep daop_vllm/core/triton_configs \
        --out "$OUT/gpu_check_kernel_sweep.json" 2>&1 | tail -12
      mkdir -p "$OUT/triton_configs" && cp daop_vllm/core/triton_configs/*.json "$OUT/triton_configs/" ;;
    kernel)
      timeout 300 python benchmarks/gpu/check_kernel.py --out "$OUT/gpu_check_kernel.json" 2>&1 | tail -30 ;;
    formats)
      timeout 300 python benchmarks/gpu/check_kernel.py --shapes mixtral-8x7b --formats int8 int4 fp8 \
        --tokens-per-expert 1 4 64 --out "$OUT/gpu_check_kernel_formats.json" 2>&1 | tail -12 ;;
    lifecycle)
      timeout 300 python benchmarks/gpu/engine_lifecycle.py --out "$OUT/gpu_engine_lifecycle.json" 2>&1 \
        | tee "$OUT/gpu_engine_lifecycle.log" | tail -40 ;;
    policies)
      timeout 420 python benchmarks/gpu/policies.py --trace .gpu/mixtral-8x7b-vllm.jsonl.gz \
        --profile "$OUT/profiles" --out "$OUT/gpu_policies.json" 2>&1 | tail -45 ;;
    streaming)
      timeout 480 python benchmarks/gpu/policies.py --trace .gpu/mixtral-8x7b-vllm.jsonl.gz --fractions 0.25 \
        --batches 1 32 --prompt-tokens 256 2048 --policies static auto-exact auto-daop auto-exact+stream \
        auto-daop+stream stream-all --out "$OUT/gpu_streaming.json" 2>&1 | tail -30 ;;
    *) echo "unknown section '$section': accepted tests, sweep, kernel, formats, lifecycle, policies, streaming"
       status=2 ;;
  esac
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done
exit $status
