#!/usr/bin/env bash
# Issue 13 point 4 in one call on the lent GPU machine (Python 3.12, torch, transformers; no Ray,
# no MLflow, no model files: the models are random:<config> of real shapes, kedit_core only).
#
# Here, once (copies SmolLM2's tokenizer, 3.4 MB, so that prompts have a trained BPE's lengths):
#     bash benchmarks/device_gpu.sh --prep
# Then through the device tool, carrying .device (about 5-6 minutes each):
#     run(command="bash benchmarks/device_gpu.sh", carry=[".device"], timeout_s=400)
#     run(command="bash benchmarks/device_gpu.sh more", carry=[".device"], timeout_s=450)
# Results land in $OUT (the tool brings them back): gpu_<model>_<dtype>.json / .md.
set -uo pipefail
cd "$(dirname "$0")/.."
TOK=.device/smollm2-tokenizer
if [ "${1:-}" = "--prep" ]; then
  mkdir -p "$TOK"
  .venv/bin/python - "$TOK" <<'PY'
import shutil, sys
from pathlib import Path
from kedit_core.models import load
lm = load("smollm2-135m", device="cpu")            # caches the model (and its tokenizer) once
lm.tokenizer.save_pretrained(sys.argv[1])
print("tokenizer saved in", sys.argv[1], sorted(p.name for p in Path(sys.argv[1]).iterdir()))
PY
  exit $?
fi
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
rc=0
# Each run rewrites its report after every stage, so a time limit keeps what was measured.
if [ "${1:-}" != "more" ]; then
  # Llama-3-8B in bf16 (what the issue's targets are about): statistics, MEMIT and AlphaEdit on
  # batches of 100 (AlphaEdit's projectors: one eigendecomposition per layer), then the
  # 10,000-request MEMIT batch, cut to what fits by 240 s after the start (with the prediction)
  timeout 330 python benchmarks/bench_gpu.py --model "random:llama3-8b@$TOK" --dtype bf16 --out "$OUT" \
    --big 10000 --big-budget-s 240 || rc=$?
else
  # the second set: Llama-3-8B in fp32, GPT-J-6B in bf16 (statistics and the batches of 100)
  timeout 200 python benchmarks/bench_gpu.py --model "random:llama3-8b@$TOK" --dtype fp32 --out "$OUT" --big 0 \
    --stats-texts 1000 || rc=$?
  timeout 200 python benchmarks/bench_gpu.py --model "random:gptj-6b@$TOK" --dtype bf16 --out "$OUT" --big 0 \
    --stats-texts 1000 || rc=$?
fi
exit $rc
