"""Find a model (registry name, hub id, local folder or preset) and load it with its processor."""
from __future__ import annotations

import math
import os
from pathlib import Path

from ocrtune.errors import UserError, hub_failure, import_modelscope
from ocrtune.fileio import read_json
from ocrtune.models.presets import PRESETS, ensure_preset
from ocrtune.models.registry import DEFAULT_MODEL, TEMPLATE_BY_ARCH, ModelSpec, find_model, get_model_spec


def resolve_model(model: str | None, model_type: str | None = None, use_hf: bool = True,
                  revision: str | None = None) -> tuple[Path, ModelSpec | None]:
    """--model / --model_type -> (local folder, registry entry or None). Downloads hub models once."""
    if not model and not model_type:
        model = DEFAULT_MODEL
    spec = get_model_spec(model_type) if model_type else None
    if model:
        local = Path(model).expanduser()
        if local.is_dir():
            if not (local / "config.json").exists():
                raise UserError(f"model folder {local} has no config.json",
                                "point --model at a folder saved with save_pretrained (or a merged checkpoint)")
            model_config(local)  # a damaged config.json is named before anything else reads it
            return local, spec
        if model.startswith((".", "/", "~")) or (os.sep in model and model.count("/") != 1):
            raise UserError(f"model folder not found: {model}", "check the path, or pass a hub id or a --model_type name")
        found = find_model(model)
        if found is None and "/" not in model:
            get_model_spec(model)  # raises: unknown short name
        spec = spec or found
        hub_id = model if "/" in model else None
    else:
        hub_id = None
    if spec is not None and spec.preset == "ocrtune-reader":
        from ocrtune.models.reader import restore_reader
        return restore_reader(), spec
    if spec is not None and spec.preset:
        return ensure_preset(spec.preset), spec
    if spec is not None and hub_id is None:
        hub_id = spec.hf_id if use_hf else (spec.ms_id or spec.hf_id)
    return download(hub_id, use_hf, revision), spec


def download(hub_id: str, use_hf: bool, revision: str | None = None) -> Path:
    """Snapshot a hub model into the local cache (Hugging Face, or ModelScope with use_hf=False)."""
    try:
        if use_hf:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(hub_id, revision=revision))
        return Path(import_modelscope().snapshot_download(hub_id, revision=revision))
    except UserError:
        raise
    except Exception as e:
        raise hub_failure(f"download model '{hub_id}'", use_hf, e,
                          "check the network and the id, or pass a local model folder to --model", limit=160) from None


def model_config(path: Path) -> dict:
    """The model folder's config.json ({} where it has none): the one reader of it before transformers loads the
    model, so a damaged file is a one-line error wherever it is first read."""
    config_path = Path(path) / "config.json"
    if not config_path.exists():
        return {}
    return read_json(config_path, fix="restore the model folder (copy or download it again)")


def model_arch(path: Path) -> str:
    return model_config(path).get("model_type", "")


def hidden_size(path: Path) -> int:
    """The language model's hidden size from the folder's config.json (a large number where it has none: no opinion)."""
    config = model_config(path)
    return int((config.get("text_config") or {}).get("hidden_size") or config.get("hidden_size") or 1 << 30)


def template_name(path: Path, spec: ModelSpec | None = None) -> str:
    arch = spec.arch if spec else model_arch(path)
    if arch not in TEMPLATE_BY_ARCH:
        raise UserError(f"model at {path} is a '{arch}' model, which ocrtune has no template for",
                        f"use a {', '.join(TEMPLATE_BY_ARCH)} model")
    return TEMPLATE_BY_ARCH[arch]


def load_processor(path: Path):
    from transformers import AutoProcessor
    try:
        return AutoProcessor.from_pretrained(path)
    except Exception as e:
        raise UserError(f"could not load the processor in {path}: {type(e).__name__}: {str(e).splitlines()[0][:160]}",
                        "the folder needs tokenizer and preprocessor files (as saved by processor.save_pretrained)") from None


def load_model(path: Path, dtype=None, attn_impl: str | None = None, device=None, device_map: str | None = None,
               quant_bits: int | None = None, quant_vit: bool = False):
    """Load weights with transformers (safetensors only); device_map ('auto', 'balanced', ...) splits
    the layers over the visible GPUs (accelerate's hooks move activations between them). `quant_bits` 4 or 8:
    the linears quantized by bitsandbytes as they load, on `device` (`models/quant.py`; the vision tower kept
    unquantized unless `quant_vit`)."""
    import torch
    from transformers import AutoModelForImageTextToText
    kwargs = {"dtype": dtype or torch.float32, "use_safetensors": True}
    if attn_impl:
        kwargs["attn_implementation"] = attn_impl
    if quant_bits:
        from ocrtune.models.quant import bnb_config, check_quant_backend
        device = device if device is not None or device_map is not None else torch.device("cpu")
        check_quant_backend(quant_bits, torch.device(device).type if device is not None else "cuda")
        kwargs["quantization_config"] = bnb_config(quant_bits, quant_vit)  # quantized where it is placed
    if device is not None:
        kwargs["device_map"] = {"": device}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load model weights from {path}: {str(e).splitlines()[0][:200]}",
                        "the folder needs config.json and *.safetensors weights") from None
    from ocrtune.models.patches import PatchOptions, prepare
    prepare(model, PatchOptions())  # the patch-embed GEMM
    return model


