#!/usr/bin/env bash
# The bundled formula reader (`--model ocrtune-reader`): train it with the from-scratch recipe, package stage 1's
# merged model in 8 bits (scripts/package_reader.py), and evaluate the weights as shipped (packaged, then restored by
# ocrtune/models/reader.py) so the model card's figures are theirs. Three device calls back to back on ONE machine
# (its .work/ survives between them), from the repository root, outputs under $OUT:
#   A  carry .whl .whl_alt .carry/latex .carry/tex; ~560 s: the recipe's phase train (synth + stage 1 until --max_time)
#   B  same machine; ~560 s: the recipe's phase rest (stage 1 resumed and decayed by the clock, merged, evaluated
#      unquantized, stage 2), its deadline 545 s instead of 560 so that the packing fits the call; then the merged
#      stage-1 model packaged -> .work/reader/package/ and $OUT/reader.tar.part-* (below), so the package is safe
#      even if C never runs
#   C  same machine; ~150-250 s: `ocrtune eval --model ocrtune-reader` with OCRTUNE_READER_DIR=.work/reader/package on
#      print and handwrite validation (both at once on the GPU, as the recipe runs its evaluations);
#      reader_eval.json puts them beside the unquantized merged model's figures from the recipe's report; then the
#      package again with those figures in reader.json's card (its weight files checked byte-identical to B's) ->
#      $OUT/reader.tar.part-*. Commit: `cat reader.tar.part-* | tar x`, copy final/* into ocrtune/models/reader_weights/.
#   D  same machine, after B: bench/learning/grpo_vs_sft.py on the merged stage 1 (GRPO with the cdm reward against
#      equal-time SFT, ARM_SECONDS each, then both evaluated with CDM) -> $OUT/grpo_vs_sft_<card>.json
# The evaluations can't follow phase rest in B: it uses its whole deadline, and they need ~100-150 s of the call's 600.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
WORK=.work/from_scratch; PKG=.work/reader/package
DATA=${DATA:-.carry/latex}
SHARD_MB=${SHARD_MB:-15}
RECIPE_ARGS=${RECIPE_ARGS:-}  # e.g. --smoke: the whole flow on a CPU with the tiny model, in a few minutes
# KEEP_F16=REGEX: those tensors stay float16. Where C shows 8 bits costing accuracy, a second C on the same machine
# packs and evaluates that variant: rm -rf .work/reader/package && KEEP_F16=embed_tokens bash bench/reader_gpu_call.sh C

merged_stage1() {  # the recipe's merged stage-1 model (state.json's stage1_checkpoint; else the newest -merged folder)
  python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['stage1_checkpoint'])" $WORK/state.json 2>/dev/null \
    || ls -d $WORK/stage1/checkpoint-*-merged 2>/dev/null | sort -t- -k2 -n | tail -1
}

package() {  # $1: output folder, $2: card json (optional)
  local m; m=$(merged_stage1)
  [ -n "$m" ] && [ -d "$m" ] || { echo "error: no merged stage-1 model in $WORK (run A and B first)" >&2; return 1; }
  rm -rf "$1"; mkdir -p "$(dirname "$1")"
  timeout 120 python3 scripts/package_reader.py --model "$m" --output "$1" --shard_mb "$SHARD_MB" ${2:+--card_json "$2"} \
    ${KEEP_F16:+--keep_float16 "$KEEP_F16"}
}

# The device returns at most 8 files of <= 16 MiB from $OUT: the package comes back as one tar split into 15 MiB
# parts ($OUT/reader.tar.part-aa, -ab, ...; `cat reader.tar.part-* | tar x` rebuilds it), each call's reports and
# logs as one $OUT/<call>_reports.tgz.
REPORT=.work/reader/report
split_package() {  # $1: a package folder
  rm -f $OUT/reader.tar.part-*
  tar -cf - -C "$(dirname "$1")" "$(basename "$1")" | split -b 15m - $OUT/reader.tar.part-
}
bring_back() {  # $1: the call's letter
  tar -czf $OUT/$1_reports.tgz -C .work/reader report
}

case "$1" in
A)  mkdir -p $REPORT
    bash examples/latex_ocr_from_scratch.sh --phase train --data_dir $DATA --report_dir $REPORT $RECIPE_ARGS > $REPORT/phase_train_log.txt 2>&1
    rc=$?; tail -5 $REPORT/phase_train_log.txt; bring_back A; exit $rc ;;
