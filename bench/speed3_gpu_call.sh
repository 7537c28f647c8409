#!/usr/bin/env bash
# Speed III in one device call. Training: the default's exact speed (the memory plan: lean MLP, the fewest recomputing layers that fit)
# against the old default (every layer recomputing, `recompute_layers=28` given) and plain Trainer + PEFT, on the
# real 7B and 2B shapes (random weights), print rows. Inference: the shipped reader (a trained model, whose answers
# end at their own lengths) on 512 print validation rows, plain generate against the engine, and serve's batcher at 64
# clients (plain generate, whole batches, continuous batching). From the repository root (~560 s):
#   carry [".whl", ".whl_bench", ".carry/latex_slice", ".carry/latex_d"]     bash bench/speed3_gpu_call.sh
# -> $OUT/speed3_{7b,2b}_<card>.json (bench_sft.py's report, command inside), $OUT/serve_reader_<card>.json
# (bench_infer.py's), $OUT/speed3_log.txt, and the GPU test of the plan (tests/test_cuda.py -k memory_plan) in
# $OUT/speed3_cuda_tests.txt
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# all of .whl: the Trainer + PEFT baseline's process imports datasets (its 2026-12-07 run failed without it)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  .whl_bench/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OCRTUNE_CACHE=/tmp/occ OCRTUNE_TEST_CACHE=/tmp/occ
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200' | tr A-Z a-z)
CARD=${CARD:-gpu}
DATA=$PWD/.carry/latex_slice/print/train.parquet
timeout 120 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py -k memory_plan \
  > "$OUT/speed3_cuda_tests.txt" 2>&1; echo "cuda test rc=$?" >> "$OUT/speed3_cuda_tests.txt"
python3 bench/bench_sft.py --data "$DATA" --models 7b --liger --packing_tokens 16384 --cases ab \
  --b_variants "recompute_layers=28;" --b_max_reserved_gib 80 --budget_s ${BUDGET_7B:-230} \
  --out "$OUT/speed3_7b_$CARD.json" 2>&1 | tee "$OUT/speed3_log.txt" | tail -8
python3 bench/bench_sft.py --data "$DATA" --models 2b --liger --packing_tokens_list 16384,32768 --cases ab \
  --b_max_reserved_gib 80 --budget_s ${BUDGET_2B:-150} --out "$OUT/speed3_2b_$CARD.json" 2>&1 \
  | tee -a "$OUT/speed3_log.txt" | tail -8
timeout ${SERVE_S:-130} python3 bench/bench_infer.py --model ocrtune-reader --data .carry/latex_d/print/validation.parquet \
  --rows 512 --batch_size 256 --max_new_tokens 256 --fp32_rows 64 --serve --concurrency 64 --serve_batch_size 64 \
  --out "$OUT/serve_reader_$CARD.json" 2>&1 | tee -a "$OUT/speed3_log.txt" | tail -6
