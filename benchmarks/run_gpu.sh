#!/usr/bin/env bash
# What a lent GPU machine runs, without Ray: the CUDA tests of the compute cores, then the
# three GPU benchmarks (each writes results/bench/<name>_gpu.json with the device name).
# Usage: bash benchmarks/run_gpu.sh [COPY_DIR]   (python3 with torch, timm, diffusers, pyarrow,
# pytest; COPY_DIR, if given, receives each JSON as soon as it is written)
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
copy() { [ -n "${1:-}" ] && cp results/bench/*_gpu.json "$1"/ 2>/dev/null; true; }
nvidia-smi -L || true
python3 -c "import torch, timm, diffusers; print('torch', torch.__version__, 'timm', timm.__version__, 'diffusers', diffusers.__version__)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py || echo "tests/test_gpu.py: FAILED"
timeout 120 python3 benchmarks/classifier_throughput.py --gpu || echo "classifier --gpu: FAILED"
copy "${1:-}"
timeout 150 python3 benchmarks/finetune_throughput.py --gpu || echo "finetune --gpu: FAILED"
copy "${1:-}"
timeout 150 python3 benchmarks/sample_throughput.py --gpu || echo "sample --gpu: FAILED"
copy "${1:-}"