B)  mkdir -p $REPORT
    bash examples/latex_ocr_from_scratch.sh --phase rest --data_dir $DATA --report_dir $REPORT --deadline_seconds 545 $RECIPE_ARGS \
      > $REPORT/phase_rest_log.txt 2>&1
    rc=$?
    export PYTHONPATH=/tmp/site:$PWD  # the wheels the recipe's wrapper installed (datasets, rapidfuzz)
    package $PKG > $REPORT/package_log.txt 2>&1 && split_package $PKG
    cat $REPORT/package_log.txt; bring_back B
    exit $rc ;;
C)  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    export OCRTUNE_CACHE=.work/reader/cache OCRTUNE_READER_DIR=$PWD/$PKG
    mkdir -p $REPORT
    [ -f $PKG/reader.json ] || package $PKG > $REPORT/package_log.txt 2>&1 || exit 1
    EV=$REPORT/eval; mkdir -p $EV
    # restored once (checked against reader.json, dequantized into the cache) before the two evaluations find it there
    python3 -c "from ocrtune.models.reader import restore_reader; print(restore_reader())" > $REPORT/restore_log.txt 2>&1 \
      || { cat $REPORT/restore_log.txt; bring_back C; exit 1; }
    pids=()
    for set in print handwrite; do
      timeout 400 python3 -m ocrtune eval --model ocrtune-reader --val_dataset $DATA/$set/validation.parquet \
        --metrics bleu,edit_distance,exact_match,token_acc --infer_batch_size 256 --max_new_tokens 256 \
        --result_path $EV/$set.jsonl > $EV/${set}_log.txt 2>&1 &
      pids+=($!)
    done
    for p in "${pids[@]}"; do wait $p; done
    python3 - "$REPORT" "$WORK" > $REPORT/card.json <<'EOF'
import json, sys
from pathlib import Path
out, work = Path(sys.argv[1]), Path(sys.argv[2])
read = lambda p: json.loads(p.read_text()) if p.exists() else {}
shipped = {s: read(out / "eval" / f"{s}_summary.json") for s in ("print", "handwrite")}
state = read(work / "state.json")
merged = {"print": state.get("print") or {}, "handwrite": state.get("handwrite_before") or {}}
keys = ("bleu4", "exact_match", "token_acc", "edit_distance_token", "count")
(out / "reader_eval.json").write_text(json.dumps({s: {"shipped_8bit": {k: shipped[s].get(k) for k in keys},
                                                      "merged_unquantized": {k: merged[s].get(k) for k in keys}}
                                                  for s in shipped}, indent=2))
s1 = state.get("stage1") or {}
card = {"recipe": "examples/latex_ocr_from_scratch.py (stage 1: synthetic + LaTeX_OCR print rows, from random weights)",
        "training_data": "ocrtune synth formulas (print validation/handwrite validation formulas excluded) + LaTeX_OCR print train",
        "training_steps": s1.get("steps"), "training_seconds": s1.get("train_seconds"), "device": state.get("device"),
        "print_bleu4": shipped["print"].get("bleu4"), "print_exact_match": shipped["print"].get("exact_match"),
        "handwrite_bleu4": shipped["handwrite"].get("bleu4"), "handwrite_exact_match": shipped["handwrite"].get("exact_match"),
        "eval_rows": {s: shipped[s].get("count") for s in shipped}}
print(json.dumps(card, indent=2))
EOF
    package .work/reader/final $REPORT/card.json > $REPORT/package_final_log.txt 2>&1 || { bring_back C; exit 1; }
    for f in $PKG/*.safetensors; do cmp -s "$f" .work/reader/final/$(basename "$f") || { echo "error: $f differs between packings" >&2; exit 1; }; done
    split_package .work/reader/final
    cat $REPORT/reader_eval.json; bring_back C ;;
D)  # after B on the same machine (its merged stage 1): GRPO with the cdm reward against equal-time SFT, ~560 s
    export PYTHONPATH=/tmp/site:$PWD
    CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200' | tr A-Z a-z)
    timeout 580 python3 bench/learning/grpo_vs_sft.py --data_dir $DATA --seconds ${ARM_SECONDS:-150} \
      --out $OUT/grpo_vs_sft_${CARD:-gpu}.json 2>&1 | tee $OUT/grpo_vs_sft_log.txt ;;
*)  echo "usage: bash bench/reader_gpu_call.sh A|B|C|D (back to back on one machine)" >&2; exit 2 ;;
esac
