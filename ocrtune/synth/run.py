"""`ocrtune synth`: LaTeX formulas in, LaTeX_OCR-style parquet shards out (rendered with real LaTeX on all cores).

Formulas are numbered once (inputs first, then the mutations); shard k holds the rendered rows of
formulas [k * shard_size, (k + 1) * shard_size), so every shard is a pure function of the flags, is
written atomically, and a rerun of a killed run skips the shards that are already there.
"""
from __future__ import annotations

import collections
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

from ocrtune.errors import UserError
from ocrtune.args import BIG, SEED, arg, ints, positive, reals
from ocrtune.data.fingerprint import dataset_paths
from ocrtune.fileio import check_not_input

MANIFEST = "synth_args.txt"  # not .json: a dataset folder's data files are found by suffix


@dataclass
class SynthArgs:
    dataset: list[str] = arg(None, "formulas: registry name (latex-ocr-sample), or a .parquet/.jsonl/.json/.csv file or "
                                   "folder with a `text` column/key, or a .txt file with one formula a line; name#N samples N")
    output_dir: str | None = arg(None, "folder for the parquet shards (train-00000.parquet, ...) in the LaTeX_OCR schema")
    mutate: int = arg(0, "also make this many new distinct formulas from the inputs (token swaps, `{...}` splices)", domain=ints(0, BIG))
    scramble: float = arg(0.0, "share of the --mutate formulas whose letters, digits, Greek letters, operators, "
                               "relations and function names are then mostly redrawn at random (layout kept, symbols "
                               "unpredictable: trains reading rather than the formulas' language)", domain=reals(0, 1))
    recombine: float = arg(0.0, "share of the --mutate formulas made of the head of one input and the tail of another, "
                                 "joined at a top-level relation or comma (new overall structures)", domain=reals(0, 1))
    exclude: list[str] = arg(None, "datasets (same forms as --dataset; all splits of a registry name) whose formulas are never produced")
    include_input: bool | None = arg(None, "render the input formulas too (default: true without --mutate, false with it)")
    max_rows: int | None = arg(None, "render at most this many formulas (the first ones; skipped ones are not replaced)", domain=ints(0, BIG))
    seed: int = arg(42, "seed for --mutate and name#N sampling; the same flags give byte-identical shards", domain=SEED)
    num_proc: int | None = arg(None, "worker processes (default: all cores)", domain=ints(1, 4096))
    shard_size: int = arg(5000, "formulas per parquet shard", domain=ints(1, BIG))
    chunk_size: int = arg(1000, "formulas per pdflatex run (each run costs a fixed ~0.1 s to start)", domain=ints(1, BIG))
    timeout: float = arg(10.0, "seconds one pdflatex run may take before its formulas are split to find a loop",
                          domain=positive(86400))
    tex_root: str | None = arg(None, "unpacked portable TeX bundle (scripts/make_tex_bundle.sh) instead of the system "
                                     "pdflatex", env="OCRTUNE_TEX_ROOT")
    use_hf: bool = arg(True, "download registry datasets from Hugging Face (true) or ModelScope (false)", env="USE_HF")


MAX_FORMULA_FILE_BYTES = 2 * 2**30


def read_formulas(arg_value: str, split: str, use_hf: bool, seed: int) -> list[str]:
    """The `text` of every row of a dataset argument (images are never decoded)."""
    from ocrtune.data.loading import load_raw, parse_dataset_arg
    from ocrtune.data.parallel import column_list
    name, n = parse_dataset_arg(arg_value)
    path = Path(name).expanduser()
    if path.suffix.lower() == ".txt" and path.is_file():
        from ocrtune.fileio import UnsafeFile, read_bounded
        try:  # bounded like every user file: a link to /dev/zero would never end
            text = read_bounded(path, MAX_FORMULA_FILE_BYTES, "formula file").decode("utf-8")
        except UnsafeFile as e:
            raise UserError(str(e), "split the formulas over several files, or pass a .jsonl/.parquet dataset") from None
        texts = [line for line in text.splitlines() if line.strip()]
    else:
        raw = load_raw(name, split, use_hf)[0]
        if "text" not in raw.column_names:
            raise UserError(f"--dataset {arg_value} has no `text` column (columns: {', '.join(raw.column_names)})",
                            "give formulas in a `text` column/key, or a .txt file with one formula a line")
        texts = [t for t in column_list(raw, "text") if isinstance(t, str) and t.strip()]
    if n is not None and n < len(texts):
        import random
        texts = [texts[i] for i in sorted(random.Random(seed).sample(range(len(texts)), n))]
    return texts


