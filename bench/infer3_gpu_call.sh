#!/usr/bin/env bash
# Inference against plain transformers `generate`, one device call from the repository root on one GPU; carry
# `.whl .carry/latex_val` (the wheels for the tests; the 1,000 print validation rows:
# mkdir -p .carry/latex_val/print && cp ../shared/data/latex_ocr/print/validation.parquet .carry/latex_val/print/).
#   PARTS="tests e2e" bash bench/infer3_gpu_call.sh          # about 6 minutes on an H100
# Parts (default "tests e2e"):
#   tests   the CUDA tests of the static decoder and the slots (graph replays against eager steps and generate's tokens)
#   e2e     bench/bench_infer.py, the setting: Qwen2-VL-7B shape (random weights), 512 print validation rows,
#           batches of 256, 64 new tokens, bf16, ocrtune's defaults against plain generate (stock transformers
#           forwards), float32 identity on all 512 rows, serve's batcher at 64 clients -> $OUT/infer_7b_<card>.json
#   decode  bench/bench_decode.py on the 7B shape: one pre-encoded batch of 256 (model only), the static decoder with
#           and without graphs and the dynamic loop in float32 -> $OUT/decode_7b_<card>.json
#   anatomy bench/learning/infer_anatomy.py: where one batch's time goes (7B) -> $OUT/infer_anatomy_7b_<card>.json
#   reader  bench_infer on the bundled reader (a trained model: answers end by themselves), 512 rows, with serve
#   reader_serve  the same, 256 rows, no float32 check: the serve arms (joins in groups against one by one) mostly
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OCRTUNE_CACHE=/tmp/occ OCRTUNE_TEST_CACHE=/tmp/occ \
  TOKENIZERS_PARALLELISM=false
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200' | tr A-Z a-z)
CARD=${CARD:-gpu}
VAL=$PWD/.carry/latex_val/print/validation.parquet
PARTS=" ${PARTS:-tests e2e} "
has() { [[ "$PARTS" == *" $1 "* ]]; }
if has tests; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_static_decode.py tests/test_continuous.py \
    > "$OUT/infer3_cuda_tests.txt" 2>&1
  echo "cuda test rc=$?" >> "$OUT/infer3_cuda_tests.txt"; tail -2 "$OUT/infer3_cuda_tests.txt"
fi
if has e2e; then
  timeout ${E2E_S:-420} python3 bench/bench_infer.py --model 7b --data "$VAL" --rows 512 --batch_size 256 \
    --max_new_tokens 64 --fp32_rows ${FP32_ROWS:-512} --noise_floor --serve --model_root /tmp --out "$OUT/infer_7b_$CARD.json" 2>&1 \
    | grep -v Warning | tee "$OUT/infer_7b_log.txt" | tail -8
fi
if has decode; then
  timeout 200 python3 bench/bench_decode.py --model 7b --data "$VAL" --rows 256 --batch_size 256 --max_new_tokens 64 \
    --fp32_rows 64 --skip_end_to_end --model_root /tmp --out "$OUT/decode_7b_$CARD.json" 2>&1 | tee "$OUT/decode_7b_log.txt" | tail -3
fi
if has anatomy; then
  timeout 200 python3 bench/learning/infer_anatomy.py --model 7b --rows 256 --out "$OUT/infer_anatomy_7b_$CARD.json" \
    2>&1 | grep -v Warning | tail -3
fi
if has reader; then
  timeout ${READER_S:-200} python3 bench/bench_infer.py --model ocrtune-reader --data "$VAL" --rows 512 --batch_size 256 \
    --max_new_tokens 256 --fp32_rows 64 --serve --out "$OUT/infer_reader_$CARD.json" 2>&1 | grep -v Warning \
    | tee "$OUT/infer_reader_log.txt" | tail -6
fi
if has reader_serve; then
  timeout ${READER_S:-120} python3 bench/bench_infer.py --model ocrtune-reader --data "$VAL" --rows 256 --batch_size 256 \
    --max_new_tokens 256 --fp32_rows 0 --serve --out "$OUT/serve_reader_$CARD.json" 2>&1 | grep -v Warning \
    | tee "$OUT/serve_reader_log.txt" | tail -3
fi
