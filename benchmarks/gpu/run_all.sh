#!/usr/bin/env bash
# Everything that needs the GPU machine, in one device call (about 8 minutes):
#   here:  mkdir -p .gpu && cp ../shared/traces/mixtral-8x7b-vllm.jsonl.gz .gpu/
#   there: bash benchmarks/gpu/run_all.sh        (run with carry [".gpu"]; results land in $OUT)
# The machine has torch and Triton but no vLLM; the C extension is built in place when a
# compiler is there (else the CPU executor runs on torch, and the JSON says so).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/daop-gpu-out}
mkdir -p "$OUT"
python setup.py build_ext --inplace > "$OUT/build_ext.log" 2>&1 || echo "C extension not built (see build_ext.log)"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if python -c "import pytest" 2>/dev/null; then
  timeout 120 python -m pytest -q -p no:cacheprovider tests/core/test_moe.py tests/core/test_realloc.py \
    tests/core/test_triton_kernel.py tests/core/test_prediction.py 2>&1 | tee "$OUT/cuda_tests.log" | tail -3
fi
timeout 150 python benchmarks/gpu/check_kernel.py --out "$OUT/gpu_check_kernel.json" 2>&1 | tail -20
timeout 300 python benchmarks/gpu/policies.py --trace .gpu/mixtral-8x7b-vllm.jsonl.gz \
  --out "$OUT/gpu_policies.json" 2>&1 | tail -45