def excluded_formulas(args: SynthArgs) -> set[str]:
    from ocrtune.data.registry import DATASETS
    from ocrtune.synth.mutate import normalize
    out: set[str] = set()
    for value in args.exclude or []:
        spec = DATASETS.get(value)
        splits = ["train"] + (["validation"] if spec is not None and spec.val_split else [])
        for split in splits:
            out |= {normalize(t) for t in read_formulas(value, split, args.use_hf, args.seed)}
    return out


def plan_formulas(args: SynthArgs) -> tuple[list[str], collections.Counter]:
    """The numbered list of formulas to render (inputs, then mutations), and what was dropped before TeX."""
    from ocrtune.synth.mutate import mutate, normalize
    inputs = [t for value in args.dataset for t in read_formulas(value, "train", args.use_hf, args.seed)]
    excluded = excluded_formulas(args)
    dropped: collections.Counter = collections.Counter()
    formulas: list[str] = []
    include = args.include_input if args.include_input is not None else args.mutate == 0
    if include:
        seen: set[str] = set()
        for t in inputs:
            key = normalize(t)
            if key in excluded:
                dropped["excluded"] += 1
            elif key in seen:
                dropped["duplicate"] += 1
            else:
                seen.add(key)
                formulas.append(t)
    if args.mutate:
        made = mutate(inputs, args.mutate, args.seed, excluded, scramble=args.scramble, recombine=args.recombine)
        if len(made) < args.mutate:
            dropped[f"mutate made only {len(made)} distinct"] += args.mutate - len(made)
        formulas += made
    if args.max_rows is not None:
        formulas = formulas[:args.max_rows]
    return formulas, dropped


def validate(args: SynthArgs) -> None:
    if not args.dataset:
        raise UserError("ocrtune synth needs --dataset", "pass formulas, e.g. --dataset latex-ocr-sample or formulas.txt")
    if not args.output_dir:
        raise UserError("ocrtune synth needs --output_dir", "pass a folder for the parquet shards, e.g. --output_dir synth")
    if not 0.0 <= args.scramble <= 1.0:
        raise UserError(f"--scramble {args.scramble} is out of range", "give a share between 0 and 1, e.g. --scramble 0.5")
    if args.scramble and not args.mutate:
        raise UserError("--scramble applies to the --mutate formulas, and --mutate is 0", "add --mutate N")
    if not 0.0 <= args.recombine <= 1.0:
        raise UserError(f"--recombine {args.recombine} is out of range", "give a share between 0 and 1, e.g. --recombine 0.5")
    if args.recombine and not args.mutate:
        raise UserError("--recombine applies to the --mutate formulas, and --mutate is 0", "add --mutate N")
    for name in ("mutate", "shard_size", "chunk_size", "timeout", "max_rows", "num_proc"):
        value = getattr(args, name)
        if value is not None and (value < 0 or (value == 0 and name not in ("mutate", "max_rows"))):
            raise UserError(f"--{name} {value} is out of range", f"give a positive --{name}")


def check_manifest(out: Path, args: SynthArgs) -> None:
    """Refuse to mix shards of different flags in one folder; same flags -> resume."""
    key = {k: v for k, v in asdict(args).items() if k not in ("output_dir", "num_proc", "timeout", "tex_root")}
    for name in ("scramble", "recombine"):  # folders made before these flags existed resume as before
        if not key[name]:
            del key[name]
    path = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file", "pass a folder (new or empty) for the shards")
    if path.exists():
        if json.loads(path.read_text()) != key:
            raise UserError(f"{out} holds shards of an `ocrtune synth` run with other flags ({path})",
                            "pick a new --output_dir, or delete that folder")
        return
    if any(out.glob("*.parquet")):
        raise UserError(f"{out} already holds parquet files", "pick a new or empty --output_dir")
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(key, indent=1))
    os.replace(tmp, path)


_TEX = None


def _init_worker(tex) -> None:
    global _TEX
    _TEX = tex


def _render_chunk(job: tuple[int, list[str]]) -> tuple[int, list[tuple[bytes | None, str]]]:
    from ocrtune.synth.render import render_formulas
    start, formulas = job
    return start, render_formulas(_TEX, formulas)


def write_shard(path: Path, rows: list[tuple[int, str, bytes]]) -> None:
    """Rows (index, text, png) -> one parquet file in the LaTeX_OCR schema, written atomically."""
    import datasets
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": png, "path": f"synth_{i:08d}.png"} for i, _, png in rows],
                                     "text": [t for _, t, _ in rows]}, features=features)
    tmp = path.with_name(f".{path.name}.tmp")
    datasets.disable_progress_bars()
    try:
        ds.to_parquet(str(tmp))
    finally:
        datasets.enable_progress_bars()
    os.replace(tmp, path)


