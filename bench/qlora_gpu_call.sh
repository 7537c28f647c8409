#!/usr/bin/env bash
# QLoRA on the GPU, one device call (<= 8 minutes) from the repository root:
#   carry [".whl_q", ".carry/latex_slice"]   (.whl_q: ~11 MB, bench/qlora_wheels.txt; its bitsandbytes wheel has only the
#   CPU and CUDA 13.0 libraries: `zip -d` of the others and their RECORD lines, 43 MB -> 3.6 MB; the slice ~4 MB)
#   bash bench/qlora_gpu_call.sh             (results under $OUT: qlora.tgz, and the JSONs beside it)
# 1. the cuda tests of QLoRA (tests/test_qlora_cuda.py): fused LoRA over a 4-bit base vs PEFT, a short qlora sft run
# 2. 7B print LoRA, same rows: (a) plain Trainer + PEFT + bitsandbytes QLoRA, (b) ocrtune QLoRA at 8k/16k tokens a
#    step and ocrtune bf16 LoRA (variant quant_bits=none): samples/s, peak reserved GiB, the fixed-batch loss check
#    -> $OUT/qlora_7b_<card>.json (copy to bench/results/)
# 3. the 2B's QLoRA at 2k/4k/8k tokens a step: the largest budget under 8 GiB reserved -> $OUT/qlora_2b_8gib_<card>.json
set -o pipefail
OUT=${OUT:-/tmp/out}; R=/tmp/rq; mkdir -p $R "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl_q/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OCRTUNE_CACHE=/tmp/occ OCRTUNE_TEST_CACHE=/tmp/occ
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200|a100|l40s' | tr A-Z a-z)
CARD=${CARD:-gpu}
DATA=.carry/latex_slice/print/train.parquet
timeout 100 python3 -m pytest -q -m cuda tests/test_qlora_cuda.py -p no:cacheprovider --junitxml=$R/qlora_cuda.xml \
  > $R/qlora_cuda_log.txt 2>&1; echo "cuda tests rc=$?" | tee -a $R/qlora_cuda_log.txt
timeout 300 python3 bench/bench_sft.py --data $DATA --models 7b --model_root /tmp --cases ab --liger --quant_bits 4 \
  --b_variants "quant_bits=4;quant_bits=none" --packing_tokens_list 8192,16384 --b_max_reserved_gib 12 \
  --baseline_batch 8 --rows 1500 --steps 6 --warmup 2 --budget_s 290 --timeout 150 \
  --out $OUT/qlora_7b_$CARD.json > $R/qlora_7b_log.txt 2>&1; echo "7b rc=$?" >> $R/qlora_7b_log.txt
timeout 90 python3 bench/bench_sft.py --data $DATA --models 2b --model_root /tmp --cases b --liger --quant_bits 4 \
  --packing_tokens_list 2048,4096,8192 --b_max_reserved_gib 8 --rows 800 --steps 4 --warmup 2 --budget_s 85 \
  --timeout 60 --out $OUT/qlora_2b_8gib_$CARD.json > $R/qlora_2b_log.txt 2>&1; echo "2b rc=$?" >> $R/qlora_2b_log.txt
tar czf $OUT/qlora.tgz -C $R .
