"""Multi-process training through accelerate: DDP, FSDP2 (torch `fully_shard`, accelerate's plugin
with fsdp_version=2, accelerate >= 1.6) and DeepSpeed ZeRO-2/3 (configs shipped in train/configs).
Launch with torchrun (or NPROC_PER_NODE=N ocrtune sft ...); every rank runs the same script.

Under sharding, gathering weights or optimizer state is a collective: every rank calls the
helpers here, rank 0 writes. Every forward pass is a collective too (FSDP2 all-gathers each
layer's weights), so evaluation and generation give every rank the same number of passes."""
from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

import torch

from ocrtune.errors import UserError
from ocrtune.models.patches.versions import version_problem, warn_once

CONFIGS = Path(__file__).parent / "configs"
DS_FOLDER = "deepspeed"  # per-rank ZeRO optimizer state inside a checkpoint folder
WRAP = ["Qwen2VLDecoderLayer", "Qwen2_5_VLDecoderLayer", "Qwen3VLTextDecoderLayer",
        "Qwen2VLVisionBlock", "Qwen2_5_VLVisionBlock", "Qwen3VLVisionBlock"]


def deepspeed_config(value: str, args) -> dict:
    path = CONFIGS / f"{value}.json" if value in ("zero2", "zero3") else Path(value)
    if not path.exists():
        raise UserError(f"DeepSpeed config '{value}' not found", "use zero2, zero3 or a path to a DeepSpeed json config")
    from ocrtune.fileio import read_json
    config = read_json(path, fix="pass a valid DeepSpeed json config")  # a regular file, bounded
    # fill SWIFT/HF-style "auto" values from the flags (we drive the loop ourselves)
    config["train_micro_batch_size_per_gpu"] = args.batch_size
    # The loop accumulates a group itself and scales the loss by the group's token count; the
    # engine steps only at the group's end because train_step sets accelerate's sync_gradients
    # (DeepSpeed's gradient-accumulation boundary) on the last micro-batch alone. gas=1 here keeps
    # DeepSpeed from dividing the loss a second time.
    config["gradient_accumulation_steps"] = 1
    config["gradient_clipping"] = args.max_grad_norm
    if config.get("bf16", {}).get("enabled") == "auto":
        config["bf16"]["enabled"] = args.dtype in ("auto", "bfloat16", "bf16")
    return config


def plugin_kwargs(args) -> dict:
    """Accelerator(...) keyword arguments for --deepspeed / --fsdp."""
    if args.deepspeed:
        try:
            import deepspeed  # noqa: F401  (present, before accelerate asks for it mid-setup)
        except ImportError:
            raise UserError("--deepspeed needs the deepspeed package", "pip install deepspeed (on a CUDA machine)") from None
        from accelerate.utils import DeepSpeedPlugin
        return {"deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=deepspeed_config(args.deepspeed, args))}
    from accelerate.utils import FullyShardedDataParallelPlugin
    # FSDP2: per-parameter sharding (DTensor), frozen and trained parameters mixed in one unit (LoRA)
    return {"fsdp_plugin": FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward="shard_grad_op" not in args.fsdp.lower(),
        auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=WRAP,
        state_dict_type="FULL_STATE_DICT")}


def fsdp_on_cpu(acc, kwargs: dict) -> None:
    """The one change ocrtune makes to accelerate (patch point `accelerate_fsdp_cpu` in
    models/patches/versions.py). accelerate applies an FSDP plugin only on accelerators and silently runs
    plain multi-process CPU training otherwise; torch's fully_shard itself runs on CPU with gloo, so turn it
    on (this is how the CPU tests exercise the FSDP2 path). accelerate has no public switch for it: its
    distributed type lives in the state shared by every PartialState/AcceleratorState, which is rewritten
    here, and only on the accelerate versions this was checked against (elsewhere a warning, and the run
    stays plain multi-process CPU training)."""
    from accelerate.utils import DistributedType
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and acc.device.type == "cpu" and acc.num_processes > 1 \
            and acc.distributed_type == DistributedType.MULTI_CPU:
        reason = version_problem("accelerate", "--fsdp on CPU runs as plain multi-process training")
        if reason is not None:
            warn_once(reason)
            return
        from accelerate.state import PartialState
        acc.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin


def wrap_classes_of(acc, model) -> None:
    """FSDP2 shards per decoder layer / vision block: name the classes this model has (accelerate
    rejects names it cannot find, and the loss wrapper it is given has no _no_split_modules)."""
    plugin = getattr(acc.state, "fsdp_plugin", None) if engine_name(acc).startswith("fsdp") else None
    if plugin is not None:
        present = {type(m).__name__ for m in model.modules()}
        plugin.transformer_cls_names_to_wrap = [n for n in WRAP if n in present]


