"""Load datasets (registry names, hub ids, local files and folders) into canonical rows.

A canonical row is {"messages": [{"role", "content"}, ...], "images": [{"bytes", "path"}, ...]}.
`datasets` does the reading, caching and `map`; images stay undecoded references until encoding.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import datasets

from ocrtune.data import hub
from ocrtune.data.images import BadImage, image_ref
from ocrtune.data.parallel import auto_num_proc
from ocrtune.data.registry import DATASETS, OCR_PROMPT, get_dataset_spec, latex_ocr_preprocess
from ocrtune.errors import UserError, first_line, hub_failure, import_modelscope
from ocrtune.fileio import UnsafeFile, check_regular

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
FEATURES = datasets.Features({
    "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
    "images": datasets.List({"bytes": datasets.Value("binary"), "path": datasets.Value("string")}),
    "_row": datasets.Value("int64"),  # the row's number in its file: messages name it after shuffles and splits
})


MAX_SAMPLE = 10**9  # name#N: more rows than any dataset holds is a typo


def parse_dataset_arg(arg: str) -> tuple[str, int | None]:
    """`name#N` -> (name, N): sample N rows."""
    name, sep, n = arg.rpartition("#")
    if sep and n.isdigit():
        if not 1 <= int(n) <= MAX_SAMPLE:
            raise UserError(f"row count {n} in --dataset '{arg}' is out of range",
                            f"write name#N with N from 1 to {MAX_SAMPLE}, e.g. {name}#500 (or {name} for every row)")
        return name, int(n)
    if sep and not Path(arg).exists():
        raise UserError(f"bad row count in --dataset '{arg}'", "write name#N with N a whole number, e.g. latex-ocr-print#500")
    return arg, None


MAX_JSON_DATASET_BYTES = 2 * 2**30  # a .json array is parsed whole in memory (JSON lines and the rest stream)


def _check_data_file(path: Path) -> None:
    """Only regular files reach the readers (a FIFO would block them for ever, a link to /dev/zero never
    ends); a .json file, parsed whole, is bounded too."""
    bound = MAX_JSON_DATASET_BYTES if path.suffix.lower() == ".json" else None
    try:
        check_regular(path, bound, "dataset file")
    except UnsafeFile as e:
        fix = "convert it to .jsonl (one row a line)" if "limit" in str(e) else "pass a regular file or a folder of them"
        raise UserError(str(e), fix) from None
    except OSError as e:
        raise UserError(f"can't read dataset file {path} ({e.strerror})", "check the path and its permissions") from None


def _load_local(path: Path) -> datasets.Dataset:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
            return ds
        files = sorted(p for p in path.rglob("*") if p.suffix in FILE_BUILDERS)
        if not files:
            raise UserError(f"dataset folder {path} holds no data files",
                            "put .jsonl/.json/.csv/.parquet files in it, or save it with Dataset.save_to_disk")
        files = [f for f in files if f.suffix == files[0].suffix]
        for f in files:
            _check_data_file(f)
        try:
            return datasets.load_dataset(FILE_BUILDERS[files[0].suffix], data_files=[str(f) for f in files], split="train")
        except Exception as e:
            for f in files:  # name the file that fails on its own
                _read_file(f)
            raise UserError(f"could not read the files of dataset folder {path} together: {_why(e)}",
                            "give every file the same columns") from None
    if path.suffix.lower() not in FILE_BUILDERS:
        raise UserError(f"unsupported dataset file type '{path.suffix}' ({path})", "use .jsonl, .json, .csv or .parquet")
    _check_data_file(path)
    return _read_file(path)


def _why(e: BaseException) -> str:
    """What went wrong, from the innermost cause (datasets wraps the parser's error in 'An error occurred while
    generating the dataset')."""
    for _ in range(5):
        if e.__cause__ is None:
            break
        e = e.__cause__
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _read_file(path: Path) -> datasets.Dataset:
    if path.stat().st_size == 0:
        raise UserError(f"dataset file {path} is empty (0 bytes)", "give it rows (one JSON object a line for .jsonl)")
    try:
        return datasets.load_dataset(FILE_BUILDERS[path.suffix.lower()], data_files=str(path), split="train")
    except Exception as e:
        raise UserError(f"could not read dataset file {path}: {_why(e)}",
                        "check that the file is valid " + path.suffix.lstrip(".")) from None


def _load_hub(hub_id: str, subset: str | None, split: str, use_hf: bool, ms_id: str | None = None) -> datasets.Dataset:
    try:
        if use_hf or ms_id is None:
            return _load_hf(hub_id, subset, split)
        return import_modelscope().MsDataset.load(ms_id, subset_name=subset, split=split).to_hf_dataset()
    except UserError:
        raise
    except Exception as e:
        raise hub_failure(f"load dataset '{hub_id}' (subset {subset}, split {split})", use_hf, e,
                          "check the network or the name, or download it and pass the local path to --dataset") from None


def _load_hf(hub_id: str, subset: str | None, split: str) -> datasets.Dataset:
    """From Hugging Face, failing at once (one line) where the hub can't be reached and nothing is cached."""
    kwargs = {"name": subset} if subset and subset != "default" else {}
    what = f"could not load dataset '{hub_id}' ({f'subset {subset}, ' if subset else ''}split {split})"
    local = "download it where the network reaches the hub and pass its local path to --dataset"
    if hub.offline_mode():
        try:
            return datasets.load_dataset(hub_id, split=split, **kwargs)
        except Exception as e:
            raise UserError(f"{what}: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set and no copy is cached "
                            f"({first_line(e, 120)})", f"unset it to download, or {local}") from None
    why = hub.unreachable()
    if why is None:
        return datasets.load_dataset(hub_id, split=split, **kwargs)
    with hub.offline():  # a cached copy still loads
        try:
            return datasets.load_dataset(hub_id, split=split, **kwargs)
        except Exception:
            raise UserError(f"{what}: the Hugging Face hub ({why}) is unreachable and no copy is cached",
                            f"check the network (or HF_ENDPOINT, a proxy), or {local}") from None


def _canonicalize(ds: datasets.Dataset, base_dir: str | None, source: str) -> datasets.Dataset:
    cols = set(ds.column_names)
    image_col = "images" if "images" in cols else ("image" if "image" in cols else None)
    if "messages" in cols:
        convert = _from_messages
    elif {"query", "response"} <= cols:
        convert = _from_query_response
    elif {"image", "text"} <= cols:
        convert = _from_latex_ocr
    else:
        raise UserError(f"dataset {source} has columns {sorted(cols)}, none of the known layouts",
                        "give it query/response(/images) columns, messages(+images), or image/text as in LaTeX_OCR")

    def fn(row, index):
        out = convert(row)
        out["_row"] = index
        refs = row.get(image_col) if image_col else None
        if refs is None:
            refs = []
        elif not isinstance(refs, list):
            refs = [refs]
        images = []
        for r in refs:
            try:
                images.append(image_ref(r, base_dir))
            except BadImage as e:  # kept as a broken reference: the check strategy decides
                images.append({"bytes": None, "path": f"<invalid: {e}>"})
        out["images"] = images
        return out

    if "image" in cols and isinstance(ds.features.get("image"), datasets.Image):
        ds = ds.cast_column("image", datasets.Image(decode=False))
    if "images" in cols and isinstance(ds.features.get("images"), (datasets.Sequence, datasets.List)):
        feat = ds.features["images"].feature
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column("images", datasets.List(datasets.Image(decode=False)))
    return ds.map(fn, with_indices=True, remove_columns=ds.column_names, features=FEATURES,
                  num_proc=auto_num_proc(len(ds)), desc=f"reading {Path(source).name}")


def _text(v) -> str:
    return v if isinstance(v, str) else ("" if v is None else json.dumps(v) if not isinstance(v, (int, float)) else str(v))


def invalid_messages(reason: str) -> list[dict]:
    """A row whose `messages` has the wrong shape: one message whose role carries the reason, so that
    --check_dataset_strategy decides (as for a broken image reference) and names the row."""
    return [{"role": f"{INVALID}{reason}>", "content": None}]


INVALID = "<invalid: "
SHAPE_FIX = 'a list of {"role": ..., "content": ...} objects'


def _kind(v) -> str:
    return {str: "a string", int: "a number", float: "a number", bool: "a boolean", dict: "an object",
            list: "a list"}.get(type(v), type(v).__name__)


def _from_messages(row):
    msgs = row["messages"]
    if isinstance(msgs, str):
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError as e:
            return {"messages": invalid_messages(f"messages is a string that is not valid JSON ({e.msg}, char {e.pos}); "
                                                 f"give {SHAPE_FIX}")}
    if msgs is not None and not isinstance(msgs, list):
        return {"messages": invalid_messages(f"messages is {_kind(msgs)}, not {SHAPE_FIX}")}
    out = []
    for i, m in enumerate(msgs or []):
        if not isinstance(m, dict):
            return {"messages": invalid_messages(f"messages[{i}] is {_kind(m)}, not an object; give {SHAPE_FIX}")}
        content = m.get("content")
        if isinstance(content, list):  # OpenAI-style parts: keep text, images become <image> tags
            bad = next((j for j, p in enumerate(content) if not isinstance(p, dict)), None)
            if bad is not None:
                return {"messages": invalid_messages(
                    f'messages[{i}].content[{bad}] is {_kind(content[bad])}, not a part such as {{"type": "text", '
                    f'"text": ...}} or {{"type": "image"}}; or give the content as one string')}
            content = "".join("<image>" if p.get("type") in ("image", "image_url") else _text(p.get("text", ""))
                              for p in content)
        out.append({"role": str(m.get("role", "")), "content": content if isinstance(content, str) else None})
    return {"messages": out}


def _from_query_response(row):
    msgs = []
    if row.get("system"):
        msgs.append({"role": "system", "content": row["system"]})
    query = row["query"]
    msgs += [{"role": "user", "content": query if isinstance(query, str) else None},
             {"role": "assistant", "content": row["response"] if isinstance(row["response"], str) else None}]
    return {"messages": msgs}


def _from_latex_ocr(row):
    return {"messages": latex_ocr_preprocess({"text": row["text"] if isinstance(row["text"], str) else None,
                                              "image": None})["messages"]}


def load_raw(arg: str, split: str = "train", use_hf: bool = True) -> tuple[datasets.Dataset, str | None, str]:
    """Read `arg` (registry name, local path or hub id) -> (raw dataset, base dir for image paths, label)."""
    path = Path(arg).expanduser()
    if path.exists():
        return _load_local(path), str(path if path.is_dir() else path.parent), str(path)
    if arg in DATASETS:
        spec = get_dataset_spec(arg)
        split_name = spec.splits[0] if split == "train" else (spec.val_split or split)
        if spec.local_dir is not None:
            f = spec.local_dir / f"{split_name}.parquet"
            ds = datasets.load_dataset("parquet", data_files=str(f), split="train")
            if spec.rows and split_name in spec.rows:
                ds = ds.select(range(*spec.rows[split_name]))
            return ds, str(spec.local_dir), arg
        parts = [_load_hub(spec.hf_id, s, split_name, use_hf, spec.ms_id) for s in spec.subsets]
        return (parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)), None, arg
    if _looks_like_path(arg):
        raise UserError(f"dataset file not found: {arg}", "check the path (relative paths start from the current folder)")
    if "/" in arg and arg.count("/") == 1:
        return _load_hub(arg, None, split, use_hf), None, arg
    get_dataset_spec(arg)  # raises the unknown-dataset error
    raise AssertionError


