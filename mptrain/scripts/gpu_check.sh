#!/usr/bin/env bash
# Every GPU measurement mptrain promises, in one run of <= 8 min on a lent H100/H200:
#   mptrain-bench ResNet-50 224x224 fp32 (TF32 off) / amp / mixed / bf16 at batch 64 and 128,
#   the LSTM LM, the transformer LM (and fp8, with torchao) and DCGAN, and the CUDA tests (tests/test_gpu.py, -m gpu).
# Writes results/bench/<device>_torch<version>/ (the bench's own folder naming) and, with $OUT set (the
# device tool), copies the tables and the test log there too.
#
#   bash mptrain/scripts/gpu_check.sh                       # from the repo root, on the GPU machine
#   bash mptrain/scripts/gpu_check.sh --dry-run             # anywhere: print the commands it would run, run none
#   # device tool: carry [".whl"] (hydra-core, omegaconf and antlr4 wheels; the GPU image lacks them):
#   #   mkdir -p .whl && pip download --no-deps -d .whl hydra-core==1.3.8 omegaconf==2.3.1
#   #   pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; fi
run() { if [ $DRY = 1 ]; then echo "$*"; else "$@"; fi; }

missing=$($PY - <<'PYEOF'
import importlib.util as u
print(" ".join(m for m in ("hydra", "omegaconf", "antlr4", "tensorboard", "pandas", "matplotlib", "scipy", "markdown",
                           "tqdm", "pytest") if u.find_spec(m) is None))
PYEOF
)
if [ -n "$missing" ] && [ $DRY = 0 ]; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then echo "gpu_check: missing $missing and no .whl/ to install from" >&2; exit 2; fi
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ $DRY = 0 ]; then
  $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 2
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv || true
fi

bench() { echo "== mptrain-bench $*"; run $PY -m mptrain.bench.cli "$@" --out results/bench; }
FAST=(--warmup 5 --window 10 --windows 3 --repeats 1 --pairs 20)
status=0
# ResNet-50 at ImageNet size: the paper's headline speed-up (TF32 off for fp32: precision.allow_tf32=false)
bench model=resnet50 dataset.image_size=224 dataset.train_size=1024 dataset.test_size=128 \
  --modes fp32,amp,mixed,bf16 --batch-sizes 64,128 "${FAST[@]}" || status=1
bench model=lstm_lm model.width=1024 --modes fp32,amp,mixed,bf16 --batch-sizes 64,128 "${FAST[@]}" || status=1
# precision=fp8: real FP8 matmuls on an H100/H200 (torchao; carry its wheel in .whl/ if the image lacks it)
FP8=""
if [ $DRY = 1 ] || $PY -c "import torchao.float8" 2>/dev/null; then FP8=",fp8"; else echo "gpu_check: no torchao: the transformer bench runs without fp8"; fi
bench model=transformer model.width=512 model.layers=6 model.heads=8 model.context=256 dataset.bptt=256 \
  --modes fp32,amp,mixed,bf16$FP8 --batch-sizes 32,64 "${FAST[@]}" || status=1
bench model=dcgan --modes fp32,amp,mixed,bf16 --batch-sizes 64,128 "${FAST[@]}" || status=1
echo "== CUDA tests"
if [ $DRY = 1 ]; then echo "$PY -m pytest -q -m gpu tests/"; exit 0; fi
$PY -m pytest -q -m gpu tests/ 2>&1 | tee /tmp/gpu_tests.log || status=1

if [ -n "${OUT:-}" ]; then
  folder=$(ls -td results/bench/*/ | head -1)
  cp "$folder"/*.md "$OUT"/ 2>/dev/null; cp /tmp/gpu_tests.log "$OUT"/ 2>/dev/null
  tar czf "$OUT/bench_json.tgz" -C "$folder" . 2>/dev/null
fi
exit $status
