"""Model registry: short names (SWIFT's --model_type), hub ids, architecture and chat template."""
from __future__ import annotations

from dataclasses import dataclass

from ocrtune.errors import UserError


@dataclass(frozen=True)
class ModelSpec:
    name: str  # SWIFT-style model_type, e.g. qwen2-vl-7b-instruct
    hf_id: str | None  # Hugging Face hub id
    ms_id: str | None  # ModelScope hub id
    arch: str  # transformers model_type: qwen2_vl | qwen2_5_vl | qwen3_vl
    template: str  # chat template family, see ocrtune.models.template
    preset: str | None = None  # locally built model (tiny, small; ocrtune-reader: restored) instead of a hub download


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
# the trained formula reader shipped in the package (models/reader.py), restored into the cache on first use
register_model(ModelSpec("ocrtune-reader", None, None, "qwen2_vl", "qwen2_vl", preset="ocrtune-reader"))

# The model `ocrtune sft` trains when neither --model nor --model_type is given, and the one infer/eval/serve load
# when neither --ckpt_dir nor --model is given (None: they ask for one). DEFAULT_INFER_MODEL becomes
# "ocrtune-reader" once its weights ship in the package; DEFAULT_MODEL only if sft should fine-tune the reader by
# default (the tests that run sft without --model would then train its 32M parameters instead of tiny's 0.7M).
DEFAULT_MODEL = "tiny"
DEFAULT_INFER_MODEL: str | None = None

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
