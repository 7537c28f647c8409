#!/usr/bin/env bash
# The GPU measurements this repository is waiting for (written 2026-12-01; see the open issues' notes), as
# three device calls from the repository root on one H200. Outputs go to $OUT (tar them: a call returns few files).
#   call A  (carry .whl .whl_bench .carry/latex):          bash bench/next_gpu_calls.sh A
#   call B  (carry .whl .whl_alt .carry/latex .carry/tex): bash bench/next_gpu_calls.sh B
#   call C  right after B, same carry (the work dir must survive): bash bench/next_gpu_calls.sh C
#   calls D, E (carry .whl .whl_bench .carry/latex):       bash bench/next_gpu_calls.sh D  (then E)
#   call F (same carry; done 2026-12-02), calls G then H right after (carry .whl .whl_alt .carry/latex .carry/tex; done: run 8)
#   calls I then J right after (same carry as G): issue 13 run 9, run 8 with the tied embeddings trained in stage 1
#   calls K then L right after (same carry as G): issue 13 run 10, the recipe's new defaults (65,536 tokens a step,
#   400k synthetic rows, stage 1 planned over both calls: stopped by --max_time in K, resumed in L). Done: run 10.
#   K then L again (2026-12-02, sixth session): run 11, half the synthetic formulas scrambled; done
#   (bench/learning/run11_scrambled_h200/, with stage 1b, a third call: run11_scrambled_h200/stage1b/commands.sh).
#   K then L again (2026-12-03, seventh session): run 12, stage 1 as ReLoRA in 5 cycles, host ViT ids; done
#   (bench/learning/run12_relora_h200/, print BLEU-4 0.321), then O (ReLoRA against one adapter at 600 steps; done).
#   Next (run 13): P then L, with run 12's train/validation gap in mind (train token accuracy 0.86 against 0.77): half
#   the synthetic formulas recombined from two train formulas' halves (ocrtune synth --recombine, new; the recipe's
#   --synth_recombine 0.5), everything else run 12's; on nvidia-h200-x2 where status lends it. Before them, ~150 s:
#   call Q (the cuda suite since the patch embedding's LoRA became GEMMs, and stage 1's step with it).
#   Done 2026-12-03 (eighth session): the cuda suite (passed), then SEC=0.2268 P, L, R: run 13, print BLEU-4 0.429
#   greedy / 0.454 with 3 beams (bench/learning/run13_recombine_h200/).
#   Run 14: S then L: run 13 at twice the visual tokens per formula (--min_pixels 60000 --max_pixels 240000;
#   run 13 reads 57% of main-line symbols but 39% of sub/superscripts), with the probe (the pace changes); then R.
#   Done 2026-12-03 (ninth session): S, L, R, then T (the pixel sweep): print BLEU-4 0.183, its probe misled by an
#   epoch boundary (fixed: the probe's pace leaves it out, and sft starts the next epoch's loader early);
#   bench/learning/run14_pixels60k_h200/ and sweep_pixels_2026-12-03/.
#   Next: W (~200 s, carry .whl .whl_bench .carry/latex): does torch.compile of the decoder layers and ViT blocks speed
#   up the small model's step (elementwise- and launch-bound)? Then V (~530 s, carry as for G): equal-time stage-1
#   variants (twice the tokens a step; 15k pixels) against the recipe's; then run 15 as U (phase train, RUN15_FLAGS =
#   the winner's recipe flags, the probe on), L, R.
#   Done 2026-12-03 (tenth session): W (compiled blocks: 0.134 s a step against 0.192), X (sft --torch_compile fed by
#   the loader: 0.216 s, the loader bounding it; the step alone 0.099), then U and L: run 15, stage 1 compiled, print
#   BLEU-4 0.346 at 2,419 steps (planned short by X's pace; ran 0.18 s a step): bench/learning/run15_compiled_h200/.
#   Next: Y (~100 s, carry .whl .whl_bench .carry/latex): the loader since the workers encode one frame; then run 16 as
#   U with RUN15_FLAGS="--stage1_torch_compile true" (paced by its probe, compiled too), L, R (bench/learning/README.md,
#   "Run 15").
#   Done 2026-12-03 (eleventh session): U, L, R = run 16 (the probe read 0.156 s a step, stage 1 ran 0.22; stopped
#   undecayed at 1,754 of 2,638 steps: print BLEU-4 0.323), then the recipe's new clock schedule on the GPU (--phase all,
#   350 s): bench/learning/run16_compiled_probe_h200/ and time_schedule_check_h200/.
#   Next: run 17 = the recipe's defaults (--schedule_by time, no probe, compiled; batches in shared memory): K, then L,
#   then R, back to back on one machine (carry .whl .whl_alt .carry/latex .carry/tex).
#   Twelfth session: the loader's workers now send 8-bit pixels (one frame, one channel for gray images; normalized on
#   the device). First Z (~100 s, carry .whl .whl_bench .carry/latex): the loader with 13 workers, 8 bits against the
#   bf16 frame it replaces (bench/learning/loader_pixels.py); then run 17 as K, L, R on a machine of its own.
#   Done 2026-12-03 (twelfth session), all on one machine: Z (17.7 against 10.5 batches/s), K, L, R = run 17, print
#   BLEU-4 0.655 greedy / 0.703 with 3 beams (target 0.6 met): bench/learning/run17_eight_bit_h200/.
set -o pipefail
OUT=${OUT:-/tmp/out}; R=/tmp/r; mkdir -p $R
case "$1" in
A)  # issue 16: the cuda suite (lean MLP fp8 test included), --lean_mlp_fp8, alone and with partial recompute, on 7B
    for d in .whl .whl_bench; do python3 -m pip install -q --no-index --no-deps --target /tmp/site $d/*.whl 2>/dev/null; done
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OCRTUNE_CACHE=/tmp/occ OCRTUNE_TEST_CACHE=/tmp/occ
    OUT=$R/cuda timeout 200 bash bench/run_cuda_tests.sh > $R/cuda_run_log.txt 2>&1
    F="python3 bench/bench_frontier.py --model 7b --liger --data .carry/latex/print/train.parquet"
    timeout 110 $F --grid '8192:0;16384:0' --overrides '{"lean_mlp_fp8": true}' --out $R/frontier_7b_lean_mlp_fp8.json > $R/fp8_log.txt 2>&1
    timeout 110 $F --grid '8192:0;16384:0' --lora_dropout 0 --overrides '{"lean_mlp_fp8": true}' --out $R/frontier_7b_lean_mlp_fp8_dropout0.json > $R/fp8_d0_log.txt 2>&1
    timeout 130 $F --grid '12288:4,8;16384:10,14' --lora_dropout 0 --overrides '{"lean_mlp_fp8": true}' --out $R/frontier_7b_lean_mlp_fp8_partial.json > $R/partial_log.txt 2>&1
    tar czf $OUT/callA.tgz -C $R . ;;
B)  bash examples/latex_ocr_from_scratch.sh --phase train --data_dir .carry/latex --report_dir $OUT --synth_rows 250000 \
      --stage1_lora_rank 64 > $OUT/phase_train_log.txt 2>&1 ;;
C)  bash examples/latex_ocr_from_scratch.sh --phase rest --data_dir .carry/latex --report_dir $OUT > $OUT/phase_rest_log.txt 2>&1 ;;
D)  # issue 16: the lean MLP's fused Triton kernels and --fp8_base (float8 base matmuls), 7B, LoRA dropout 0; then the
    # cuda tests of the new kernels (bit for bit against torch), _scaled_mm against the emulated math, --fp8_base models
    for d in .whl .whl_bench; do python3 -m pip install -q --no-index --no-deps --target /tmp/site $d/*.whl 2>/dev/null; done
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OCRTUNE_CACHE=/tmp/occ OCRTUNE_TEST_CACHE=/tmp/occ
    F="python3 bench/bench_frontier.py --model 7b --liger --lora_dropout 0 --data .carry/latex/print/train.parquet"
    timeout 75 $F --grid '8192:0;16384:0' --overrides '{"lean_mlp": true}' --out $R/frontier_7b_lean_mlp_triton.json > $R/lean_log.txt 2>&1
    timeout 60 $F --grid '8192:0;10240:0' --overrides '{"lean_mlp_fp8": true}' --out $R/frontier_7b_lean_mlp_fp8_triton.json > $R/lean_fp8_log.txt 2>&1
    timeout 85 $F --grid '8192:0;12288:0;16384:0' --overrides '{"lean_mlp_fp8": true, "fp8_base": true}' --out $R/frontier_7b_fp8_base_lean_fp8.json > $R/fp8_base_lean_fp8_log.txt 2>&1
    timeout 75 python3 -m pytest -q -m cuda tests/test_cuda.py -k "triton or fp8 or lean" -p no:cacheprovider \
      --junitxml=$R/cuda_tests_fp8.xml > $R/cuda_tests_fp8_log.txt 2>&1
    tar czf $OUT/callD.tgz -C $R . ;;
E)  # after D: the kernels' scales as torch computes them (times float32(1/448)); --fp8_base at 10k tokens
    for d in .whl .whl_bench; do python3 -m pip install -q --no-index --no-deps --target /tmp/site $d/*.whl 2>/dev/null; done
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OCRTUNE_CACHE=/tmp/occ OCRTUNE_TEST_CACHE=/tmp/occ
    timeout 45 python3 -m pytest -q -m cuda tests/test_cuda.py -k "triton_kernels_match or scaled_mm" -p no:cacheprovider \
      --junitxml=$R/cuda_tests_kernels.xml > $R/cuda_tests_kernels_log.txt 2>&1
    timeout 60 python3 bench/bench_frontier.py --model 7b --liger --lora_dropout 0 --data .carry/latex/print/train.parquet \
      --grid '10240:0' --overrides '{"lean_mlp_fp8": true, "fp8_base": true}' --out $R/frontier_7b_fp8_base_lean_fp8_10k.json \
      > $R/fp8_base_10k_log.txt 2>&1
    tar czf $OUT/callE.tgz -C $R . ;;
F)  # next session, issue 16: the whole cuda suite after the review fixes (float8 scales as torch's, kernels on the
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
G)  # 2026-12-02, issue 13 run 8 (done: bench/learning/run8_packing32k_h200/): twice run 7's tokens a step, probe kept
    bash examples/latex_ocr_from_scratch.sh --phase train --data_dir .carry/latex --report_dir $OUT --synth_rows 250000 \
      --packing_tokens 32768 --workers 12 > $OUT/phase_train_log.txt 2>&1 ;;
I)  # 2026-12-02, issue 13 run 9: run 8's settings, stage 1 now also trains the embeddings (--stage1_modules_to_save
    # embed_tokens, the recipe's new default: the digits sweep's best, lora_embed)
    bash examples/latex_ocr_from_scratch.sh --phase train --data_dir .carry/latex --report_dir $OUT --synth_rows 250000 \
      --packing_tokens 32768 --workers 12 > $OUT/phase_train_log.txt 2>&1 ;;
M)  for d in .whl .whl_bench; do python3 -m pip install -q --no-index --no-deps --target /tmp/site $d/*.whl 2>/dev/null; done
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OCRTUNE_CACHE=/tmp/occ
    timeout 280 python3 bench/learning/profile_stage1.py --data .carry/latex/print/train.parquet --rows 13918 \
      --tokens 65536 --workers 13 --variants '{"stock_vision_ids": {"_host_vision_ids": false}, "liger": {"use_liger": true}}' \
      --profile_variants stage1,stock_vision_ids --profile_tokens 65536 --out $OUT/profile_host_vision_ids_h200.json \
      > $OUT/profile_log.txt 2>&1 ;;
N)  # ~520 s, carry as for G: stage-1 variants on 120k synthetic rows, 400 steps each (bench/learning/sweep_stage1.py:
    # the recipe's stage 1; rank 128 at half the rate; rank 64 at twice the rate), validation every 100 steps
    RECIPE_PY=bench/learning/sweep_stage1.py bash examples/latex_ocr_from_scratch.sh --data_dir .carry/latex \
      --synth_rows 120000 --steps 400 --max_time 150 --out $OUT/sweep_stage1_h200.json > $OUT/sweep_log.txt 2>&1 ;;
O)  # run 12's third call, right after L on the same machine (its synthetic rows are reused, none rendered): stage 1
    # with ReLoRA's 5 cycles against one adapter throughout, 600 steps each, the same rows, the same schedule otherwise
    RECIPE_PY=bench/learning/sweep_stage1.py bash examples/latex_ocr_from_scratch.sh --data_dir .carry/latex \
      --work_dir .work/from_scratch --synth_rows 400000 --steps 600 --max_time 215 \
      --variants '{"relora5": [], "one_adapter": ["--stage1_relora_cycles", "1"]}' \
      --out $OUT/sweep_relora_h200.json > $OUT/sweep_log.txt 2>&1 ;;
Q)  # ~150 s, carry .whl .whl_bench .carry/latex: the cuda suite since the patch embedding's LoRA became two GEMMs, then
    # stage 1's step at 65,536 tokens with it (run 12's probe: 0.227 s; the profile of 2026-12-03: 0.196-0.205 s)
    for d in .whl .whl_bench; do python3 -m pip install -q --no-index --no-deps --target /tmp/site $d/*.whl 2>/dev/null; done
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OCRTUNE_CACHE=/tmp/occ OCRTUNE_TEST_CACHE=/tmp/occ
    OUT=$R/cuda timeout 120 bash bench/run_cuda_tests.sh > $R/cuda_run_log.txt 2>&1
    timeout 150 python3 bench/learning/profile_stage1.py --data .carry/latex/print/train.parquet --rows 13918 --tokens 65536 \
      --workers 13 --profile_variants stage1 --profile_tokens 65536 --out $R/profile_patch_embed_gemm_h200.json > $R/profile_log.txt 2>&1
    tar czf $OUT/callQ.tgz -C $R . ;;
P)  # run 13's phase train (then L; done): run 12's recipe with half the synthetic formulas recombined (now the default), no probe (run 12's
    # probe's pace, SEC), and the recipe's new phase-rest split (stage 1 gets 40 s of run 12's idle 114 s)
    bash examples/latex_ocr_from_scratch.sh --phase train --data_dir .carry/latex --report_dir $OUT --synth_recombine 0.5 \
      --stage1_seconds_per_step ${SEC:-0.2268} > $OUT/phase_train_log.txt 2>&1 ;;
S)  # run 14's phase train (then L, then R): run 13's recipe at twice the visual tokens per formula, paced by the probe
    bash examples/latex_ocr_from_scratch.sh --phase train --data_dir .carry/latex --report_dir $OUT --min_pixels 60000 \
      --max_pixels 240000 > $OUT/phase_train_log.txt 2>&1 ;;
T)  # ~540 s, carry as for G: stage 1 at three image sizes, 450 steps each on 100k synthetic rows (run 14 found twice
    # run 13's visual tokens worse at equal time and at equal samples; is fewer better?), validation every ~112 steps
    RECIPE_PY=bench/learning/sweep_stage1.py bash examples/latex_ocr_from_scratch.sh --data_dir .carry/latex \
      --synth_rows 100000 --steps 450 --max_time 140 --variants '{"px30k": [], "px20k": ["--min_pixels", "20000",
      "--max_pixels", "80000"], "px15k": ["--min_pixels", "15000", "--max_pixels", "60000"]}' \
      --out $OUT/sweep_pixels_h200.json > $OUT/sweep_log.txt 2>&1 ;;
W)  # ~200 s: the stage-1 step at 65,536 tokens eager against its decoder layers and ViT blocks compiled (dynamic
    # shapes; on CPU the tiny model recompiled for every new image count in transformers' per-image ViT attention,
    # which the GPU replaces with varlen attention): warmup_s is the compiling, steps_s shows recompiles
    for d in .whl .whl_bench; do python3 -m pip install -q --no-index --no-deps --target /tmp/site $d/*.whl 2>/dev/null; done
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OCRTUNE_CACHE=/tmp/occ
    timeout 420 python3 bench/learning/profile_stage1.py --data .carry/latex/print/train.parquet --rows 13918 \
      --tokens 65536 --workers 13 --steps 10 --warmup 12 --profile_variants stage1,compiled --profile_tokens 65536 \
      --variants '{"compiled": {"_compile_blocks": true}, "compiled_lm": {"_compile_blocks": "lm"}}' --out $OUT/profile_compile_h200.json > $OUT/profile_log.txt 2>&1 ;;
V)  # ~530 s, carry as for G: the recipe's stage 1 against twice its tokens a step (at fewer steps: about the same
    # minutes, if a step of 131,072 tokens costs ~0.33 s) and against 15k pixels (14% quicker a step in T: more steps)
    RECIPE_PY=bench/learning/sweep_stage1.py bash examples/latex_ocr_from_scratch.sh --data_dir .carry/latex \
      --synth_rows 100000 --steps 450 --max_time 170 --variants '{"base": [], "tokens131k": ["--packing_tokens",
      "131072", "--stage1_steps", "340"], "px15k": ["--min_pixels", "15000", "--max_pixels", "60000", "--stage1_steps",
      "500"]}' --out $OUT/sweep_equal_time_h200.json > $OUT/sweep_log.txt 2>&1 ;;
X)  # ~170 s, carry as for G (the recipe's wheels: U follows on the same machine): the stage-1 step fed by the loader
    # (per-sample frame dropping, new), eager and with sft --torch_compile (new; W: 0.134 s a step against 0.192 eager,
    # its blocks compiled in ~94 s). Writes .work/run15_flags: U's pace and compile settings (bench/learning/compile_decision.py)
    for d in .whl .whl_bench; do python3 -m pip install -q --no-index --no-deps --target /tmp/site $d/*.whl 2>/dev/null; done
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OCRTUNE_CACHE=/tmp/occ
    TORCH_LOGS=graph_breaks,recompiles timeout 240 python3 bench/learning/profile_stage1.py --data .carry/latex/print/train.parquet \
      --rows 13918 --tokens 65536 --workers 13 --steps 6 --warmup 8 --fed_steps 50 --profile_variants none \
      --variants '{"compiled": {"torch_compile": true}}' --out $OUT/profile_compile_fed_h200.json > $OUT/profile_log.txt 2>&1
    mkdir -p .work && python3 bench/learning/compile_decision.py $OUT/profile_compile_fed_h200.json > .work/run15_flags
    cat .work/run15_flags ;;
Y)  # ~100 s, carry .whl .whl_bench .carry/latex: the loader alone at 65,536 tokens with 13 workers, since the workers
    # encode still images as one frame (the processor at temporal_patch_size 1) and cache the prompt's token ids (new):
    # is it now quicker than the compiled step (0.099 s, X)? Then steps fed by it (eager)
    for d in .whl .whl_bench; do python3 -m pip install -q --no-index --no-deps --target /tmp/site $d/*.whl 2>/dev/null; done
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OCRTUNE_CACHE=/tmp/occ
    timeout 150 python3 bench/learning/profile_stage1.py --data .carry/latex/print/train.parquet --rows 13918 \
      --tokens 65536 --workers 13 --loader_only --out $OUT/loader_one_frame_h200.json > $OUT/loader_log.txt 2>&1 ;;
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
U)  # run 15's phase train (then L, then R): the recipe with RUN15_FLAGS (recipe flags; default: what X wrote)
    bash examples/latex_ocr_from_scratch.sh --phase train --data_dir .carry/latex --report_dir $OUT \
      ${RUN15_FLAGS:-$(cat .work/run15_flags 2>/dev/null)} > $OUT/phase_train_log.txt 2>&1 ;;
R)  # right after L (same machine, its work dir): stage 1's merged model on print validation with beam search (3 beams)
    export PYTHONPATH=/tmp/site:$PWD  # the wheels the recipe's wrapper installed there (datasets, rapidfuzz)
    M=$(ls -d .work/from_scratch/stage1/checkpoint-*-merged | tail -1)
    timeout 200 python3 -m ocrtune eval --ckpt_dir $M --val_dataset .carry/latex/print/validation.parquet \
      --metrics bleu,edit_distance,exact_match,token_acc --infer_batch_size 256 --max_new_tokens 256 --num_beams 3 \
      --result_path $OUT/stage1_print_beams3.jsonl > $OUT/beams3_log.txt 2>&1
    cd .work/from_scratch && tar czf $OUT/stage_logs.tgz stage1/logging.jsonl stage2/logging.jsonl *.log ;;
K)  bash examples/latex_ocr_from_scratch.sh --phase train --data_dir .carry/latex --report_dir $OUT > $OUT/phase_train_log.txt 2>&1 ;;
J|H|L)  bash examples/latex_ocr_from_scratch.sh --phase rest --data_dir .carry/latex --report_dir $OUT > $OUT/phase_rest_log.txt 2>&1 ;;
*)  echo "usage: bash bench/next_gpu_calls.sh A|B|C|D|E|F|G|H|I|J|K|L|M|N|O|P|Q|R|S|T|U|V|W|X|Y|Z|FP" >&2; exit 2 ;;
esac
