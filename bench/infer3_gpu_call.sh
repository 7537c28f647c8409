#!/usr/bin/env bash
# Static-KV-cache + CUDA-graph decoding against plain generate, one device call from the repository root, one
# H100 (no carry: the rows are the package's bundled sample, the 2B shape's weights are random; no wheels: the
# benchmark imports neither peft nor datasets, and fails if it tries). About 60 s (at most 110), model build included:
#   bash bench/infer3_gpu_call.sh
# -> $OUT/decode_2b_<card>.json (bench/bench_decode.py's JSON) and $OUT/decode_2b_log.txt. Look at:
#   model_only.static.decoding == "static-graph" (the graphs ran; else model_only.static.static_reason says why),
#   model_only_speedup / end_to_end_speedup (static vs plain generate, bf16, batch 256, 64 new tokens),
#   fp32_identical (float32, 64 rows: plain generate == dynamic loop == static with graphs == static without).
# READER=1 also runs it on the bundled reader (a trained model: answers of their own lengths, up to 256 tokens; 32M
# parameters, so its decoding is bound by the host, which CUDA graphs remove; on the H100 plain generate read ~20
# images/s) -> $OUT/decode_reader_<card>.json. BIG=1 also runs 7B on 512 rows in batches of 256 (the aim's setting)
# -> $OUT/decode_7b_<card>.json; NO_2B=1 leaves the 2B run out.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OCRTUNE_CACHE=/tmp/occ TOKENIZERS_PARALLELISM=false
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200' | tr A-Z a-z)
CARD=${CARD:-gpu}
if [ -z "${NO_2B:-}" ]; then
timeout 110 python3 bench/bench_decode.py --model 2b --rows 256 --batch_size 256 --max_new_tokens 64 --fp32_rows 64 \
  --budget_s 70 --model_root /tmp --out "$OUT/decode_2b_$CARD.json" 2>&1 | tee "$OUT/decode_2b_log.txt"
echo "rc=$?"
fi
if [ -n "${READER:-}" ]; then
  timeout 200 python3 bench/bench_decode.py --model ocrtune-reader --rows 256 --batch_size 256 --max_new_tokens 256 \
    --fp32_rows 64 --profile_rows 64 --budget_s 170 --out "$OUT/decode_reader_$CARD.json" 2>&1 | tee "$OUT/decode_reader_log.txt" | tail -4
fi
if [ -n "${BIG:-}" ]; then  # the setting: 7B, 512 rows in batches of 256 (the sample's 288 rows, repeated)
  timeout ${BIG_S:-260} python3 bench/bench_decode.py --model 7b --rows 512 --batch_size 256 --max_new_tokens 64 \
    --fp32_rows 64 --budget_s $(( ${BIG_S:-260} - 30 )) --model_root /tmp --out "$OUT/decode_7b_$CARD.json" 2>&1 \
    | tee "$OUT/decode_7b_log.txt" | tail -4
fi
