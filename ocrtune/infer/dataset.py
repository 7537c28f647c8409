"""`ocrtune infer`/`ocrtune eval` over a dataset: the rows (the run's own validation split or named datasets),
batched generation with one jsonl line per row, OCR metrics, teacher-forced token accuracy, the summary table."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from ocrtune.data.images import BadImage, open_image
from ocrtune.errors import UserError
from ocrtune.infer.args import InferArgs
from ocrtune.infer.args import gen_kwargs as _gen_kwargs

log = logging.getLogger("ocrtune")

METRIC_CHOICES = ("bleu", "edit_distance", "exact_match", "token_acc", "render", "cdm")
CDM_EVERY = 64  # rows scored by CDM together (one pdflatex run) before their lines are written
PROGRESS_EVERY_S = 30.0  # a plain progress line this often when stderr is not a terminal


def parse_metrics(value: str | None) -> list[str]:
    names = []
    for raw in (value or "").split(","):
        name = raw.strip().lower()
        if name in ("acc", "token_accuracy"):
            name = "token_acc"
        if not name:
            continue
        if name not in METRIC_CHOICES:
            raise UserError(f"unknown metric '{raw.strip()}' in --metrics", f"use a comma list of: {', '.join(METRIC_CHOICES)}")
        if name not in names:
            names.append(name)
    return names


def load_eval_rows(args: InferArgs, info: dict, template=None):
    """(rows, label): the run's own validation split (`--load_dataset_config`, rebuilt exactly as sft
    built it, rows over the run's --max_length dropped as sft dropped them when `template` is given)
    or `--val_dataset`/`--dataset`."""
    from ocrtune.data.checks import check_dataset
    from ocrtune.data.loading import DEFAULT_TEST_RATIO, has_own_validation, load_datasets, validation_data
    if args.load_dataset_config:
        ra = info["run_args"]
        if not (ra.get("dataset") or ra.get("val_dataset")):
            raise UserError("--load_dataset_config needs the training run's args.json (next to the checkpoint)",
                            "pass --ckpt_dir output/<model>/v<N>-<time>/checkpoint-<step>, or choose data with --val_dataset")
        seed, use_hf = ra.get("seed", 42), ra.get("use_hf", True)
        ratio = ra.get("dataset_test_ratio", DEFAULT_TEST_RATIO)  # None: the dataset's own split, as sft chose
        if ra.get("val_dataset"):
            val = load_datasets(ra["val_dataset"], "validation", use_hf, seed)
            label = ", ".join(ra["val_dataset"])
        else:
            train = load_datasets(ra["dataset"], "train", use_hf, seed)
            _, val = validation_data(train, ra["dataset"], None, ratio, use_hf, seed)
            if val is None:
                raise UserError("the training run had no validation split (--dataset_test_ratio 0 and no --val_dataset)",
                                "choose the data with --val_dataset or --dataset")
            label = (f"validation split of {', '.join(ra['dataset'])}" if ratio is None and has_own_validation(ra["dataset"])
                     else f"validation split of {', '.join(ra['dataset'])} (ratio {ratio or DEFAULT_TEST_RATIO}, seed {seed})")
        run_template = None
        if template is not None and ra.get("max_length"):  # the run's length limit and image sizes
            from ocrtune.models.template import Template
            run_template = Template(template.processor, template.template, ra["max_length"], ra.get("system"))
        return check_dataset(val, ra.get("check_dataset_strategy", "warning"), "validation data",
                             template=run_template), label
    names = list(args.val_dataset or []) + list(args.dataset or [])
    return load_datasets(names, args.split, args.use_hf, args.seed), ", ".join(names)


def _reference(row: dict) -> str | None:
    msgs = row["messages"]
    return msgs[-1]["content"] if msgs and msgs[-1]["role"] == "assistant" else None


def _query(row: dict) -> str:
    users = [m["content"] for m in row["messages"] if m["role"] == "user"]
    return users[-1] if users else ""


def _image_label(row: dict) -> str | None:
    refs = row.get("images") or []
    paths = [r.get("path") for r in refs if r.get("path") and not str(r.get("path")).startswith("<invalid")]
    return paths[0] if len(paths) == 1 else (paths or None)


def _result_path(args: InferArgs, info: dict) -> Path:
    if args.result_path:
        return Path(args.result_path).expanduser()
    base = Path(info["ckpt_dir"]) if info.get("ckpt_dir") else Path.cwd()
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    path, n = base / "infer_result" / f"{stamp}.jsonl", 1
    while path.exists():  # two runs in the same second
        path, n = base / "infer_result" / f"{stamp}-{n}.jsonl", n + 1
    return path


def summary_path_for(path: Path) -> Path:
    return Path(path).with_name(Path(path).stem + "_summary.json")


def _open_result(path: Path, keep: int = 0):
    """The result file for appending after its first `keep` bytes (the lines an earlier run finished)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if keep:
            os.truncate(path, keep)
            return open(path, "a", encoding="utf-8")
        return open(path, "w", encoding="utf-8")
    except OSError as e:
        raise UserError(f"can't write results to {path} ({e.strerror})", "pass a writable --result_path") from None