def _looks_like_path(arg: str) -> bool:
    return arg.startswith((".", "/", "~")) or os.sep in arg and Path(arg).suffix != "" or Path(arg).suffix.lower() in FILE_BUILDERS


def load_dataset(arg: str, split: str = "train", use_hf: bool = True, seed: int = 42) -> datasets.Dataset:
    """`--dataset` value -> canonical dataset (`name#N` keeps a seeded random sample of N rows)."""
    name, n = parse_dataset_arg(arg)
    raw, base_dir, label = load_raw(name, split, use_hf)
    spec = DATASETS.get(name)
    if spec is not None and spec.preprocess is not latex_ocr_preprocess and spec.preprocess is not None and not Path(name).exists():
        raw = raw.map(spec.preprocess, remove_columns=raw.column_names)
    ds = _canonicalize(raw, base_dir, label)
    if n is not None:
        ds = ds.shuffle(seed=seed).select(range(min(n, len(ds)))) if n < len(ds) else ds
    return ds


def load_datasets(args: list[str], split: str = "train", use_hf: bool = True, seed: int = 42) -> datasets.Dataset:
    parts = [load_dataset(a, split, use_hf, seed) for a in args]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


DEFAULT_TEST_RATIO = 0.01  # --dataset_test_ratio when it is not given and the data has no validation split of its own
MAX_VAL_ROWS = 1000