def is_random_init(path: Path) -> bool:
    """A shape-only folder (presets.build_preset(meta=True)): no weights, built randomly when training."""
    from ocrtune.models.presets import RANDOM_INIT_MARK
    return (Path(path) / RANDOM_INIT_MARK).exists()


def build_on_meta(path: Path, dtype=None, attn_impl: str | None = None):
    """The model of a shape-only folder with its parameters on the meta device (no memory) and its
    buffers (rotary frequencies) real: FSDP2 shards it first, then each rank materializes its shard
    (distributed.materialize). A 72B model never exists whole in host memory."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText
    config = AutoConfig.from_pretrained(path)
    kwargs = {"attn_implementation": attn_impl} if attn_impl else {}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype or torch.float32, **kwargs)
    model.name_or_path = str(path)
    from ocrtune.models.patches import PatchOptions, prepare
    prepare(model, PatchOptions())  # the patch-embed GEMM
    return model


def lm_linear_names(model) -> list[str]:
    """Leaf names of the language model's linear layers (the `all-linear` LoRA targets)."""
    import torch.nn as nn
    names = set()
    for name, mod in model.named_modules():
        if ".language_model." in f".{name}." and isinstance(mod, nn.Linear) and not name.endswith("lm_head"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def lora_target_regex(model, target_modules: list[str]) -> str | list[str]:
    """`all-linear` -> a regex over the language model's linears (the ViT and lm_head stay untouched)."""
    if target_modules in (["all-linear"], ["ALL"], ["all"]):
        return r".*language_model.*\.(" + "|".join(lm_linear_names(model)) + r")"
    return target_modules


def lora_targets(model, targets: str | list[str]) -> dict[str, object]:
    """The modules PEFT's LoRA wraps for `targets`: a regex matching the whole module name, or names that match
    a module name or its last parts (PEFT's rule)."""
    import re
    if isinstance(targets, str):
        return {n: m for n, m in model.named_modules() if n and re.fullmatch(targets, n)}
    return {n: m for n, m in model.named_modules()
            if n and any(n == t or n.endswith("." + t) for t in targets)}


def check_lora_targets(model, targets: str | list[str], rank: int) -> None:
    """--target_modules must name linear (or embedding/conv) layers of the model, and --lora_rank must not exceed
    the smallest in/out size among them (a larger rank only adds memory: PEFT would allocate it, then fail)."""
    import torch.nn as nn
    found = lora_targets(model, targets)
    given = (targets if isinstance(targets, str) else " ".join(targets)).strip() or "''"
    if not found:
        some = lm_linear_names(model) or sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                                 if isinstance(m, nn.Linear)})
        raise UserError(f"--target_modules {given} matches no module of the model",
                        f"name linear layers, e.g. {', '.join(some[:8]) or 'q_proj, v_proj'}, or use all-linear")
    sizes = {}
    for name, m in found.items():
        if isinstance(m, nn.Linear):
            sizes[name] = min(m.in_features, m.out_features)
        elif isinstance(m, nn.Embedding):
            sizes[name] = min(m.num_embeddings, m.embedding_dim)
        elif isinstance(m, nn.modules.conv._ConvNd):  # a conv's LoRA A sees each flattened input patch
            sizes[name] = min(m.in_channels // m.groups * math.prod(m.kernel_size), m.out_channels)
        else:
            raise UserError(f"--target_modules {given} matches {name}, a {type(m).__name__}, which LoRA can't adapt",
                            "name linear layers (e.g. q_proj, v_proj), or use all-linear")
    name, smallest = min(sizes.items(), key=lambda kv: kv[1])
    if rank > smallest:
        raise UserError(f"--lora_rank {rank} exceeds the size of the target module {name} ({smallest})",
                        f"use --lora_rank {smallest} or less (or target larger modules with --target_modules)")


def check_new_tokens(model_dir: Path, max_new_tokens: int) -> None:
    """--max_new_tokens within the model's positions (config.json): beyond them the answer can't be generated,
    and the attention masks and caches sized for them only waste memory."""
    config = model_config(model_dir)
    limit = (config.get("text_config") or {}).get("max_position_embeddings") or config.get("max_position_embeddings")
    if isinstance(limit, int) and max_new_tokens > limit:
        raise UserError(f"--max_new_tokens {max_new_tokens} exceeds the model's {limit} positions ({model_dir})",
                        f"use --max_new_tokens {limit} or less")


__all__ = ["resolve_model", "check_lora_targets", "check_new_tokens", "download", "load_processor", "load_model", "template_name", "lora_target_regex", "PRESETS"]
