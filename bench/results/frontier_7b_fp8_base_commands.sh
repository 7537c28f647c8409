#!/usr/bin/env bash
# How bench/results/frontier_7b_{lean_mlp_fp8_torchops*,lean_mlp_triton,lean_mlp_fp8_triton,fp8_base_lean_fp8}.json
# and cuda_tests_h200/{full_suite,qwen_vl}_2026-12-01.xml, fp8_kernels_tests.xml were made (2026-12-01, one H200,
# torch 2.11.0+cu130, transformers 5.17.0, peft 0.21.0, liger-kernel 0.8.5), from the repository root:
#   call A at commit af75854 (carry .whl .whl_bench .carry/latex): bash bench/next_gpu_calls.sh A
#     -> frontier_7b_lean_mlp_fp8.json, _dropout0.json, _partial.json (saved here with "_torchops": --lean_mlp_fp8
#        before the Triton kernels, its float8 scaling in torch ops) and the whole cuda suite (11 passed; 11+1 skip)
#   call D at commit ec2fa80 (same carry): bash bench/next_gpu_calls.sh D
#     -> the three frontier JSONs with the Triton kernels and --fp8_base, and the cuda tests of the new code
#        (7 passed; test_triton_kernels_match_the_torch_ops failed on scales one ulp apart: the reference divided
#        on CUDA by multiplying with float32(1/448), the kernel divided exactly; both now multiply, commit after)
# The commands inside next_gpu_calls.sh, call D:
F="python3 bench/bench_frontier.py --model 7b --liger --lora_dropout 0 --data .carry/latex/print/train.parquet"
$F --grid '8192:0;16384:0' --overrides '{"lean_mlp": true}' --out frontier_7b_lean_mlp_triton.json
$F --grid '8192:0;10240:0' --overrides '{"lean_mlp_fp8": true}' --out frontier_7b_lean_mlp_fp8_triton.json
$F --grid '8192:0;12288:0;16384:0' --overrides '{"lean_mlp_fp8": true, "fp8_base": true}' --out frontier_7b_fp8_base_lean_fp8.json
python3 -m pytest -q -m cuda tests/test_cuda.py -k "triton or fp8 or lean" --junitxml=fp8_kernels_tests.xml
# 2026-12-02, call F at commit 6f29031 (same carry): bash bench/next_gpu_calls.sh F
#   -> frontier_7b_fp8_base_more.json, frontier_2b_fp8_base.json (+ _log.txt) and the whole cuda suite after the
#      review fixes: cuda_tests_h200/full_suite_2026-12-02.xml (15 passed), qwen_vl_2026-12-02.xml (11 passed, 1 skip)
#   F="python3 bench/bench_frontier.py --liger --lora_dropout 0 --data .carry/latex/print/train.parquet"
#   $F --model 7b --grid '10240:0;16384:all' --overrides '{"lean_mlp_fp8": true, "fp8_base": true}' --out frontier_7b_fp8_base_more.json
#   $F --model 2b --grid '32768:0' --overrides '{"lean_mlp_fp8": true, "fp8_base": true}' --out frontier_2b_fp8_base.json
