#!/usr/bin/env bash
# Speed III training in one device call. The default's exact speed (the memory plan: lean MLP, the fewest recomputing
# layers that fit; the LoRA dropout drawn inside Triton kernels) against the old default (every layer recomputing,
# `recompute_layers=28` given) and plain Trainer + PEFT, on the real 7B and 2B shapes (random weights), print rows;
# the GPU tests of the plan and the kernels; and what a 7B step keeps for backward, module by module. From the
# repository root (~540 s):
#   carry [".whl", ".whl_bench", ".carry/latex_slice"]     bash bench/speed3_gpu_call.sh
# PARTS picks parts (default "tests 7b 2b saved compile"; "reader" is bench_decode on the trained reader with a
# profile, for a call that must do both halves: PARTS="tests 7b reader"; "anatomy" / "anatomy_default" take a 7B
# step apart with bench/learning/step_anatomy.py; "7b_max" benches the defaults and --speed max against Trainer + PEFT;
# TESTS_K narrows the GPU tests).
# -> $OUT/speed3_{7b,2b}_<card>.json (bench_sft.py's report, command inside), $OUT/speed3_log.txt, the GPU tests
# (tests/test_cuda.py -k "memory_plan or dropout or triton or lean_mlp") in $OUT/speed3_cuda_tests.txt, and
# $OUT/saved_7b_<card>.json (bench/learning/saved_tensors.py). Inference: bench/infer3_gpu_call.sh.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# all of .whl: the Trainer + PEFT baseline's process imports datasets (its 2026-12-07 run failed without it)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  .whl_bench/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OCRTUNE_CACHE=/tmp/occ OCRTUNE_TEST_CACHE=/tmp/occ
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200' | tr A-Z a-z)
CARD=${CARD:-gpu}
DATA=$PWD/.carry/latex_slice/print/train.parquet
PARTS=" ${PARTS:-tests 7b 2b saved compile} "
has() { [[ "$PARTS" == *" $1 "* ]]; }
# anatomy: where a 7B step's time goes (bench/learning/step_anatomy.py), --speed max at 8-16k tokens, then the defaults
if has anatomy; then
  timeout ${ANATOMY_S:-200} python3 bench/learning/step_anatomy.py --data "$DATA" --model 7b --liger \
    --tokens 8192,10240,16384 --profile_tokens 10240 --overrides '{"speed": "max"}' --out "$OUT/anatomy_max_$CARD.json" \
    --trace "$OUT/anatomy_max_trace_$CARD.json.gz" 2>&1 | grep -v Warning | tail -40 | tee -a "$OUT/speed3_log.txt"
fi
if has anatomy_default; then
  timeout ${ANATOMY_S:-200} python3 bench/learning/step_anatomy.py --data "$DATA" --model 7b --liger \
    --tokens 8192,16384 --profile_tokens 16384 --overrides '{}' --loader_batches 0 --out "$OUT/anatomy_default_$CARD.json" \
    2>&1 | grep -v Warning | tail -40 | tee -a "$OUT/speed3_log.txt"
fi
if has tests; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py -s \
    -k "${TESTS_K:-memory_plan or dropout or triton or lean_mlp}" > "$OUT/speed3_cuda_tests.txt" 2>&1
  echo "cuda test rc=$?" >> "$OUT/speed3_cuda_tests.txt"
fi
if has 7b; then
  python3 bench/bench_sft.py --data "$DATA" --models 7b --liger --packing_tokens 16384 --cases ab \
    --b_variants ";recompute_layers=28" --b_max_reserved_gib 80 --budget_s ${BUDGET_7B:-230} \
    --out "$OUT/speed3_7b_$CARD.json" 2>&1 | tee -a "$OUT/speed3_log.txt" | tail -8
fi
if has 7b_max; then  # the defaults and --speed max (at its 10,240 tokens) against Trainer + PEFT, one machine
  # 6 warm-up steps: the first batches of new lengths compile Triton variants (Liger's kernels specialize on them)
  python3 bench/bench_sft.py --data "$DATA" --models 7b --liger --packing_tokens 16384 --cases ab --warmup 6 --steps ${STEPS_7B:-12} \
    --b_variants ";speed=max,packing_tokens=10240" --b_max_reserved_gib 80 --budget_s ${BUDGET_7B:-300} \
    --out "$OUT/speed3_7b_max_$CARD.json" 2>&1 | tee -a "$OUT/speed3_log.txt" | tail -8
fi
if has max_compile; then  # --speed max with --torch_compile, steps fed by the loader (bench/learning/step_anatomy.py)
  timeout ${COMPILE_S:-200} python3 bench/learning/step_anatomy.py --data "$DATA" --model 7b --liger --tokens 10240 \
    --steps 6 --warmup 4 --no_profile --fed_steps 12 --loader_batches 0 \
    --overrides '{"speed": "max", "torch_compile": true}' --out "$OUT/anatomy_max_compile_$CARD.json" 2>&1 \
    | grep -E "budget|fed by|Error" | tee -a "$OUT/speed3_log.txt"
fi
if has reader; then  # inference on the trained reader (bench/infer3_gpu_call.sh's READER part, with its profile)
  timeout ${READER_S:-180} python3 bench/bench_decode.py --model ocrtune-reader --rows 256 --batch_size 256 \
    --max_new_tokens 256 --fp32_rows 64 --profile_rows 64 --budget_s $(( ${READER_S:-180} - 40 )) \
    --out "$OUT/decode_reader_$CARD.json" 2>&1 | tail -6 | tee -a "$OUT/speed3_log.txt"
fi
if has 2b; then
  python3 bench/bench_sft.py --data "$DATA" --models 2b --liger --packing_tokens_list 16384,32768 --cases ab \
    --b_max_reserved_gib 80 --budget_s ${BUDGET_2B:-130} --out "$OUT/speed3_2b_$CARD.json" 2>&1 \
    | tee -a "$OUT/speed3_log.txt" | tail -8
fi
if has saved; then
  timeout ${SAVED_S:-70} python3 bench/learning/saved_tensors.py --data "$DATA" --model 7b --liger --tokens 4096 \
    --out "$OUT/saved_7b_$CARD.json" 2>&1 | tail -30 | tee -a "$OUT/speed3_log.txt"
fi
# last, only where the call's 590 s leave 120: the 2B plan with --torch_compile (decoder layers and ViT blocks), 32k
LEFT=$(( 590 - SECONDS ))
if has compile && [ "$LEFT" -ge 120 ]; then
  timeout $LEFT python3 bench/bench_sft.py --data "$DATA" --models 2b --liger --packing_tokens 32768 --cases b \
    --b_variants "torch_compile=true" --b_max_reserved_gib 80 --timeout $(( LEFT - 10 )) \
    --out "$OUT/speed3_2b_compile_$CARD.json" 2>&1 | tee -a "$OUT/speed3_log.txt" | tail -4
fi
