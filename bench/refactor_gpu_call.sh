#!/usr/bin/env bash
# Behaviour and speed after a refactor, one device call from the repository root:
#   carry [".whl_q", ".carry/latex_slice", ".carry/before"]   (.carry/before: `git archive <old commit> ocrtune
#   bench/bench_sft.py | tar -x -C .carry/before`, the code before the refactor)
#   bash bench/refactor_gpu_call.sh          (ROUNDS=1: one before/after pair instead of two)
# 1. the cuda-marker suite on this tree (bench/run_cuda_tests.sh) -> $OUT/cuda_tests*.{xml,txt}
# 2. 7B print LoRA, case (b) (ocrtune, bench_sft's defaults: 16,384 tokens a step, Liger, recompute), the code before
#    and after alternated twice on one machine, same rows and model folder -> $OUT/refactor_7b_<card>.json
set -o pipefail
OUT=${OUT:-/tmp/out}; R=/tmp/rr; mkdir -p $R "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl_q/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OCRTUNE_CACHE=/tmp/occ OCRTUNE_TEST_CACHE=/tmp/occ
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200' | tr A-Z a-z)
CARD=${CARD:-gpu}
OUT=$R/cuda timeout 200 bash bench/run_cuda_tests.sh > $R/cuda_run_log.txt 2>&1; echo "cuda rc=$?" >> $R/cuda_run_log.txt
cp $R/cuda/* "$OUT"/ 2>/dev/null; cp $R/cuda_run_log.txt "$OUT"/
DATA=$PWD/.carry/latex_slice/print/train.parquet
for round in $(seq 1 ${ROUNDS:-2}); do
  for side in before after; do
    S=bench/bench_sft.py; [ $side = before ] && S=.carry/before/bench/bench_sft.py
    timeout 150 python3 $S --data $DATA --models 7b --model_root /tmp --cases b --liger --rows 1500 --steps 6 \
      --warmup 2 --timeout 140 --out $R/${side}_$round.json > $R/${side}_${round}_log.txt 2>&1
    echo "$side $round rc=$?" >> $R/rounds.txt
  done
done
python3 - "$R" "$OUT/refactor_7b_$CARD.json" <<'PY'
import json, sys, glob, os
r, out = sys.argv[1], sys.argv[2]
runs = {}
for f in sorted(glob.glob(f"{r}/*_[12].json")):
    side, rnd = os.path.basename(f)[:-5].split("_")
    b = json.load(open(f))["runs"][0]["b_all"][0]
    runs.setdefault(side, []).append({k: b.get(k) for k in ("samples_per_s", "tokens_per_s", "max_reserved_gib",
                                                             "check_loss", "device", "s_per_step")})
mean = {s: sum(x["samples_per_s"] for x in v) / len(v) for s, v in runs.items()}
json.dump({"command": f"ROUNDS={os.environ.get('ROUNDS', '2')} bash bench/refactor_gpu_call.sh (before = commit ea30f83's ocrtune and bench_sft.py)",
           "runs": runs, "mean_samples_per_s": mean,
           "after_vs_before": round(mean["after"] / mean["before"], 4) if len(mean) == 2 else None},
          open(out, "w"), indent=1)
print(json.dumps(mean), open(out).read()[-200:])
PY
tar czf $OUT/refactor.tgz -C $R .