def engine_name(acc) -> str:
    from accelerate.utils import DistributedType
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return f"zero{acc.state.deepspeed_plugin.zero_stage}"
    if acc.distributed_type == DistributedType.FSDP:
        return "fsdp2" if acc.is_fsdp2 else "fsdp"
    return "ddp" if acc.num_processes > 1 else "single"


def is_sharded(acc) -> bool:
    return engine_name(acc) in ("fsdp2", "fsdp", "zero3", "zero2")


# ---------------------------------------------------------------- saving and resuming

def gather_state(acc, loss_module, optimizer, train_type: str) -> tuple[dict | None, dict | None]:
    """(model state dict, optimizer state dict) for rank 0 to write, keyed like the unwrapped model
    (no `model.` prefix of the loss wrapper). Collective under sharding: every rank must call it.
    LoRA gathers only the trained (adapter) weights, so a 72B LoRA save never gathers the base."""
    eng = engine_name(acc)
    if eng == "fsdp2":
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=train_type == "lora")
        model_sd = _strip(get_model_state_dict(loss_module, options=opts))
        optim_sd = get_optimizer_state_dict(loss_module, _inner(optimizer), options=opts)
        return (model_sd, optim_sd) if acc.is_main_process else (None, None)
    if eng.startswith("zero"):
        sd = acc.get_state_dict(loss_module)  # ZeRO-3: gathers the 16-bit weights on every rank's call
        if train_type == "lora" and sd is not None:
            # every name of a shared parameter (a tied modules_to_save copy is embed_tokens' and lm_head's)
            trained = {n for n, p in acc.unwrap_model(loss_module).named_parameters(remove_duplicate=False)
                       if p.requires_grad}
            sd = {k: v for k, v in sd.items() if k in trained}
        return (_strip(sd) if acc.is_main_process else None), {}
    return None, None  # DDP / one process: rank 0 reads its own full copy


def _strip(sd: dict) -> dict:
    """Drop the loss wrapper's `model.` prefix; own each tensor's storage (gathered tensors can be
    views into collective buffers that safetensors cannot serialize)."""
    out = {}
    for k in list(sd):
        out[k.removeprefix("model.")] = sd.pop(k).detach().clone()
    return out


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer


class WithState:
    """Stands in for the model / optimizer in checkpoint.save_checkpoint, handing it the gathered
    state dicts: save_pretrained(state_dict=...) writes a standard PEFT adapter or model folder."""

    def __init__(self, obj, state: dict | None):
        self._obj, self._state = obj, state

    def save_pretrained(self, path, **kwargs):
        return self._obj.save_pretrained(path, state_dict=self._state, **kwargs)

    def state_dict(self):
        return self._state

    def __getattr__(self, name):
        return getattr(self._obj, name)


def save_engine_state(acc, loss_module, ckpt: Path) -> None:
    """DeepSpeed: each rank writes its ZeRO optimizer partition (collective), after rank 0 wrote the folder."""
    if engine_name(acc).startswith("zero"):
        loss_module.save_checkpoint(str(ckpt / DS_FOLDER), tag="state", save_latest=False, exclude_frozen_parameters=True)


