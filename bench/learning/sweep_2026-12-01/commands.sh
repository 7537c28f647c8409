# The device calls of 2026-12-01 (session 13) that made these files, run from the repository root on one H200
# with carry .whl .whl_bench .carry/latex; outputs tarred into $OUT.

# ---- call1.sh
#!/usr/bin/env bash
# device call 1 (2026-12-01 session 13): inference identity in fp32 + bf16 noise floor; reading sweep
set -o pipefail
OUT=${OUT:-/tmp/out}; R=/tmp/r; mkdir -p $R
for d in .whl .whl_bench; do python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $d/*.whl; done
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OCRTUNE_CACHE=/tmp/occ
nvidia-smi --query-gpu=name,memory.used --format=csv > $R/gpu.txt
timeout 230 python3 bench/bench_infer.py --model 7b --rows 512 --batch_size 256 --max_new_tokens 64 --fp32_rows 512 \
  --noise_floor --data .carry/latex/print/validation.parquet --out $R/infer_7b_h200.json > $R/infer_log.txt 2>&1
echo "infer rc $?" >> $R/infer_log.txt
timeout ${SWEEP_S:-320} python3 bench/learning/sweep_reading.py --device cuda --steps 1000 --every 100 --batch 64 \
  --variants ${VARIANTS:-base,merger_small,vis10,freeze300,untied,lr3e-4,vit2,vis10_merger_small} \
  --out $R/sweep_digits.jsonl > $R/sweep_log.txt 2>&1
echo "sweep rc $?" >> $R/sweep_log.txt
tar czf $OUT/call1.tgz -C $R .

# ---- call2.sh
#!/usr/bin/env bash
# device call 2: issue 14 (cuda suite + 7B print benchmark in one call), issue 13 reading sweep (parallel)
set -o pipefail
OUT=${OUT:-/tmp/out}; R=/tmp/r; mkdir -p $R/cuda
for d in .whl .whl_bench; do python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $d/*.whl 2>/dev/null; done
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OCRTUNE_CACHE=/tmp/occ
OUT=$R/cuda timeout 180 bash bench/run_cuda_tests.sh > $R/cuda_run_log.txt 2>&1; echo "cuda rc $?" >> $R/cuda_run_log.txt
timeout 170 python3 bench/bench_frontier.py --model 7b --liger --data .carry/latex/print/train.parquet \
  --grid '16384:all,0' --out $R/frontier_7b_after_issue14.json > $R/frontier_log.txt 2>&1; echo "frontier rc $?" >> $R/frontier_log.txt
S="python3 bench/learning/sweep_reading.py --device cuda --steps 800 --every 100 --batch 64"
for v in vis10 freeze300 untied lr3e-4 vit2; do
  timeout 220 $S --variants $v --out $R/sweep_$v.jsonl > $R/sweep_$v.log 2>&1 &
done
timeout 220 $S --variants base --min_pixels 57344 --out $R/sweep_base_upscaled2.jsonl > $R/sweep_base_upscaled2.log 2>&1 &
wait
tar czf $OUT/call2.tgz -C $R .

# ---- call3.sh
#!/usr/bin/env bash
# device call 3: issue 13 reading sweep, one process (parallel processes time-slice the GPU: no gain)
OUT=${OUT:-/tmp/out}; R=/tmp/r; mkdir -p $R
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OCRTUNE_CACHE=/tmp/occ
timeout ${SWEEP_S:-440} python3 bench/learning/sweep_reading.py --device cuda --steps 250 --every 50 --batch 256 \
  --variants ${VARIANTS:-vis10,vit2,freeze100,vit2_vis10,lr3e-4} --out $R/sweep_b256${TAG:-}.jsonl > $R/sweep_b256${TAG:-}.log 2>&1
echo "sweep rc $?" >> $R/sweep_b256${TAG:-}.log
tar czf $OUT/call3.tgz -C $R .

# call 4: SWEEP_S=320 VARIANTS=lr3e-4,lr1e-4 TAG=_lr bash call3.sh

# ---- third session of 2026-12-01 (carry .whl .whl_bench .carry/latex)
# sweep_b256_vis.jsonl: the LM at 1e-3, the vision tower + merger at 0.1x / 0.03x
python3 bench/learning/sweep_reading.py --device cuda --steps 250 --every 50 --batch 256 \
  --variants vis0.1,vis0.03 --out sweep_b256_vis.jsonl
# sweep_b256_lora.jsonl: frozen random weights + rank-32 LoRA (lr 1e-3, 3e-4), full fine-tuning at 2e-4
python3 bench/learning/sweep_reading.py --device cuda --steps 250 --every 50 --batch 256 \
  --variants lora,lr2e-4,lora_lr3e-4 --out sweep_b256_lora.jsonl
