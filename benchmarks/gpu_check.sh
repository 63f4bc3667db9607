#!/usr/bin/env bash
# One prepared check for a GPU machine with no network (about 8 minutes at most on an H100/H200):
#   1. the gpu-marked tests (test/gpu: cuda-python device memory and copies; the torch model's prefix reuse on the
#      GPU against its plain language part and the CPU; if TensorRT is installed, the tiny bundle's plans built
#      here and the TensorRT runtime against ONNX Runtime, prefix-reuse plans and plain),
#   2. the torch bf16 benchmark on a 4B-shaped random model (benchmarks/bench_gpu.py): reference vs frame cache vs
#      frame cache + prefix KV reuse, eager vs CUDA graphs, offline one step per call vs a batch of steps per
#      suffix call, peak GPU memory; one table.
#
#   benchmarks/gpu_check.sh                 # on the GPU machine (uses $PYTHON, else .venv/bin/python, else python3)
#   benchmarks/gpu_check.sh --smoke         # anywhere, CPU included: tiny model, seconds (test/unit runs this)
#   benchmarks/gpu_check.sh -- --text-layers 12   # anything after -- goes to bench_gpu.py
#
# Needs: torch (CUDA build), transformers (the pinned 5.24, or an older 5.x such as a CUDA image's 5.17: the model
# asks the installed one for its cache argument's name), tokenizers, numpy, pytest; cuda-bindings for the
# cuda-python test; tensorrt + onnx + onnxscript + onnxruntime (CPU is enough) for the TensorRT tests, which skip
# without TensorRT before exporting anything. ROS, onnxruntime-gpu and the project's venv are not needed (the
# repository goes on PYTHONPATH). Nothing is downloaded. Exit status: non-zero when a test or the benchmark's
# parity check failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

smoke=0
bench_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --) shift; bench_args+=("$@"); break ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --smoke, or -- ARGS for bench_gpu.py)" >&2; exit 2 ;;
  esac
  shift
done

if [ -n "${PYTHON:-}" ]; then py="$PYTHON"; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
status=0

echo "== environment"
"$py" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "transformers", "onnxruntime", "tensorrt", "tensorrt_rtx", "cuda.bindings"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as exc:
        print(f"{name}: not importable ({type(exc).__name__})")
import torch
print("cuda:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

echo "== gpu-marked tests"
if [ "$smoke" = 1 ]; then
  test_budget=${GPU_CHECK_TEST_TIMEOUT:-120}
else
  test_budget=${GPU_CHECK_TEST_TIMEOUT:-180}
fi
timeout "$test_budget" "$py" -m pytest test/gpu -m gpu -q -p no:cacheprovider
rc=$?
# 5 = nothing collected/selected (every gpu test skipped counts as passed, not as 5)
if [ "$rc" != 0 ]; then echo "gpu-marked tests: exit $rc"; status=$rc; fi

echo "== torch benchmark"
if [ "$smoke" = 1 ]; then
  timeout "${GPU_CHECK_BENCH_TIMEOUT:-120}" "$py" benchmarks/bench_gpu.py --device cpu --smoke "${bench_args[@]}"
else
  timeout "${GPU_CHECK_BENCH_TIMEOUT:-300}" "$py" benchmarks/bench_gpu.py --device cuda "${bench_args[@]}"
fi
rc=$?
if [ "$rc" != 0 ]; then echo "benchmark: exit $rc"; status=$rc; fi

echo "== gpu_check done in $(( $(date +%s) - start )) s, exit $status"
exit "$status"
