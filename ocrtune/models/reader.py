"""The bundled formula reader (`--model ocrtune-reader`): a trained `small` model shipped inside the package in
8 bits, restored on first use into a normal model folder in the cache, which then loads through the same
`from_pretrained` path as any model.

The package folder (`reader_dir()`; written by `write_package`, i.e. scripts/package_reader.py):
  reader.json              the manifest: format version, sha256 and size of every other file, parameter count, the
                           quantization, the run settings and the model card's training record
  config.json, generation_config.json, tokenizer and processor files, chat template: copied from the model
  model.int8.safetensors   the weights (or shards `model-0000k-of-0000n.int8.safetensors` listed in
                           `model.int8.safetensors.index.json`): each tensor of 2+ dimensions and QUANT_MIN_ELEMENTS+
                           elements as int8 with one float16 scale per output row (`<name>:scale`), the rest (norms,
                           biases) in float16; a tied lm_head is not stored (the config ties it to the embeddings)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from ocrtune.errors import UserError
from ocrtune.fileio import UnsafeFile, check_regular, read_bounded, read_json, replace_dir, temp_dir_for, within

NAME = "ocrtune-reader"
FORMAT = "ocrtune-reader"
FORMAT_VERSION = 1
MANIFEST = "reader.json"
WEIGHTS = "model.int8.safetensors"
INDEX = "model.int8.safetensors.index.json"
SCALE = ":scale"  # suffix of a quantized tensor's scales (':' is in no module name)
QUANT_MIN_ELEMENTS = 1024  # smaller matrices stay float16: their scales would cost more than int8 saves
FLOAT16_MAX = 65504.0
ENV = "OCRTUNE_READER_DIR"
# the model folder's files that travel with the weights (all that `from_pretrained` and the processor read)
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "added_tokens.json", "vocab.json", "merges.txt", "processor_config.json", "preprocessor_config.json",
          "video_preprocessor_config.json", "chat_template.jinja", "chat_template.json")
RUN_KEYS = ("template", "system", "max_pixels", "min_pixels")  # the run settings the card reports
CARD_KEYS = ("recipe", "training_data", "training_steps", "training_seconds", "device", "source_commit",
             "print_bleu4", "print_exact_match", "handwrite_bleu4", "handwrite_exact_match", "eval_rows")
MAX_MANIFEST_BYTES = 1 << 20


def reader_dir() -> Path:
    """The reader's package folder: `ocrtune/models/reader_weights/` of this install, or $OCRTUNE_READER_DIR."""
    env = os.environ.get(ENV)
    return Path(env).expanduser() if env else Path(__file__).resolve().parent / "reader_weights"


# ---------------------------------------------------------------- 8-bit tensors

