"""Arguments of `ocrtune sft`, with SWIFT's names (and their older aliases)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ocrtune.args import (BIG, SEED, SHARE, arg, dtype_arg, ints, max_new_tokens_arg, max_pixels_arg,
                          model_arg, model_type_arg, positive, quant_bits_arg, reals, tex_root_arg, use_hf_arg)
from ocrtune.errors import UserError


@dataclass
class SftArgs:
    # model
    model: str | None = model_arg("hub id (Qwen/Qwen2-VL-7B-Instruct), local folder, or preset (ocrtune-reader, tiny, "
                                  "small); default ocrtune-reader, the bundled formula reader, with its first-run settings")
    model_type: str | None = model_type_arg("registry name, e.g. qwen2-vl-7b-instruct (see `ocrtune list`)")
    use_hf: bool = use_hf_arg()
    model_revision: str | None = arg(None, "hub revision")
    dtype: str = dtype_arg("auto (bf16 on GPU, fp32 on CPU), bfloat16, float16 or float32")
    attn_impl: str | None = arg(None, "attention kernel: sdpa, eager, flash_attention_2, flex_attention")
    # tuner
    train_type: str = arg("lora", "lora, qlora (lora over a 4-bit base: --quant_bits 4) or full",
                          aliases=("--sft_type", "--tuner_type"), choices=("lora", "qlora", "full"))
    quant_method: str | None = arg(None, "quantize the frozen base for LoRA (QLoRA): bnb (bitsandbytes; the default "
                                   "where --quant_bits is given)", choices=("bnb",))
    quant_bits: int | None = quant_bits_arg("LoRA over a base quantized to 4 bits (QLoRA: NF4, double quantization, "
                                            "bf16 compute) or 8 by bitsandbytes; default: unquantized (4 with "
                                            "--train_type qlora)")
    quant_vit: bool = arg(False, "with --quant_bits: quantize the vision tower too (default: it stays unquantized)")
    lora_rank: int = arg(8, "LoRA rank", domain=ints(1, 65536))
    lora_alpha: int = arg(32, "LoRA alpha", domain=ints(1, 65536))
    lora_dropout: float = arg(0.05, "LoRA dropout", aliases=("--lora_dropout_p",), domain=SHARE)
    target_modules: list[str] = arg(None, "LoRA targets: all-linear (language model linears) or module names",
                                    aliases=("--lora_target_modules",))
    modules_to_save: list[str] = arg(None, "modules trained whole beside the LoRA adapters and saved with them, e.g. "
                                     "embed_tokens (tied lm_head follows) or lm_head")
    relora_steps: int = arg(0, "ReLoRA: every N steps fold the LoRA adapters into their base weights and restart them "
                            "from zero (a sum of rank-r updates; for training a model from scratch with LoRA); 0: off",
                            domain=ints(0, BIG))
    relora_warmup_steps: int | None = arg(None, "with --relora_steps: learning-rate warm-up after each restart "
                                          "(default: a tenth of --relora_steps)", domain=ints(0, BIG))
    freeze_vit: bool = arg(True, "keep the vision tower frozen")
    # data
    dataset: list[str] = arg(None, "registry name(s) (latex-ocr-print, ...), files or folders; name#N samples N "
                               "rows; default latex-ocr-sample")
    val_dataset: list[str] = arg(None, "validation data (default: the dataset's own validation split, else "
                                       "--dataset_test_ratio of --dataset)")
    dataset_test_ratio: float | None = arg(None, "share of --dataset held out for evaluation (default: the dataset's "
                                           "own validation split when it has one, else 0.01)",
                                           aliases=("--split_dataset_ratio",), domain=SHARE)
    check_dataset_strategy: str = arg("warning", "bad rows: none, discard, error or warning",
                                      choices=("none", "discard", "error", "warning"))
    max_length: int = arg(2048, "longest sample in tokens; longer samples are dropped", domain=ints(16, 2**20))
    max_pixels: int | None = max_pixels_arg("largest image size in pixels (resized down beyond)")
    min_pixels: int | None = arg(None, "smallest image size in pixels", env="MIN_PIXELS", domain=ints(28 * 28, 2**30))
    system: str | None = arg(None, "system prompt (default: the template's)")
    augment: bool = arg(False, "augment images for printed/scanned text (scale, rotation, blur, noise)")
    dataloader_num_workers: int = arg(0, "dataloader worker processes (the next epoch's start 2 x this many micro-batches "
                                          "before the epoch ends, so no step waits for fresh workers)",
                                 domain=ints(0, 256))
    # optimisation
    num_train_epochs: float = arg(1.0, "epochs", domain=reals(0, 1e6))
    max_steps: int = arg(-1, "stop after this many optimizer steps (overrides epochs); -1: off", env="MAX_STEPS",
                         domain=ints(1, BIG, special=(-1,), special_help="-1 (off)"))
    batch_size: int = arg(4, "samples per device per micro-batch", aliases=("--per_device_train_batch_size",),
                         domain=ints(1, 65536))
    eval_batch_size: int | None = arg(None, "evaluation batch size", aliases=("--per_device_eval_batch_size",),
                                     domain=ints(1, 65536))
    gradient_accumulation_steps: int = arg(1, "micro-batches per optimizer step", domain=ints(1, 65536))
    learning_rate: float | None = arg(None, "peak learning rate (default: 1e-4 LoRA, 1e-5 full; 1e-3 / 5e-4 on presets)",
                                    domain=positive(10))
    vit_lr: float | None = arg(None, "learning rate of the vision tower (ViT blocks, patch embedding) where it trains "
                               "(default: --learning_rate)", domain=positive(10))
    aligner_lr: float | None = arg(None, "learning rate of the vision-language merger (aligner) where it trains "
                                   "(default: --learning_rate)", domain=positive(10))
    weight_decay: float = arg(0.1, "AdamW weight decay", domain=reals(0, 10))
    adam_beta2: float = arg(0.95, "AdamW beta2", domain=SHARE)
    max_grad_norm: float = arg(1.0, "gradient clipping", domain=positive(1e6))
    lr_scheduler_type: str = arg("cosine", "cosine, linear or constant", choices=("cosine", "linear", "constant"))
    warmup_ratio: float = arg(0.05, "share of steps spent warming up", domain=SHARE)
    warmup_steps: int = arg(0, "warm-up steps (overrides warmup_ratio)", domain=ints(0, BIG))
    gradient_checkpointing: bool = arg(True, "recompute activations in backward to save memory")
    seed: int = arg(42, "random seed", domain=SEED)
    # speed
    speed: str = arg("default", "default: the exact numerics (bf16, nothing approximated; LoRA on a GPU plans its "
                     "recompute and lean MLP to fit the card, in one line at the start); max: every opt-in speed-up "
                     "that applies to this run and machine, as one line at the start says: --fp8_base and --lean_mlp_fp8 "
                     "(LoRA on a GPU of compute capability 8.9+; approximate), --lora_dropout 0, no recompute, packing at "
                     f"{10_240:,} tokens a step; a flag you give wins over it", choices=("default", "max"))
    packing: bool = arg(False, "pack samples into one row up to --packing_tokens (padding-free)")
    packing_tokens: int | None = arg(None, "token budget per packed row (default: batch_size x max sample length)",
                                      domain=ints(16, 2**24))
    use_liger: bool | None = arg(None, "Liger kernels (GPU): RMSNorm, SwiGLU, RoPE, fused linear cross-entropy "
                                 "(default: on where a CUDA device and liger-kernel are present, for models of hidden size 1024 or more: "
                                 "at the small preset's 512 they were slower)", aliases=("--use_liger_kernel",))
    fused_lora: bool = arg(True, "add each LoRA update into its base layer's output with one fused multiply-add "
                           "(same math as PEFT, fewer kernels)")
    lean_mlp: bool = arg(False, "LoRA on a SwiGLU MLP: keep gate/up for backward and recompute their product "
                         "instead of storing it (less activation memory; same math). On a GPU LoRA run that gives "
                         "neither this nor --recompute_layers/--gradient_checkpointing, the memory plan turns it on")
    lean_mlp_fp8: bool = arg(False, "--lean_mlp, with gate/up kept for backward in float8 (e4m3, a scale per token): "
                             "half their memory; the backward uses those rounded copies (approximate gradients)")
    fp8_base: bool = arg(False, "LoRA: keep the language model's frozen base linears in float8 (e4m3, a scale per "
                         "output channel) and multiply on float8 tensor cores (GPUs of compute capability 8.9+): "
                         "half their memory, faster matmuls; inputs rounded to float8 (approximate)")
    recompute_layers: int | None = arg(None, "with --gradient_checkpointing: how many language-model layers recompute; "
                                       "the rest keep their activations (faster, more memory). Default: LoRA on a GPU, "
                                       "the fewest whose longest step fits the card (the memory plan); elsewhere all",
                                       domain=ints(0, 100_000))
    torch_compile: bool = arg(False, "torch.compile the language model's decoder layers and the vision tower's blocks "
                              "(regional, dynamic shapes): fewer, fused kernels (the small preset's step on an H200: 0.099 "
                              "s against 0.173); the first steps compile (about a minute); evaluation stays eager. For "
                              "GPUs: on a CPU the vision tower compiles again for every new image count")
    loss_chunk_size: int = arg(2048, "response tokens per chunk of the chunked cross-entropy",
                                 domain=ints(1, 2**24))
    # evaluation, saving, logging
    eval_steps: int = arg(50, "evaluate every N steps", domain=ints(1, BIG))
    save_steps: int | None = arg(None, "save a checkpoint every N steps (default: eval_steps)",
                                     domain=ints(1, BIG))
    save_total_limit: int | None = arg(2, "checkpoints kept (the best and the newest are always kept); 0: all",
                                          domain=ints(1, BIG, special=(0,), special_help="0 (keep all)"))
    logging_steps: int = arg(5, "log every N steps", domain=ints(1, BIG))
    predict_with_generate: bool = arg(False, "also generate on the validation set and log BLEU/edit distance/exact match")
    generate_metrics: str = arg("bleu,edit_distance,exact_match", "with --predict_with_generate: comma-separated: bleu, "
                                "edit_distance, exact_match, render, cdm (CDM and ExpRate@CDM; needs pdflatex)")
    tex_root: str | None = tex_root_arg("cdm")
    max_new_tokens: int = max_new_tokens_arg(256, "generation length for --predict_with_generate")
    output_dir: str = arg("output", "runs go to <output_dir>/<model>/v<N>-<time>/")
    add_output_dir_suffix: bool = arg(True, "add <model>/v<N>-<time> to output_dir")
    resume_from_checkpoint: str | None = arg(None, "checkpoint folder, or 'last' for the newest of the newest run")
    allow_data_change: bool = arg(False, "resume even though a dataset file changed on disk since the run was saved "
                                         "(its order and content are then not the run's)")
    max_time: float | None = arg(None, "seconds this process may train, counted from the run's set-up (model "
                                 "loading included): past them it stops after the step in progress and saves it; "
                                 "--resume_from_checkpoint last continues the same schedule", domain=reals(0, 1e9))
    lr_decay_seconds: float | None = arg(None, "with --max_time: the learning rate falls to 0 along a cosine over the last "
                                         "N seconds before --max_time (from the first step if fewer are left then), on top "
                                         "of --lr_scheduler_type, and the run ends there as at its last step (evaluated, "
                                         "saved): it ends annealed however fast its steps turn out (this process only)",
                                         domain=positive(1e9))
    report_to: list[str] = arg(None, "tensorboard (default) or none", choices=("tensorboard", "none"))
    # distributed
    deepspeed: str | None = arg(None, "DeepSpeed config: zero2, zero3 or a json path")
    fsdp: str | None = arg(None, "FSDP: 'full_shard auto_wrap' or an accelerate FSDP config")
    device_map: str | None = arg(None, "one process over several GPUs splits the model's layers: auto, balanced, "
                                       "sequential or none (default: auto when >1 GPU is visible outside torchrun)",
                                 choices=("auto", "balanced", "sequential", "none"))


def validate(args: SftArgs) -> None:
    checks = [
        (args.batch_size >= 1, "--batch_size must be at least 1"),
        (args.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be at least 1"),
        (args.learning_rate is None or args.learning_rate > 0, "--learning_rate must be positive"),
        (all(lr is None or lr > 0 for lr in (args.vit_lr, args.aligner_lr)), "--vit_lr and --aligner_lr must be positive"),
        (args.lora_rank >= 1, "--lora_rank must be at least 1"),
        (0 <= args.lora_dropout < 1, "--lora_dropout must be in [0, 1)"),
        (args.dataset_test_ratio is None or 0 <= args.dataset_test_ratio < 1, "--dataset_test_ratio must be in [0, 1)"),
        (args.max_length >= 16, "--max_length must be at least 16"),
        (args.num_train_epochs > 0 or args.max_steps > 0, "--num_train_epochs or --max_steps must be positive"),
        (args.eval_steps >= 1 and args.logging_steps >= 1, "--eval_steps and --logging_steps must be at least 1"),
        (args.save_steps is None or args.save_steps >= 1, "--save_steps must be at least 1"),
        (0 <= args.warmup_ratio < 1, "--warmup_ratio must be in [0, 1)"),
        (args.max_pixels is None or args.max_pixels >= 28 * 28 * 4, "--max_pixels must be at least 3136 (4 patches)"),
        (args.min_pixels is None or args.max_pixels is None or args.min_pixels <= args.max_pixels,
         "--min_pixels must not exceed --max_pixels"),
        (args.recompute_layers is None or args.recompute_layers >= 0, "--recompute_layers must be 0 or more"),
        (args.max_grad_norm > 0, "--max_grad_norm must be positive"),
        (args.max_time is None or args.max_time >= 0, "--max_time must be 0 or more seconds"),
        (args.lr_decay_seconds is None or (args.lr_decay_seconds > 0 and args.max_time is not None),
         "--lr_decay_seconds must be positive and goes with --max_time (the decay ends when --max_time does)"),
        (not (args.deepspeed and args.fsdp), "--deepspeed and --fsdp can't be used together"),
        (not args.modules_to_save or args.train_type in ("lora", "qlora"),
         "--modules_to_save goes with --train_type lora (full fine-tuning trains every module already)"),
        (args.relora_steps >= 0 and (args.relora_warmup_steps or 0) >= 0, "--relora_steps and --relora_warmup_steps must be 0 or more"),
        (not args.relora_steps or args.train_type in ("lora", "qlora"), "--relora_steps folds LoRA adapters: it needs --train_type lora"),
        (not args.relora_steps or not (args.fsdp or args.deepspeed),
         "--relora_steps runs on one GPU or with DDP, not with sharded weights (--fsdp, --deepspeed)"),
        (not (args.torch_compile and args.deepspeed),
         "--torch_compile runs on one GPU, with DDP or with --fsdp; under --deepspeed (its parameter hooks) it is untested"),
        (not args.relora_steps or not args.fp8_base,
         "--relora_steps folds the adapters into the base weights, which --fp8_base keeps in float8: use one of them"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message, "see `ocrtune sft --help`")
    validate_generate_metrics(args.generate_metrics)
    validate_quant(args)
    validate_fp8_base(args)


GENERATE_METRICS = ("bleu", "edit_distance", "exact_match", "render", "cdm")


def validate_generate_metrics(names: str) -> None:
    bad = [n for n in (x.strip().lower() for x in names.split(",")) if n and n not in GENERATE_METRICS]
    if bad or not names.strip(","):
        raise UserError(f"--generate_metrics {names}: {'unknown metric ' + bad[0] if bad else 'no metric named'}",
                        f"use a comma-separated list of {', '.join(GENERATE_METRICS)}")


def validate_fp8_base(args: SftArgs) -> None:
    """--fp8_base against the flags it can't go with (the device it needs is checked when the run has one)."""
    if not args.fp8_base:
        return
    if args.train_type not in ("lora", "qlora"):  # (qlora: refused by validate_quant, with --quant_bits)
        raise UserError("--fp8_base keeps the frozen base weights of a LoRA model in float8; full fine-tuning "
                        "trains those weights", "drop --fp8_base, or pass --train_type lora")
    if args.fsdp or args.deepspeed:
        raise UserError("--fp8_base runs on one GPU or with DDP, not with sharded weights (--fsdp, --deepspeed)",
                        "drop --fsdp / --deepspeed, or drop --fp8_base")


