#!/usr/bin/env bash
# On the GPU machine, after the parts in .stage/g* have been copied to /tmp/st (scripts/gpu_stage.sh):
# joins the onnxruntime-gpu wheel, the exported image graph and a full fp16 checkpoint, installs the
# wheel and runs benchmarks/encoder_bench.py with the CUDA rows.
set -euo pipefail
ST=/tmp/st
mkdir -p /tmp/model /tmp/whl
cat "$ST"/ort.part* > /tmp/whl/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
cat "$ST"/img.part* > /tmp/model/image.onnx
cat "$ST"/ck.part* > /tmp/model/full16.safetensors
cp "$ST"/model.json /tmp/model/
python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import onnxruntime as o; o.preload_dlls(); print(o.__version__, o.get_available_providers())"
python3 benchmarks/encoder_bench.py --model-dir /tmp/model --checkpoint /tmp/model/full16.safetensors \
    --batches 1 64 --out "${OUT:-/tmp/out}/encoder_bench-gpu.json"
