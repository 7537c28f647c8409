# Stage 1b (2026-12-02, one H200, device call right after run 11's phase rest on the same machine, 366 s wall):
# a fresh rank-64 LoRA round over run 11's merged stage-1 model, same data (synth + print train), half the rate,
# its own 750-step cosine, then merged and evaluated on all 1,000 print validation rows.
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1; O="python3 -m ocrtune"; W=.work/from_scratch
$O sft --model $W/stage1/checkpoint-1937-merged --train_type lora --lora_rank 64 --lora_alpha 128 --lora_dropout 0 \
  --target_modules q_proj k_proj v_proj o_proj gate_proj up_proj down_proj qkv proj fc1 fc2 --modules_to_save embed_tokens \
  --augment false --dataset $W/synth .carry/latex/print/train.parquet --val_dataset '.carry/latex/print/validation.parquet#200' \
  --packing_tokens 65536 --learning_rate 0.0005 --warmup_ratio 0.03 --max_steps 750 --eval_steps 375 --save_steps 375 \
  --logging_steps 20 --predict_with_generate false --output_dir $W/stage1b --min_pixels 30000 --max_pixels 120000 \
  --packing true --dataloader_num_workers 13 --gradient_checkpointing false --add_output_dir_suffix false --report_to none \
  --save_total_limit 1 --max_time 280
$O export --ckpt_dir $W/stage1b/checkpoint-750 --merge_lora true
$O eval --ckpt_dir $W/stage1b/checkpoint-750-merged --val_dataset .carry/latex/print/validation.parquet \
  --metrics bleu,edit_distance,exact_match,token_acc --infer_batch_size 256 --max_new_tokens 256 --result_path $OUT/stage1b_print.jsonl