def load_optimizer_state(acc, loss_module, optimizer, ckpt: Path, full: dict | None = None) -> None:
    """Resume sharded optimizer state after accelerate.prepare (the parameters are sharded by then);
    `full`: the checkpoint's optimizer.pt as rank 0 read (and checked) it; other ranks pass {} and get
    their shards by broadcast, so one full copy is in host memory, not one per rank."""
    eng = engine_name(acc)
    if eng == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        if full is None:
            full = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu") if acc.is_main_process else {}
        set_optimizer_state_dict(loss_module, _inner(optimizer), full,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    elif eng.startswith("zero"):
        if not (ckpt / DS_FOLDER).is_dir():
            raise UserError(f"{ckpt} has no DeepSpeed optimizer state ({DS_FOLDER}/)",
                            "resume a DeepSpeed run from a checkpoint it wrote, or drop --deepspeed")
        loss_module.load_checkpoint(str(ckpt / DS_FOLDER), tag="state", load_module_strict=False,
                                    load_optimizer_states=True, load_lr_scheduler_states=False)


# ---------------------------------------------------------------- one process, several GPUs

def device_map_choice(value: str | None, gpus: int, under_torchrun: bool, engine: bool) -> str | None:
    """The seed's form (`CUDA_VISIBLE_DEVICES=0,1 swift sft ...` without NPROC_PER_NODE): one process
    that sees several GPUs splits the model's layers over them (transformers/accelerate device_map).
    Returns the device_map to load with, or None (one device per process)."""
    if value == "none":
        return None
    if value and (under_torchrun or engine):
        raise UserError(f"--device_map {value} splits one process's model over GPUs, which torchrun/--fsdp/--deepspeed "
                        "already place", "drop --device_map, or run one process without NPROC_PER_NODE/--fsdp/--deepspeed")
    if under_torchrun or engine or gpus < 2:
        return None
    return value or "auto"


# ---------------------------------------------------------------- meta-device models

def real_buffers(model) -> dict:
    """Copies of a meta-built model's buffers (rotary frequencies), which to_empty() would wipe."""
    return {n: b.detach().clone() for n, b in model.named_buffers()}


@torch.no_grad()
def materialize(module, device, buffers: dict, std: float, seed: int) -> None:
    """Allocate a meta-built (possibly FSDP2-sharded) module on `device` and initialize it: each rank
    only its own shards. Random weights N(0, std) (the preset's initializer_range), norms 1, biases
    and LoRA B 0 (so LoRA starts as the identity update); buffers restored from `buffers`."""
    module.to_empty(device=device)
    for name, b in module.named_buffers():
        b.copy_(_by_suffix(buffers, name))
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    gen = torch.Generator(device=device).manual_seed(seed + rank)
    for name, p in module.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if "lora_B" in name or name.endswith("bias"):
            local.zero_()
        elif local.ndim == 1:
            local.fill_(1.0)
        else:
            local.copy_(torch.randn(local.shape, generator=gen, device=device, dtype=torch.float32) * std)


def _by_suffix(buffers: dict, name: str):
    """The buffer saved before the loss wrapper (`model.`) and PEFT (`base_model.model.`) prefixed its name."""
    while name not in buffers and "." in name:
        name = name.split(".", 1)[1]
    return buffers[name]


# ---------------------------------------------------------------- evaluation under sharding

def even_batches(n_rows: int, rank: int, world: int, batch_size: int) -> list[tuple[list[int], bool]]:
    """This rank's share of rows 0..n-1 as (batch, real) pairs, every rank the same number of
    batches: a rank with fewer rows repeats its first batch (real=False: results dropped), so the
    collective forward passes of FSDP2/ZeRO-3 line up."""
    mine = list(range(rank, n_rows, world))
    n = math.ceil(math.ceil(n_rows / world) / batch_size)
    batches = [(mine[i:i + batch_size], True) for i in range(0, len(mine), batch_size)]
    filler = batches[0][0] if batches else [0]
    return batches + [(filler, False)] * (n - len(batches))


@contextlib.contextmanager
def full_params(module):
    """Generation calls the inner model, bypassing the FSDP2 root's hooks: all-gather the root's own
    parameters (lm_head, norms, patch embedding) for the duration; inner layers gather themselves."""
    from torch.distributed.fsdp import FSDPModule
    if not isinstance(module, FSDPModule):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


class SyncedGenerate:
    """The model, with generate(synced_gpus=True): a rank that reached EOS keeps joining the forward
    passes until every rank is done (required by FSDP2 and ZeRO-3, where a forward is a collective).
    `synced_gpus` tells InferEngine to keep `generate` (its own loop drops rows, which would leave
    ranks running different numbers of forward passes)."""

    synced_gpus = True

    def __init__(self, model):
        self._model = model

    def generate(self, *args, **kwargs):
        return self._model.generate(*args, synced_gpus=True, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


# ---------------------------------------------------------------- clean output

def quiet_other_ranks(acc) -> None:
    """One copy of each warning: ranks other than 0 log errors only."""
    if acc.is_main_process:
        return
    import warnings
    warnings.filterwarnings("ignore")
    for name in ("transformers", "accelerate", "liger_kernel", "peft", "datasets", "torch.distributed", "ocrtune"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        import transformers
        transformers.logging.set_verbosity_error()


def end_process_group(finished: bool = False) -> None:
    """Tear the process group down once its users are gone. The run's FSDP2/DTensor state is freed first
    (it sits in reference cycles, otherwise collected at interpreter exit, after the group it calls into is
    destroyed); after a finished run the ranks meet first, so no rank closes its gloo sockets while another is
    still finishing its last collective."""
    import gc

    import torch.distributed as dist
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def record_rank_error(exc: BaseException) -> None:
    """Under torchrun, leave this rank's one-line error where the launcher reads it (launch.rank_failure)."""
    import os
    import time
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path) or isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return
    line = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    with contextlib.suppress(OSError):
        with open(path, "w") as f:
            json.dump({"message": {"message": line[:400], "extraInfo": {"py_callstack": "", "timestamp": str(int(time.time()))}}}, f)


def accelerator_kwargs(args) -> dict:
    """The Accelerator's arguments for the run's flags (engine plugins, DDP's buffer sync)."""
    kwargs = {"cpu": not torch.cuda.is_available()}  # lets torchrun on CPU-only hosts use gloo
    if args.deepspeed or args.fsdp:
        kwargs.update(plugin_kwargs(args))
    if args.fp8_base:  # its float8 weights are buffers, the same on every rank: DDP need not send them each step
        from accelerate.utils import DistributedDataParallelKwargs
        kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(broadcast_buffers=False)]
    return kwargs


def from_main(acc, value):
    """Rank 0's `value` on every rank."""
    if acc.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list
    return broadcast_object_list([value], from_process=0)[0]

