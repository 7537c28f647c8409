"""Model registry: short names (SWIFT's --model_type), hub ids, architecture and chat template."""
from __future__ import annotations

from dataclasses import dataclass, field

from ocrtune.errors import UserError


@dataclass(frozen=True)
class ModelSpec:
    name: str  # SWIFT-style model_type, e.g. qwen2-vl-7b-instruct
    hf_id: str | None  # Hugging Face hub id
    ms_id: str | None  # ModelScope hub id
    arch: str  # transformers model_type: qwen2_vl | qwen2_5_vl | qwen3_vl
    template: str  # chat template family, see ocrtune.models.template
    preset: str | None = None  # locally built model (tiny, small; ocrtune-reader: restored) instead of a hub download
    # `ocrtune sft` settings for this model where no flag sets them (a flag given always wins)
    sft_defaults: dict = field(default_factory=dict)


MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    MODELS[spec.name] = spec
    return spec


def _qwen(family: str, arch: str, template: str, sizes: list[str], org_hf: str = "Qwen", suffix: str = "Instruct"):
    for size in sizes:
        hub = f"{family}-{size.upper()}-{suffix}"
        register_model(ModelSpec(f"{family.lower()}-{size}-{suffix.lower()}", f"{org_hf}/{hub}", f"Qwen/{hub}", arch, template))


_qwen("Qwen2-VL", "qwen2_vl", "qwen2_vl", ["2b", "7b", "72b"])
_qwen("Qwen2.5-VL", "qwen2_5_vl", "qwen2_5_vl", ["3b", "7b", "32b", "72b"])
_qwen("Qwen3-VL", "qwen3_vl", "qwen3_vl", ["2b", "4b", "8b", "32b"])
register_model(ModelSpec("tiny", None, None, "qwen2_vl", "qwen2_vl", preset="tiny"))
register_model(ModelSpec("small", None, None, "qwen2_vl", "qwen2_vl", preset="small"))
# The trained formula reader shipped in the package (models/reader.py), restored into the cache on first use. Its sft
# defaults are a first run's: LoRA on the bundled sample's 96 handwriting rows (which it cannot read yet), evaluated
# with generation on the 16 validation ones: 3.6 minutes on 2 CPU cores lift their BLEU-4 from 0.013 to 0.656
# (bench/results/first_run_cpu.json). Images of at most 50,000 pixels (the reader trained on 30,000-120,000) make
# a step 2x cheaper, which buys the 8 epochs it needs: 4 epochs at full size learned the train formulas, not to read.
READER_SFT_DEFAULTS = {"dataset": ["latex-ocr-sample-handwrite"], "lora_rank": 32, "lora_alpha": 64,
                       "target_modules": ["all-linear"], "batch_size": 8, "num_train_epochs": 8.0,
                       "max_pixels": 50_000, "predict_with_generate": True}
register_model(ModelSpec("ocrtune-reader", None, None, "qwen2_vl", "qwen2_vl", preset="ocrtune-reader",
                         sft_defaults=READER_SFT_DEFAULTS))

# What sft/rlhf train when neither --model nor --model_type is given, and infer/eval/serve load when neither
# --ckpt_dir nor --model is given: the reader (the random-weight `tiny` is the test suite's, by --model tiny).
DEFAULT_MODEL = "ocrtune-reader"

TEMPLATE_BY_ARCH = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl"}


def find_model(name_or_id: str) -> ModelSpec | None:
    """Look a model up by short name or by hub id (case-insensitive)."""
    key = name_or_id.strip().lower()
    for spec in MODELS.values():
        if key in (spec.name, (spec.hf_id or "").lower(), (spec.ms_id or "").lower()):
            return spec
    return None


def get_model_spec(name: str) -> ModelSpec:
    spec = find_model(name)
    if spec is None:
        known = ", ".join(sorted(MODELS))
        raise UserError(f"unknown model_type '{name}'", f"use one of: {known}, a hub id, or a local model folder")
    return spec