def row_key(row: dict) -> str:
    """What a result line answers: a hash of the row's images (bytes, else path) and its query."""
    h = hashlib.sha256()
    for ref in row.get("images") or []:
        data = ref.get("bytes") if isinstance(ref, dict) else None
        h.update(data if data else str(ref.get("path") if isinstance(ref, dict) else ref).encode())
        h.update(b"\0")
    h.update(_query(row).encode())
    return h.hexdigest()[:16]


def setup_key(info: dict, args: InferArgs) -> str:
    """Who answered: the checkpoint/model (its weight files' sizes and times) and the generation settings."""
    folders = [Path(p) for p in (info.get("ckpt_dir"), info.get("model_dir")) if p]
    weights = sorted((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns)
                     for d in folders if d.is_dir() for f in d.glob("*.safetensors"))
    key = {"folders": [str(d.resolve()) for d in folders], "weights": weights, "gen": _gen_kwargs(args),
           "max_pixels": info.get("max_pixels"), "seed": args.seed if args.temperature > 0 else None}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_done(path: Path, rows, setup: str) -> tuple[list[dict], int, bool]:
    """(the lines of an earlier, killed run over the same rows and model, the bytes they take, whether a
    half-written last line was dropped). Anything else in the file is refused: it is never overwritten."""
    if not path.exists():
        return [], 0, False
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"can't read the existing results {path} ({e.strerror})", "pass another --result_path") from None
    *lines, tail = data.split(b"\n")
    done, end = [], 0
    for i, raw in enumerate(lines):
        why = _not_ours(raw, i, rows, setup)
        if why:
            raise UserError(f"--result_path {path} already holds other results (line {i + 1}: {why}); it is left as it is",
                            "pass another --result_path, or delete that file to start over")
        done.append(json.loads(raw))
        end += len(raw) + 1
    half = bool(tail)
    if half and not tail.startswith(b'{"index": '):  # not a line this command began: not ours to cut
        raise UserError(f"--result_path {path} already exists and is not a result file of ocrtune infer/eval",
                        "pass another --result_path, or delete that file")
    return done, end, half


def _not_ours(raw: bytes, i: int, rows, setup: str) -> str | None:
    try:
        rec = json.loads(raw)
    except ValueError:
        return "not a result line"
    if not isinstance(rec, dict) or rec.get("index") != i:
        return "not a result line of row %d" % i
    if i >= len(rows) or rec.get("input_sha") != row_key(rows[i]):
        return f"row {i} was another image or query (another dataset)"
    if rec.get("setup") != setup:
        return "written by another model, checkpoint or generation settings"
    return None