def quant_bits_of(args: SftArgs) -> int | None:
    """The bits the base is quantized to: --quant_bits, else 4 for --train_type qlora, else None (unquantized)."""
    return args.quant_bits if args.quant_bits is not None else (4 if args.train_type == "qlora" else None)


def normalized(args: SftArgs) -> SftArgs:
    """`args` with --train_type qlora spelled out as SWIFT/LLaMA-Factory mean it (lora, --quant_bits 4) and
    --quant_method bnb filled in where bits are given: the rest of the run (and args.json, and a resume of it) sees
    lora + bits. A copy; the flags given stay the ones given (plus those the shorthand stood for)."""
    import dataclasses

    from ocrtune.args import given_flags
    bits = quant_bits_of(args)
    if args.train_type != "qlora" and (bits is None or args.quant_method):
        return args
    given = given_flags(args)
    out = dataclasses.replace(args, train_type="lora" if args.train_type == "qlora" else args.train_type,
                              quant_bits=bits, quant_method=args.quant_method or "bnb")
    out._given_flags = frozenset(given | ({"quant_bits", "quant_method"} if "train_type" in given or
                                          "quant_bits" in given else set()))
    return out


def validate_quant(args: SftArgs) -> None:
    """--quant_method / --quant_bits / --train_type qlora against the flags they can't go with."""
    bits = quant_bits_of(args)
    if args.quant_bits is not None and args.quant_bits not in (4, 8):
        raise UserError(f"--quant_bits {args.quant_bits}: bitsandbytes quantizes to 4 or 8 bits",
                        "pass --quant_bits 4 (QLoRA, NF4) or 8, or drop it to train over the bf16 base")
    if args.quant_method and bits is None:
        raise UserError(f"--quant_method {args.quant_method} needs --quant_bits 4 or 8", "add --quant_bits 4 (QLoRA)")
    if args.quant_vit and bits is None:
        raise UserError("--quant_vit quantizes the vision tower of a quantized base", "add --quant_bits 4, or drop --quant_vit")
    if bits is None:
        return
    refusals = [
        (args.train_type == "full", f"--quant_bits {bits} freezes the base in {bits} bits, and --train_type full trains "
         "every weight", "use --train_type lora (or qlora) over the quantized base, or drop --quant_bits for full fine-tuning"),
        (args.fp8_base, f"--fp8_base and --quant_bits {bits} both replace the frozen base weights",
         "use one: --quant_bits 4 (least memory) or --fp8_base (float8 matmuls, faster)"),
        (args.lean_mlp or args.lean_mlp_fp8, f"--lean_mlp recomputes the MLP's down projection from its bf16 weight, "
         f"which --quant_bits {bits} keeps in {bits} bits", "drop --lean_mlp/--lean_mlp_fp8 (or drop --quant_bits)"),
        (bool(args.relora_steps), f"--relora_steps folds the adapters into the base weights, which --quant_bits {bits} "
         "keeps quantized", "drop --relora_steps, or train over the bf16 base"),
        (bool(args.fsdp or args.deepspeed), f"a base quantized by --quant_bits {bits} runs on one GPU or with DDP "
         "(NPROC_PER_NODE=<GPUs>), not sharded by --fsdp/--deepspeed", "drop --fsdp/--deepspeed (a 4-bit 7B fits one "
         "GPU), or drop --quant_bits"),
    ]
    for bad, problem, fix in refusals:
        if bad:
            raise UserError(problem, fix)


def check_output_dir(args: SftArgs) -> None:
    """--output_dir must not be, or lie inside, one of the run's local datasets or its --model folder: the run
    would write its folders and logs among the files it reads."""
    from ocrtune.data.fingerprint import dataset_paths
    from ocrtune.fileio import check_not_input
    # the message names the flag and the path (once: a plain path is the value as given)
    inputs = [("--dataset" if str(p) == v else f"--dataset {v}", p)
              for v, p in dataset_paths((args.dataset or []) + (args.val_dataset or []))]
    if args.model and Path(args.model).expanduser().exists():
        inputs.append(("--model", Path(args.model).expanduser()))
    check_not_input("--output_dir", args.output_dir, inputs)
