#!/usr/bin/env bash
# The GPU calls behind the published figures, by letter, run from the repository root on the GPU machine (one H200
# for the published runs). Outputs go to $OUT. The calls of earlier experiments are in git history, and what
# each found is in docs/history.md.
#   F   (carry .whl .whl_bench .carry/latex): the whole cuda suite and the 7B/2B --fp8_base frontier
#   Z   (same carry, ~100 s): the loader alone, 13 workers, 8-bit pixels against the bf16 frame (loader_pixels_h200.json)
#   FP  (same carry, ~220 s): compiled stage-1 steps fed by the loader, both ways alternated (fed_pixels_h200.json)
#   K, then L, then R, back to back on one machine (carry .whl .whl_alt .carry/latex .carry/tex): the from-scratch
#       recipe's run 17: phase train (synth + stage 1 until --max_time), phase rest (stage 1 decayed by the clock,
#       merge, evaluations, stage 2), then stage 1 on print validation with 3 beams (bench/learning/run17_eight_bit_h200/)
set -o pipefail
OUT=${OUT:-/tmp/out}; R=/tmp/r; mkdir -p $R
case "$1" in
F)  # the whole cuda suite after the review fixes (float8 scales as torch's, kernels on the
    # tensors' GPU, the _scaled_mm probe), and --fp8_base at 10k tokens, with full recompute at 16k, and on 2B
    for d in .whl .whl_bench; do python3 -m pip install -q --no-index --no-deps --target /tmp/site $d/*.whl 2>/dev/null; done
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OCRTUNE_CACHE=/tmp/occ OCRTUNE_TEST_CACHE=/tmp/occ
    OUT=$R/cuda timeout 150 bash bench/run_cuda_tests.sh > $R/cuda_run_log.txt 2>&1
    F="python3 bench/bench_frontier.py --liger --lora_dropout 0 --data .carry/latex/print/train.parquet"
    timeout 90 $F --model 7b --grid '10240:0;16384:all' --overrides '{"lean_mlp_fp8": true, "fp8_base": true}' \
      --out $R/frontier_7b_fp8_base_more.json > $R/fp8_base_more_log.txt 2>&1
    timeout 70 $F --model 2b --grid '32768:0' --overrides '{"lean_mlp_fp8": true, "fp8_base": true}' \
      --out $R/frontier_2b_fp8_base.json > $R/fp8_base_2b_log.txt 2>&1
    tar czf $OUT/callF.tgz -C $R . ;;
Z)  # ~100 s, carry .whl .whl_bench .carry/latex: the loader alone at 65,536 tokens with the recipe's 13 workers, the
    # workers' pixels in 8 bits (new) against the bf16 frame they sent before, alternated twice
    for d in .whl .whl_bench; do python3 -m pip install -q --no-index --no-deps --target /tmp/site $d/*.whl 2>/dev/null; done
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OCRTUNE_CACHE=/tmp/occ
    timeout 200 python3 bench/learning/loader_pixels.py --data .carry/latex/print/train.parquet --workers 13 --rounds 2 \
      --batches 40 --skip 20 --out $OUT/loader_pixels_h200.json > $OUT/loader_pixels_log.txt 2>&1 ;;
FP) # ~220 s, carry .whl .whl_bench .carry/latex: stage 1 compiled, steps fed by the loader with 13 workers, 8-bit
    # pixels against the bf16 frame on one machine (Z measured the loader alone; run 17 ran 0.15 s a step)
    for d in .whl .whl_bench; do python3 -m pip install -q --no-index --no-deps --target /tmp/site $d/*.whl 2>/dev/null; done
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OCRTUNE_CACHE=/tmp/occ
    timeout 320 python3 bench/learning/fed_pixels.py --data .carry/latex/print/train.parquet --workers 13 --rounds 2 \
      --steps 50 --skip 15 --out $OUT/fed_pixels_h200.json > $OUT/fed_pixels_log.txt 2>&1 ;;
R)  # right after L (same machine, its work dir): stage 1's merged model on print validation with beam search (3 beams)
    export PYTHONPATH=/tmp/site:$PWD  # the wheels the recipe's wrapper installed there (datasets, rapidfuzz)
    M=$(ls -d .work/from_scratch/stage1/checkpoint-*-merged | tail -1)
    timeout 200 python3 -m ocrtune eval --ckpt_dir $M --val_dataset .carry/latex/print/validation.parquet \
      --metrics bleu,edit_distance,exact_match,token_acc --infer_batch_size 256 --max_new_tokens 256 --num_beams 3 \
      --result_path $OUT/stage1_print_beams3.jsonl > $OUT/beams3_log.txt 2>&1
    cd .work/from_scratch && tar czf $OUT/stage_logs.tgz stage1/logging.jsonl stage2/logging.jsonl *.log ;;
K)  bash examples/latex_ocr_from_scratch.sh --phase train --data_dir .carry/latex --report_dir $OUT > $OUT/phase_train_log.txt 2>&1 ;;
L)      bash examples/latex_ocr_from_scratch.sh --phase rest --data_dir .carry/latex --report_dir $OUT > $OUT/phase_rest_log.txt 2>&1 ;;
*)  echo "usage: bash bench/next_gpu_calls.sh F|Z|FP|K|L|R" >&2; exit 2 ;;
esac