def quantize(t):
    """(int8 tensor of t's shape, float16 scale per output row): symmetric, the row's largest magnitude at 127.
    Each scale is rounded up to a float16, so no value is clipped: the error is at most half a scale a value."""
    import torch
    w = t.detach().float().reshape(t.shape[0], -1)
    amax = w.abs().amax(dim=1)
    scale = (amax / 127).to(torch.float16)
    low = scale.float() * 127 < amax  # rounded down (or to zero) by the float16 cast
    scale = torch.where(low, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    q = torch.round(w / scale.float().unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q.reshape(t.shape), scale


def dequantize(q, scale, dtype=None):
    import torch
    w = q.float() * scale.float().reshape(-1, *[1] * (q.dim() - 1))
    return w.to(dtype or torch.float32)


def pack_tensors(tensors: dict, tied: bool, keep_float16: str | None = None) -> tuple[dict, int, list[str]]:
    """The package's tensors for a model's `tensors`: (packed dict, parameter count, names left out as tied).
    `keep_float16`: a regex; the tensors whose names it finds stay float16 (e.g. embed_tokens: the tied output layer)."""
    import re

    import torch
    packed, params, dropped = {}, 0, []
    for name, t in tensors.items():
        if tied and name == "lm_head.weight" and "model.embed_tokens.weight" in tensors:
            dropped.append(name)
            continue
        params += t.numel()
        if not t.is_floating_point():
            packed[name] = t.contiguous()
            continue
        if not bool(torch.isfinite(t).all()):
            raise UserError(f"tensor {name} of the model holds NaN or infinite values",
                            "package a checkpoint whose training did not diverge")
        if t.dim() >= 2 and t.numel() >= QUANT_MIN_ELEMENTS and not (keep_float16 and re.search(keep_float16, name)):
            packed[name], packed[name + SCALE] = quantize(t)
        else:  # float16, unless a value would overflow it
            fits = t.numel() == 0 or float(t.detach().abs().max()) <= FLOAT16_MAX
            packed[name] = t.detach().to(torch.float16 if fits else torch.float32).contiguous()
    return packed, params, dropped


def unpack_tensors(packed: dict, dtype=None) -> dict:
    """The model's tensors from the package's: int8 ones dequantized, the others cast to `dtype` (float32)."""
    import torch
    out = {}
    for name, t in packed.items():
        if name.endswith(SCALE):
            continue
        if name + SCALE in packed:
            out[name] = dequantize(t, packed[name + SCALE], dtype).contiguous()
        else:
            out[name] = t.to(dtype or torch.float32).contiguous() if t.is_floating_point() else t
    return out


# ---------------------------------------------------------------- writing a package

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_weight_files(model_dir: Path) -> list[Path]:
    """The *.safetensors of a model folder: its index's files, else model.safetensors, else its one file."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(read_bounded(index, MAX_MANIFEST_BYTES * 16, "index"))["weight_map"].values()))
        except (UnsafeFile, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index} is damaged ({e})", "export or save the model folder again") from None
        return [model_dir / f for f in files]
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    found = sorted(model_dir.glob("*.safetensors"))
    return found if len(found) == 1 else []


def check_weight_files(model_dir: Path, files: list[Path], max_mb: float) -> None:
    """Each weight file a regular file inside `model_dir` (an index may name a FIFO or another folder's file),
    and their total within what a package of `max_mb` can hold (float32 shrinks 4x in 8 bits at most, plus 1 MiB
    of headers), before a byte of them is read."""
    total = 0
    for f in files:
        if not within(f, model_dir):
            raise UserError(f"{model_dir}'s weight index names {f}, outside the model folder",
                            "export or save the model folder again")
        try:
            total += check_regular(f, what="weight file")
        except (UnsafeFile, OSError) as e:
            raise UserError(f"could not read weights {f}: {e.strerror if isinstance(e, OSError) else e}",
                            "export or save the model folder again") from None
    if total > 4 * max_mb * 1e6 + 2**20:
        raise UserError(f"--model {model_dir} holds {total / 1e6:,.1f} MB of weights, more than a package of --max_mb "
                        f"{max_mb:g} can hold in 8 bits", "package a smaller model, or raise --max_mb")


def read_model_tensors(model_dir: Path, max_mb: float = float("inf")) -> dict:
    from safetensors import SafetensorError, safe_open
    tensors = {}
    files = model_weight_files(model_dir)
    check_weight_files(model_dir, files, max_mb)
    for f in files:
        try:
            with safe_open(str(f), "pt") as st:
                for k in st.keys():
                    tensors[k] = st.get_tensor(k)
        except (SafetensorError, OSError) as e:
            raise UserError(f"could not read weights {f}: {str(e).splitlines()[0][:160]}",
                            "export or save the model folder again") from None
    return tensors


def check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise UserError(f"--model {model_dir} is not a folder", "pass a merged model folder (checkpoint-N-merged)")
    missing = [what for what, ok in (
        ("config.json", (model_dir / "config.json").is_file()),
        ("*.safetensors weights", bool(model_weight_files(model_dir))),
        ("tokenizer files", any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))),
        ("processor config", any((model_dir / f).is_file() for f in ("processor_config.json", "preprocessor_config.json"))),
    ) if not ok]
    if missing:
        raise UserError(f"--model {model_dir} is not a model folder (no {', '.join(missing)})",
                        "pass a merged model folder with its processor (ocrtune export writes one: checkpoint-N-merged)")


def shard_groups(packed: dict, shard_bytes: int) -> list[list[str]]:
    """Tensor names in order, grouped into files of at most `shard_bytes` of data (a bigger tensor alone)."""
    groups, size = [[]], 0
    for name, t in packed.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups


def write_weights(packed: dict, folder: Path, shard_bytes: int) -> list[str]:
    """The package's weight files in `folder`: one file, or shards and their index when over `shard_bytes`."""
    from safetensors.torch import save_file
    groups = shard_groups(packed, shard_bytes)
    if len(groups) == 1:
        save_file(packed, str(folder / WEIGHTS), metadata={"format": "pt"})
        return [WEIGHTS]
    names, weight_map = [], {}
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.int8.safetensors"
        save_file({k: packed[k] for k in group}, str(folder / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in group})
    total = sum(t.numel() * t.element_size() for t in packed.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return [*names, INDEX]


def run_settings(model_dir: Path) -> dict:
    """The run settings a merged folder carries (ocrtune_merge.json), for the card; {} without them."""
    try:
        info = json.loads(read_bounded(model_dir / "ocrtune_merge.json", MAX_MANIFEST_BYTES, "merge info"))
        ra = info.get("run_args") or {}
    except (OSError, UnsafeFile, ValueError, AttributeError):
        return {}
    return {k: ra[k] for k in RUN_KEYS if k in ra} if isinstance(ra, dict) else {}


def _readable(folder: Path) -> None:
    """Files 0644 and the folder 0755 (mkdtemp makes it 0700, safetensors its files 0600): package data and a shared
    cache are read by other users."""
    os.chmod(folder, 0o755)
    for f in folder.iterdir():
        os.chmod(f, 0o644)


def write_package(model_dir, output, max_mb: float = 40.0, shard_mb: float = 15.0, card: dict | None = None,
                  keep_float16: str | None = None) -> dict:
    """Package the model folder `model_dir` into the new folder `output` (see the module's docstring); returns the
    manifest. Refused: an `output` that exists and is not empty, one inside `model_dir`, a package over `max_mb`
    megabytes (10^6 bytes; nothing is left at `output`)."""
    from ocrtune.fileio import check_not_input
    model_dir, output = Path(model_dir).expanduser(), Path(output).expanduser()
    check_model_dir(model_dir)
    check_not_input("--output", output, [("--model", model_dir)], contains=True)
    if output.exists() and not output.is_dir():  # a file, a FIFO, a device
        raise UserError(f"--output {output} exists and is not a folder", "choose a new folder")
    if output.exists() and any(output.iterdir()):
        raise UserError(f"--output {output} exists and is not empty", "choose a new folder, or empty this one")
    config = read_json(model_dir / "config.json", fix="export or save the model folder again")
    tied = bool(config.get("tie_word_embeddings") or (config.get("text_config") or {}).get("tie_word_embeddings"))
    packed, params, dropped = pack_tensors(read_model_tensors(model_dir, max_mb), tied, keep_float16)
    with temp_dir_for(output) as tmp:
        try:
            files = [f for f in COPIED if (model_dir / f).is_file()]
            for f in files:
                shutil.copyfile(model_dir / f, tmp / f)
            weights = write_weights(packed, tmp, int(shard_mb * 2**20))
            total = sum((tmp / f).stat().st_size for f in files + weights)
            if total > max_mb * 1e6:
                raise UserError(f"the package would be {total / 1e6:.1f} MB, over --max_mb {max_mb:g}",
                                "package a smaller model, or raise --max_mb")
            manifest = {
                "format": FORMAT, "format_version": FORMAT_VERSION, "name": NAME, "parameters": params,
                "weights": [w for w in weights if w != INDEX], "index": INDEX if INDEX in weights else None,
                "quantization": {"scheme": "int8, symmetric, one float16 scale per output row (<name>:scale)",
                                 "int8_min_elements": QUANT_MIN_ELEMENTS, "other_tensors": "float16",
                                 "float16_by_name": keep_float16,
                                 "tied_not_stored": dropped},
                "files": {f: {"sha256": sha256(tmp / f), "bytes": (tmp / f).stat().st_size} for f in sorted(files + weights)},
                "package_bytes": total, "run_args": run_settings(model_dir),
                "card": {**{k: None for k in CARD_KEYS}, **(card or {})},
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            _readable(tmp)
            replace_dir(tmp, output)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return manifest


# ---------------------------------------------------------------- restoring it

def _fix(folder: Path) -> str:
    if os.environ.get(ENV):
        return f"package the reader again (scripts/package_reader.py), or unset {ENV}"
    return "reinstall ocrtune (pip install --force-reinstall ocrtune) to restore the formula reader"


def read_manifest(folder: Path) -> tuple[dict, bytes]:
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"the formula reader is not bundled in this install (no {MANIFEST} in {folder})",
                        f"pass another --model (tiny, a hub id or a model folder), or set {ENV} to a reader package "
                        "folder (scripts/package_reader.py writes one)")
    try:
        raw = read_bounded(path, MAX_MANIFEST_BYTES, "reader manifest")
        manifest = json.loads(raw)
        files, weights, index = manifest["files"], manifest["weights"], manifest.get("index")
        # every file the restore reads is one whose sha256 the manifest holds
        ok = (manifest.get("format") == FORMAT and isinstance(files, dict) and isinstance(weights, list) and weights
              and all(w in files for w in [*weights, "config.json"]) and (index is None or index in files)
              and isinstance(manifest.get("format_version"), int))
    except (OSError, UnsafeFile, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"reader manifest {path} is damaged ({type(e).__name__})", _fix(folder)) from None
    if not ok:
        raise UserError(f"reader manifest {path} is damaged (not a complete {FORMAT} manifest)", _fix(folder))
    if manifest["format_version"] > FORMAT_VERSION:
        raise UserError(f"reader package {folder} has format version {manifest.get('format_version')}, newer than this "
                        f"ocrtune reads ({FORMAT_VERSION})", "upgrade ocrtune")
    return manifest, raw


def check_package(folder: Path, manifest: dict) -> None:
    """Every file the manifest names is there, a regular file, with its sha256 (a damaged or swapped one is named)."""
    for name, entry in manifest["files"].items():
        path = folder / name
        if Path(name).name != name or name in ("", ".", ".."):
            raise UserError(f"reader manifest {folder / MANIFEST} names a file outside its folder ({name})", _fix(folder))
        if not within(path, folder):  # a link out of the package: its target is not the package's to vouch for
            raise UserError(f"reader package file {path} is a link to a file outside {folder}", _fix(folder))
        try:
            size = check_regular(path, what="reader package file")
            if not isinstance(entry, dict) or entry.get("bytes") != size:  # a swapped (or huge) file, unhashed
                raise UnsafeFile(f"its size {size} is not the manifest's")
            digest = sha256(path)
        except (OSError, UnsafeFile) as e:
            raise UserError(f"reader package file {path} is missing, unreadable or not the manifest's "
                            f"({type(e).__name__}: {e})", _fix(folder)) from None
        if not isinstance(entry, dict) or digest != entry.get("sha256"):
            raise UserError(f"reader package file {path} does not match its manifest (sha256 differs: damaged or replaced)",
                            _fix(folder))


def read_packed(folder: Path, manifest: dict) -> dict:
    from safetensors import SafetensorError, safe_open
    packed = {}
    for name in manifest["weights"]:
        try:
            with safe_open(str(folder / name), "pt") as st:
                packed.update({k: st.get_tensor(k) for k in st.keys()})
        except (SafetensorError, OSError) as e:
            raise UserError(f"reader package file {folder / name} can't be read ({str(e).splitlines()[0][:120]})",
                            _fix(folder)) from None
    return packed


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else "float32"


def _restored(folder: Path) -> bool:
    return all((folder / f).is_file() for f in (MANIFEST, "config.json", "model.safetensors"))


def restore_reader(cache=None, dtype=None) -> Path:
    """The reader as a normal model folder, `<cache>/models/ocrtune-reader-<manifest hash>` (cache: the ocrtune
    cache), restored on first use: the package's files checked against the manifest, the weights dequantized to
    `dtype` (float32; a torch dtype or its name), written to a temp folder and renamed into place. Later calls find
    the folder and read only the manifest; a changed package (new manifest) restores into a new folder."""
    import torch
    from safetensors.torch import save_file

    from ocrtune.models.presets import cache_root
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype  # "bfloat16" as torch.bfloat16
    folder = reader_dir()
    manifest, raw = read_manifest(folder)
    key = hashlib.sha256(raw).hexdigest()[:12]
    suffix = "" if _dtype_name(dtype) == "float32" else f"-{_dtype_name(dtype)}"
    final = Path(cache or cache_root()) / "models" / f"{NAME}-{key}{suffix}"
    if _restored(final):
        return final
    check_package(folder, manifest)
    tensors = unpack_tensors(read_packed(folder, manifest), dtype)
    with temp_dir_for(final) as tmp:
        try:
            weights = set(manifest["weights"]) | {manifest.get("index")}
            for name in manifest["files"]:
                if name not in weights:
                    shutil.copyfile(folder / name, tmp / name)
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / MANIFEST).write_bytes(raw)  # last: the folder is whole when it is there
            _readable(tmp)
            if not _restored(final):
                try:
                    replace_dir(tmp, final)
                except OSError:  # another process renamed its restore in between: it is the same folder
                    if not _restored(final):
                        raise
            # another process restored it meanwhile (and may be loading it): keep that one
            shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
