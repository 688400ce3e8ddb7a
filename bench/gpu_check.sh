#!/usr/bin/env bash
# The GPU check: everything in this project that needs a CUDA GPU, in phases that each end well inside 10 minutes,
# writing at most 8 result files into OUT_DIR. Run it first whenever a GPU is at hand, then commit the JSON files
# it leaves in OUT_DIR under bench/results/.
#
# usage: bench/gpu_check.sh OUT_DIR [PHASE ...]
#   phases (default: all, in this order; each can be run alone and is skipped when its result file exists):
#     preflight   seconds: CUDA, torch, triton, and the packages the project imports; fails naming what is missing
#     selftest    cao2-fast selftest on DiT-S/2-256 (engines vs eager, native kernels, CUDA-graph step, bf16)
#                 -> selftest.json; also the gpu-marked tests -> gpu_tests.log
#     bench-s     cao2-fast bench with DiT-S/2-256, stage 1 also on DDIM 24 steps     -> bench_dit-s-2-256_*.json
#     xl-eager    cao2-fast bench with DiT-XL/2-256, eager stage 2                      -> bench_dit-xl-2-256_*.json
#     xl-compile  the same with --compile: stage 2 on the compiled engine, stage 1 also as fast-compile (the
#                 DiT on the compiled engine, CUDA graphs); compile times are kept apart
#     mar         cao2-fast bench --backbone mar on the GPU (the digits MAR preset; the head's CUDA-graph loop)
#                                                                                    -> bench_digits-mar_cuda.json
#
# On a machine without network whose image lacks diffusers (for example: Python 3.12, torch, triton, onnx,
# onnxruntime CPU build, timm, accelerate, typer ... but no diffusers, no tensorrt), carry its pure-Python wheel:
#   here:   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers
#   there:  pip install --no-index --no-deps --target /tmp/site .whl/diffusers-*.whl
#           export PYTHONPATH=/tmp/site; pip install -e . --no-deps --no-build-isolation
#           bash bench/gpu_check.sh "$OUT"
# (.whl/ is git-ignored; name it in the device tool's carry list.) TensorRT and onnxruntime-gpu wheels are too
# large to carry there: their checks are skipped with a reason, and the ONNX graphs TensorRT would parse are
# checked on CPU by tests/test_trt_graphs.py.
set -uo pipefail
out=${1:?usage: bench/gpu_check.sh OUT_DIR [PHASE ...]}
shift
phases=("$@")
[ ${#phases[@]} -gt 0 ] || phases=(preflight selftest bench-s xl-eager xl-compile mar)
mkdir -p "$out"
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
failed=()

done_already() {  # a phase is complete when its result file is there
  ls "$out"/$1 >/dev/null 2>&1 && { echo "== $2: done already ($1 in $out), skipped"; return 0; }
  return 1
}

for phase in "${phases[@]}"; do
  case "$phase" in
    preflight)
      echo "== preflight"
      timeout 120 "$py" - <<'EOF' || { echo "preflight failed: fix the line above first"; exit 2; }
import importlib.util, sys
missing = [m for m in ("torch", "triton", "diffusers", "timm", "onnx", "onnxscript", "onnxruntime", "typer",
                       "safetensors", "accelerate", "cao2_fast") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing packages: {', '.join(missing)} (see the wheel recipe at the top of bench/gpu_check.sh)")
import torch
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device")
import onnxruntime, triton
print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} cuda {torch.version.cuda} | "
      f"triton {triton.__version__} | onnxruntime providers {onnxruntime.get_available_providers()}")
EOF
      ;;
    selftest)
      done_already selftest.json selftest && continue
      echo "== selftest (DiT-S/2-256) and the gpu-marked tests"
      timeout 540 cao2-fast selftest --device cuda --model dit-s-2-256 --out "$out" || failed+=(selftest)
      timeout 300 "$py" -m pytest -q -rs -m gpu -p no:cacheprovider tests >"$out/gpu_tests.log" 2>&1 \
        || failed+=(gpu-tests)
      tail -3 "$out/gpu_tests.log"
      ;;
    bench-s)
      done_already "bench_dit-s-2-256_cuda*.json" bench-s && continue
      echo "== bench DiT-S/2-256"
      timeout 540 cao2-fast bench --model dit-s-2-256 --random-weights --device cuda --steps2 20 \
        --sampler ddim --sample-steps 24 --out "$out" \
        || failed+=(bench-s)
      ;;
    xl-eager)
      done_already "bench_dit-xl-2-256_cuda.json" xl-eager && continue
      echo "== bench DiT-XL/2-256, eager stage 2"
      timeout 570 cao2-fast bench --model dit-xl-2-256 --random-weights --device cuda --steps2 30 --out "$out" \
        || failed+=(xl-eager)
      ;;
    xl-compile)
      done_already "bench_dit-xl-2-256_cuda*compile*.json" xl-compile && continue
      echo "== bench DiT-XL/2-256, compiled stage 2"
      timeout 570 cao2-fast bench --model dit-xl-2-256 --random-weights --device cuda --steps2 30 --compile \
        --out "$out" || failed+=(xl-compile)
      ;;
    mar)
      done_already "bench_digits-mar_cuda.json" mar && continue
      echo "== bench MAR (digits MAR preset)"
      timeout 540 cao2-fast bench --backbone mar --device cuda --out "$out" || failed+=(mar)
      ;;
    *) echo "unknown phase $phase (preflight selftest bench-s xl-eager xl-compile mar)"; exit 2 ;;
  esac
done
rm -f "$out"/*.png 2>/dev/null  # charts are redrawn from the JSON here; keep the 8-file budget for results
ls -1 "$out"
if [ ${#failed[@]} -gt 0 ]; then echo "failed: ${failed[*]}"; exit 1; fi
echo "all phases passed"
