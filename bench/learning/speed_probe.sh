#!/usr/bin/env bash
# Stage-1 training speed of the small preset on LaTeX_OCR print (batch 128, augment, 12 workers) under a few
# settings: where does the time go? Each case is a short `ocrtune sft` run; seconds/step is measured between
# the first and the last logged step (the start-up steps are left out).
#   bash bench/learning/speed_probe.sh DATA_DIR OUT_DIR [STEPS]
set -uo pipefail
cd "$(dirname "$0")/../.."
DATA=${1:-.carry/latex5}; OUT=${2:-/tmp/speed_probe}; STEPS=${3:-30}
WHEELS=${WHEELS:-.carry/whl5}
if ! python3 -c "import datasets, rapidfuzz" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OCRTUNE_CACHE=/tmp/speed_probe_cache
mkdir -p "$OUT"
run() {  # name, env, extra flags...
  local name=$1 envs=$2; shift 2
  local dir=/tmp/speed_probe_runs/$name
  rm -rf "$dir"
  env $envs python3 -m ocrtune.cli.main sft --model small --train_type full --dataset "$DATA/print/train.parquet" \
    --dataset_test_ratio 0 --batch_size 128 --learning_rate 1e-3 --max_steps "$STEPS" --logging_steps $((STEPS / 3)) \
    --eval_steps "$STEPS" --save_steps 100000 --gradient_checkpointing false --dataloader_num_workers 12 \
    --min_pixels 30000 --max_pixels 120000 --augment true --output_dir "$dir" --add_output_dir_suffix false \
    --report_to none "$@" > "$OUT/$name.log" 2>&1
  python3 - "$dir/logging.jsonl" "$name" "$envs $*" <<'PY' | tee -a "$OUT/speed.jsonl"
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if '"train_speed' in l]
(s0, t0), (s1, t1) = [(r["step"], r["step"] / r["train_speed(iter/s)"]) for r in (recs[0], recs[-1])]
sec = (t1 - t0) / (s1 - s0)
print(json.dumps({"case": sys.argv[2], "flags": sys.argv[3].strip(), "seconds_per_step": round(sec, 4),
                  "samples_per_s": round(128 / sec, 1), "peak_memory_gib": recs[-1].get("memory(GiB)")}))
PY
}
run amp_padded "ACCELERATE_MIXED_PRECISION=bf16" --dtype float32 --freeze_vit false
run amp_packed "ACCELERATE_MIXED_PRECISION=bf16" --dtype float32 --freeze_vit false --packing true
run bf16_packed "X=1" --freeze_vit false --packing true
run bf16_packed_frozen_vit "X=1" --freeze_vit true --packing true