def has_own_validation(dataset_args: list[str]) -> bool:
    """Whether every --dataset is a registry name with a validation split of its own."""
    names = [parse_dataset_arg(a)[0] for a in dataset_args]
    return bool(names) and all(not Path(n).exists() and n in DATASETS and DATASETS[n].val_split for n in names)


def own_validation(dataset_args: list[str], use_hf: bool = True, seed: int = 42) -> datasets.Dataset | None:
    """The datasets' own validation splits (registry names with one, e.g. latex-ocr-sample's 40 rows),
    a seeded sample of at most MAX_VAL_ROWS; None unless every --dataset has one."""
    if not has_own_validation(dataset_args):
        return None
    val = load_datasets([parse_dataset_arg(a)[0] for a in dataset_args], "validation", use_hf, seed)
    return val.shuffle(seed=seed).select(range(MAX_VAL_ROWS)) if len(val) > MAX_VAL_ROWS else val


def validation_data(train: datasets.Dataset, dataset_args: list[str], val_args: list[str] | None,
                    test_ratio: float | None, use_hf: bool = True, seed: int = 42):
    """(train, validation) by precedence: --val_dataset; then, unless --dataset_test_ratio is given, the
    datasets' own validation split; then --dataset_test_ratio (default 0.01) split off the training rows."""
    if val_args:
        return train, load_datasets(val_args, "validation", use_hf, seed)
    if test_ratio is None:
        val = own_validation(dataset_args, use_hf, seed)
        if val is not None:
            return train, val
    return split_validation(train, DEFAULT_TEST_RATIO if test_ratio is None else test_ratio, seed)


def split_validation(ds: datasets.Dataset, ratio: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Split off --dataset_test_ratio of the rows (at least one, at most 1000) as the validation set."""
    if ratio <= 0 or len(ds) < 2:
        return ds, None
    n_val = min(max(1, round(len(ds) * ratio)), 1000, len(ds) - 1)
    parts = ds.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def ocr_record(image, query: str = OCR_PROMPT) -> dict:
    """A single inference record for one image."""
    return {"messages": [{"role": "user", "content": query if "<image>" in query else "<image>" + query}],
            "images": [image_ref(image)]}