def check_outputs(paths, args: InferArgs, info: dict) -> None:
    """No result file may be one of the datasets it reads, or lie in a dataset folder."""
    from ocrtune.data.fingerprint import dataset_paths
    from ocrtune.fileio import check_not_input
    ra = info.get("run_args") or {}
    values = list(args.val_dataset or []) + list(args.dataset or [])
    if args.load_dataset_config:
        values += list(ra.get("val_dataset") or []) + list(ra.get("dataset") or [])
    inputs = [(f"the dataset {v}", p) for v, p in dataset_paths(values)]
    for path in paths:
        check_not_input("--result_path", path, inputs)


def token_accuracy(engine, rows: list[dict], batch_size: int) -> dict:
    """Teacher-forced next-token accuracy and loss on the reference answers (training's eval_acc): the
    training loss module's counts (`evaluate.metrics.argmax_hits` over the response tokens)."""
    import torch

    from ocrtune.models.template import collate
    from ocrtune.train.loss import ResponseLoss
    loss_fn = ResponseLoss(engine.model)
    dtype = next(engine.model.parameters()).dtype
    loss = n = correct = 0
    encoded = []

    def flush():
        nonlocal loss, n, correct
        if not encoded:
            return
        batch = collate(encoded, engine.tokenizer.pad_token_id)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        with torch.no_grad():
            lsum, k, c = loss_fn(**batch)
        loss, n, correct = loss + float(lsum), n + int(k), correct + int(c)
        encoded.clear()

    for row in rows:
        try:
            images = [open_image(r) for r in row.get("images") or []]
            encoded.append(engine.template.encode(row["messages"], images))
        except (BadImage, ValueError):
            continue
        if len(encoded) >= batch_size:
            flush()
    flush()
    return {"token_acc": correct / n if n else 0.0, "loss": loss / n if n else 0.0}


def check_metric_tools(metrics: list[str], args: InferArgs) -> None:
    """Before any model is loaded: the tools a metric needs (cdm: a working pdflatex)."""
    if "cdm" in metrics:
        from ocrtune.evaluate.cdm import check_tex
        check_tex(args.tex_root)


def _score_cdm(held: list[dict], tex_root: str | None) -> None:
    """Per-row CDM F1 into the held records that have a prediction and a reference."""
    from ocrtune.evaluate.cdm import cdm_scores
    rows = [rec for rec in held if rec.get("prediction") is not None and rec.get("reference") is not None]
    for rec, score in zip(rows, cdm_scores([r["prediction"] for r in rows], [r["reference"] for r in rows], tex_root)):
        rec["cdm"] = round(score, 6)


def _all_cdm(preds: list[str], refs: list[str], cdms: list, tex_root: str | None) -> list[float]:
    """Every row's CDM: the ones scored, and the rows an earlier run without cdm answered scored now."""
    from ocrtune.evaluate.cdm import cdm_scores
    missing = [i for i, c in enumerate(cdms) if c is None]
    for i, score in zip(missing, cdm_scores([preds[i] for i in missing], [refs[i] for i in missing], tex_root)):
        cdms[i] = score
    return cdms


