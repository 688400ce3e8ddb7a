#!/usr/bin/env bash
# Everything in this project that needs a CUDA GPU, in one go, with its logs and results in OUT_DIR:
#   1. the gpu/trt-marked tests and the Triton kernel tests (natively compiled on CUDA),
#   2. `cao2-fast bench` with DiT-XL/2-256, the sd-vae-ft-mse VAE and ResNet-18 at real sizes (random weights),
#      eager and with the compiled stage-2 engine; 50 stage-2 steps per timed run, so the two warm-up steps and the
#      one-step capture weigh at most twice what they do in a real 100-step chunk.
# usage: bench/gpu_check.sh OUT_DIR [MODEL]      (MODEL: dit-xl-2-256 by default; dit-s/b/l-2-256 are quicker)
# Needs the package installed (pip install -e ".[dev]", plus ".[trt]" for TensorRT). Exit code 0 only if all passed.
set -uo pipefail
out=${1:?usage: bench/gpu_check.sh OUT_DIR [MODEL]}
model=${2:-dit-xl-2-256}
mkdir -p "$out"
cd "$(dirname "$0")/.."

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} >"$out/device.txt" 2>&1
cat "$out/device.txt"

python3 -m pytest -q -rs -m "gpu or trt" tests 2>&1 | tee "$out/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
python3 -m pytest -q -rs tests/test_kernels.py 2>&1 | tee "$out/kernel_tests.log"
kernels_rc=${PIPESTATUS[0]}

cao2-fast bench --model "$model" --random-weights --device cuda --steps2 50 --out "$out" 2>&1 | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}
cao2-fast bench --model "$model" --random-weights --device cuda --steps2 50 --compile --out "$out" 2>&1 | tee "$out/bench_compile.log"
compile_rc=${PIPESTATUS[0]}

[ "$tests_rc" -eq 0 ] && [ "$kernels_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$compile_rc" -eq 0 ]
