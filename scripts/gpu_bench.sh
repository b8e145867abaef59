#!/usr/bin/env bash
# One prepared bench run for a GPU machine (one H200): `dynamic-llava bench` on the real LLaVA-1.5-7B shapes
# (random weights, bfloat16), with the long generations at 1K/2K tokens, no-cache decoding and the largest batch in a
# memory budget, results under $OUT (results.json, the plots, table.md, log.txt). Installs nothing; it runs with
# the python on PATH (or $PYTHON) from the repository root, where the package resolves.
#
#   scripts/gpu_bench.sh             # on the GPU, about 8 minutes at most (each phase bounded below)
#   scripts/gpu_bench.sh --dry-run   # on the CPU with the tiny preset, under a minute (checks the script itself)
set -euo pipefail

OUT="${OUT:-$(pwd)/gpu_bench_out}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
# the repository root is the package `dynamic_llava`: make it importable by that name from its parent folder
PKG_PARENT="$(mktemp -d)"
ln -s "$(pwd)" "$PKG_PARENT/dynamic_llava"
export PYTHONPATH="$PKG_PARENT${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${1:-}" == "--dry-run" ]]; then
  ARGS=(--preset tiny --device cpu --new-tokens 8 --repeats 1 --batch-sizes 1,2 --throughput-tokens 4
        --decode-batch 2 --count-steps 2 --long-tokens 16,32 --long-batches 1,2 --nocache-tokens 3 --memory-budget 0.012
        --budget-tokens 4)
  LIMIT=170  # about 15 s on an idle 2-core CPU; the limit leaves room for a busy one
else
  # 7B in bf16: ~14 GB of weights per model (both loaded); the budget leaves room for the KV caches of large batches
  ARGS=(--preset llava15-7b --device cuda --dtype bfloat16 --new-tokens 128 --repeats 3 --batch-sizes 1,8,32
        --throughput-tokens 32 --decode-batch 8 --count-steps 8 --long-tokens 1024,2048 --long-batches 1,8 --nocache-tokens 4
        --memory-budget 60 --budget-tokens 32 --compile-batches 1)
  LIMIT=480
fi

echo "gpu_bench: ${ARGS[*]}" | tee "$OUT/log.txt"
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
  'transformers', transformers.__version__)" | tee -a "$OUT/log.txt"
status=0
timeout "$LIMIT" "$PYTHON" -m dynamic_llava.cli bench "${ARGS[@]}" --no-progress --out "$OUT" \
  > "$OUT/table.md" 2>> "$OUT/log.txt" || status=$?
cat "$OUT/table.md"
rm -rf "$PKG_PARENT"
if [[ $status -ne 0 ]]; then
  echo "gpu_bench: the bench exited with $status (124: past ${LIMIT} s); see $OUT/log.txt" | tee -a "$OUT/log.txt"
  tail -20 "$OUT/log.txt"
fi
exit $status