def run_dataset(engine, info: dict, args: InferArgs, metrics: list[str]) -> dict:
    """Generate over the dataset in batches; write one jsonl line per row; return the summary."""
    import torch

    from ocrtune.evaluate.metrics import compute_metrics, per_row_metrics
    from ocrtune.infer.progress import Progress
    rows, label = load_eval_rows(args, info, engine.template)
    if len(rows) == 0:
        raise UserError(f"dataset {label} has no rows", "choose other data with --val_dataset or --dataset")
    path = _result_path(args, info)
    if args.temperature > 0:
        torch.manual_seed(args.seed)
    gen = _gen_kwargs(args)
    render = "render" in metrics
    if render:
        from ocrtune.evaluate.render import render_match
    check_outputs([path, summary_path_for(path)], args, info)
    setup = setup_key(info, args)
    done, end, half = read_done(path, rows, setup)
    preds, refs, cdms, failed = [], [], [], 0  # cdms: per-row CDM of preds (None: not scored yet)
    for rec in done:  # an earlier run's answers count as if given now
        if rec.get("prediction") is None:
            failed += 1
        elif rec.get("reference") is not None:
            preds.append(rec["prediction"])
            refs.append(rec["reference"])
            cdms.append(rec.get("cdm"))
    if done or half:
        print(f"continuing {path}: kept {len(done)} of {len(rows)} rows already answered"
              + (", dropped a half-written last line" if half else ""), file=sys.stderr)
    start = time.time()
    # the engine sorts rows by length, encodes ahead in threads and answers batch by batch out of
    # order; lines are written in row order as soon as every row before them is answered
    answers: dict[int, object] = {}
    first = written = len(done)
    todo = rows if not first else [] if first == len(rows) else \
        rows.select(range(first, len(rows))) if hasattr(rows, "select") else rows[first:]
    held: list[dict] = []  # with cdm: lines waiting for their score

    def write(recs: list[dict]) -> None:
        if "cdm" in metrics:
            _score_cdm(recs, args.tex_root)
            cdms.extend(rec["cdm"] for rec in recs if "cdm" in rec)
        for rec in recs:
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        recs.clear()

    with _open_result(path, end) as out, Progress(len(todo), "infer", every_s=PROGRESS_EVERY_S) as bar:
        for i, answer in (engine.iter_answers(todo, args.infer_batch_size, **gen) if len(todo) else ()):
            answers[first + i] = answer
            bar.update(1)
            while written in answers:
                row, res = rows[written], answers.pop(written)
                ref = _reference(row)
                rec = {"index": written, "image": _image_label(row), "query": _query(row), "reference": ref}
                if isinstance(res, BaseException):
                    failed += 1
                    rec.update(prediction=None, error=" ".join(str(res).split()))
                else:
                    pred = res.text
                    rec["prediction"] = pred
                    if ref is not None:
                        rec.update({k: round(v, 6) if isinstance(v, float) else v
                                    for k, v in per_row_metrics(pred, ref).items()})
                        if render:
                            rec["render"] = render_match(pred, ref)
                        preds.append(pred)
                        refs.append(ref)
                rec.update(input_sha=row_key(row), setup=setup)  # what a continued run checks
                held.append(rec)
                written += 1
            if "cdm" not in metrics or len(held) >= CDM_EVERY or written == len(rows):
                write(held)
            out.flush()
        write(held)
    summary = {}
    if refs:
        names = [m for m in metrics if m not in ("token_acc", "cdm")]
        summary.update({k: round(v, 6) if isinstance(v, float) else v for k, v in compute_metrics(preds, refs, names).items()})
        if "cdm" in metrics:
            from ocrtune.evaluate.cdm import cdm_summary
            summary.update({k: round(v, 6) for k, v in cdm_summary(_all_cdm(preds, refs, cdms, args.tex_root)).items()})
        if "token_acc" in metrics:
            tf = token_accuracy(engine, [r for r in rows if _reference(r) is not None], args.infer_batch_size)
            summary.update({k: round(v, 6) for k, v in tf.items()})
    summary.update({"count": len(refs), "rows": len(rows), "failed_rows": failed, "dataset": label,
                    "ckpt_dir": info.get("ckpt_dir"), "model_dir": info.get("model_dir"),
                    "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "num_beams": args.num_beams,
                    "seconds": round(time.time() - start, 2), "result_path": str(path)})
    if failed:
        log.warning("%d of %d rows could not be read and were left out of the metrics (see 'error' in %s)",
                    failed, len(rows), path)
    return summary


def format_table(summary: dict) -> str:
    keys = [k for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in ("max_new_tokens", "temperature", "num_beams", "seconds")]
    width = max(len(k) for k in keys) if keys else 6
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for k in keys:
        v = summary[k]
        lines.append(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return "\n".join(lines)