def short_reason(why: str) -> str:
    """The kind of a skip reason, for the summary line (the message after ':' varies per formula)."""
    return why.split(":")[0] if why.startswith(("tex error", "tex stopped")) else why


def shard_rows(chunks: list[tuple[int, list]], formulas: list[str], skipped: collections.Counter) -> list[tuple]:
    """A shard's rendered chunks -> its rows (index, text, png) in formula order; skips are counted."""
    rows = []
    for start, chunk in sorted(chunks, key=lambda c: c[0]):
        for i, (png, why) in enumerate(chunk, start=start):
            if png is None:
                skipped[short_reason(why)] += 1
            else:
                rows.append((i, formulas[i], png))
    return rows


def run_synth(args: SynthArgs) -> dict:
    from tqdm import tqdm

    from ocrtune.evaluate.typeset import find_tex, preflight
    validate(args)
    inputs = [(f"the dataset {v}", p) for v, p in dataset_paths((args.dataset or []) + (args.exclude or []))]
    # shards written among the inputs would also be read as part of them
    check_not_input("--output_dir", args.output_dir, inputs, contains=True)
    tex = find_tex(args.tex_root, args.timeout)
    try:
        import pypdfium2  # noqa: F401  (the workers rasterize with it)
    except ImportError:
        raise UserError("ocrtune synth needs the pypdfium2 package", "pip install pypdfium2") from None
    preflight(tex)
    out = Path(args.output_dir).expanduser()
    formulas, skipped = plan_formulas(args)
    if not formulas:
        raise UserError(f"no formulas left to render from --dataset {' '.join(args.dataset)} "
                        f"({', '.join(f'{n} {r}' for r, n in skipped.items()) or 'it is empty'})",
                        "give formulas in a `text` column, or fewer --exclude datasets, or --mutate N")
    check_manifest(out, args)
    n_shards = (len(formulas) + args.shard_size - 1) // args.shard_size
    shard_path = [out / f"train-{k:05d}.parquet" for k in range(n_shards)]
    jobs = [(s, formulas[s:min(s + args.chunk_size, (s // args.shard_size + 1) * args.shard_size, len(formulas))])
            for k in range(n_shards) if not shard_path[k].exists()
            for s in range(k * args.shard_size, min((k + 1) * args.shard_size, len(formulas)), args.chunk_size)]
    done_before = sum(p.exists() for p in shard_path)
    pending: dict[int, list] = collections.defaultdict(list)
    rendered, t0 = 0, time.time()
    num_proc = min(args.num_proc or os.cpu_count() or 1, max(1, len(jobs)))
    bar = tqdm(total=sum(len(f) for _, f in jobs), desc="synth", unit="formula", dynamic_ncols=True)
    # an executor, not multiprocessing.Pool: a worker killed mid-chunk (out of memory) breaks it, where Pool
    # would wait for the lost chunk for ever
    pool = ProcessPoolExecutor(num_proc, multiprocessing.get_context("spawn"), _init_worker, (tex,)) \
        if num_proc > 1 else None
    try:
        if pool is None:
            _init_worker(tex)
        results = (f.result() for f in as_completed([pool.submit(_render_chunk, j) for j in jobs])) if pool \
            else map(_render_chunk, jobs)
        for start, res in results:
            k = start // args.shard_size
            pending[k].append((start, res))
            bar.update(len(res))
            if sum(len(r) for _, r in pending[k]) == min(args.shard_size, len(formulas) - k * args.shard_size):
                rows = shard_rows(pending.pop(k), formulas, skipped)
                rendered += len(rows)
                write_shard(shard_path[k], rows)
    except BrokenProcessPool:
        raise UserError("a rendering worker of ocrtune synth died (killed for lack of memory?)",
                        "free memory or lower --num_proc, and run the same command again: the finished shards are "
                        "kept") from None
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    seconds = time.time() - t0
    why = ", ".join(f"{n} {r}" for r, n in skipped.most_common())
    resumed = f" ({done_before} shard(s) already there)" if done_before else ""
    print(f"synth: {rendered} rendered, {sum(skipped.values())} skipped{f' ({why})' if why else ''} in {seconds:.1f}s "
          f"-> {out}{resumed}")
    return {"rendered": rendered, "skipped": dict(skipped), "output_dir": str(out), "seconds": seconds}
