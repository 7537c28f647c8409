"""`ocrtune infer` (interactive, one-shot, or over a dataset) and `ocrtune eval` (a dataset + OCR metrics).

What `--ckpt_dir` may be, and how the base model is found, is in `ocrtune.checkpoint`; merging is
`ocrtune.export.merge`; device and dtype choice is `ocrtune.models.dtypes.pick_device/pick_dtype`.
"""
from __future__ import annotations

import json
import logging
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from ocrtune.data.images import BadImage, open_image
from ocrtune.data.registry import OCR_PROMPT
from ocrtune.errors import UserError
from ocrtune.infer.args import InferArgs
from ocrtune.models.template import IMAGE_TAG

log = logging.getLogger("ocrtune")

METRIC_CHOICES = ("bleu", "edit_distance", "exact_match", "token_acc", "render")
IMAGE_PROMPT = "Input an image path or URL <<< "
QUERY_PROMPT = "<<< "
EXIT_WORDS = ("exit", "quit")
PROGRESS_EVERY_S = 30.0  # a plain progress line this often when stderr is not a terminal


# ---------------------------------------------------------------- arguments

def validate(args: InferArgs) -> None:
    checks = [
        (args.infer_batch_size >= 1, "--infer_batch_size must be at least 1"),
        (args.max_new_tokens >= 1, "--max_new_tokens must be at least 1"),
        (args.num_beams >= 1, "--num_beams must be at least 1"),
        (args.temperature >= 0, "--temperature must be 0 (greedy) or positive"),
        (0 < args.top_p <= 1, "--top_p must be in (0, 1]"),
        (args.max_pixels is None or args.max_pixels >= 28 * 28 * 4, "--max_pixels must be at least 3136 (4 patches)"),
        (not (args.merge_lora and not args.ckpt_dir), "--merge_lora needs --ckpt_dir (the LoRA checkpoint to merge)"),
        (not (args.image and dataset_mode(args)), "--image (one-shot) and --load_dataset_config/--dataset can't be combined"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message, "see `ocrtune infer --help`")


def dataset_mode(args: InferArgs) -> bool:
    return bool(args.load_dataset_config or args.dataset or args.val_dataset)


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


def _gen_kwargs(args: InferArgs) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "num_beams": args.num_beams}


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


# ---------------------------------------------------------------- loading

def load_for_inference(args: InferArgs):
    """Build the engine for `--ckpt_dir` (LoRA checkpoint, merged/full model folder or run folder) or
    `--model` alone. Returns (InferEngine, info) where info tells what was loaded and the run's settings."""
    from ocrtune.checkpoint import describe, resolve_source
    from ocrtune.infer.engine import InferEngine, pick_device, pick_dtype
    from ocrtune.models.loading import load_model, load_processor, resolve_model, template_name
    from ocrtune.models.template import Template

    device = pick_device()
    dtype = pick_dtype(args.dtype, device)
    adapter = None
    if args.ckpt_dir:
        src = describe(args.ckpt_dir)
        if src.kind == "lora" and args.merge_lora:
            from ocrtune.export.merge import merge_lora
            merged = merge_lora(src.path, force=args.force, model=args.model, model_type=args.model_type)
            print(f"merged model: {merged}", file=sys.stderr)
            src = describe(merged)
        elif args.merge_lora:
            log.warning("--merge_lora: %s is already a full model folder; loading it as is", src.path)
        run_args = src.run_args
        weights_dir, spec, processor_dir, adapter = resolve_source(src, args.model, args.model_type)
        ckpt = src.path
    elif args.model or args.model_type:
        weights_dir, spec = resolve_model(args.model, args.model_type, args.use_hf)
        processor_dir, run_args, ckpt = weights_dir, {}, None
    else:
        raise UserError("no model given", "pass --ckpt_dir output/.../checkpoint-N, or --model (a hub id, folder or preset)")

    template = run_args.get("template") or template_name(weights_dir, spec)
    processor = load_processor(processor_dir)
    tmpl = Template(processor, template, None, run_args.get("system"))
    max_pixels = args.max_pixels or run_args.get("max_pixels")
    tmpl.set_pixels(max_pixels, run_args.get("min_pixels"))
    model = load_model(weights_dir, dtype, device=device)
    if adapter is not None:
        from peft import PeftModel

        from ocrtune.compat import quiet_peft_deprecations
        try:
            with quiet_peft_deprecations():
                model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
        except (ValueError, RuntimeError, KeyError) as e:
            raise UserError(f"the adapter in {adapter} does not fit the base model {weights_dir}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:160]}",
                            "pass the base model it was trained on with --model") from None
    model.eval()
    model.requires_grad_(False)
    for m in (model, getattr(model, "base_model", None)):
        if m is not None and hasattr(m, "config"):
            m.config.use_cache = True
    info = {"kind": "lora" if adapter is not None else ("model" if ckpt else "base"),
            "ckpt_dir": str(ckpt) if ckpt else None, "model_dir": str(weights_dir), "template": template,
            "max_pixels": max_pixels, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "run_args": run_args}
    return InferEngine(model, processor, tmpl), info


# ---------------------------------------------------------------- interactive and one-shot

def _read(prompt: str) -> str | None:
    """One line from the user; None at end of input."""
    try:
        return input(prompt)
    except EOFError:
        print(flush=True)
        return None


def _say_error(message: str) -> None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def _clean_path(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":  # a pasted quoted path
        text = text[1:-1]
    return text


def _answer(engine, record: dict, args: InferArgs) -> str:
    """Stream the answer to stdout token by token (or print it whole for beam search / --stream false)."""
    gen = _gen_kwargs(args)
    if not args.stream or args.num_beams > 1:  # transformers streams only greedy/sampled decoding
        answer = engine.generate([record], **gen)[0]
        print(answer, flush=True)
        return answer
    stop = threading.Event()
    pieces: list[str] = []
    stream = engine.stream(record, stop=stop, **gen)
    try:
        for piece in stream:
            pieces.append(piece)
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        stop.set()
        stream.close()
        print(" [stopped]", end="")
    print(flush=True)
    return "".join(pieces).strip()


def interactive(engine, args: InferArgs) -> None:
    """SWIFT-style loop: `<<< ` query (empty = the OCR prompt), then one image per `<image>` tag (a
    query without a tag asks for one image when the conversation has none yet; empty = no image)."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print("Input `exit` or `quit` to leave, `clear` to start a new conversation. "
          f"An empty query asks '{OCR_PROMPT}'.", flush=True)
    messages: list[dict] = []
    images: list = []
    while True:
        try:
            query = _read(QUERY_PROMPT)
        except KeyboardInterrupt:
            print(flush=True)
            return
        if query is None or query.strip().lower() in EXIT_WORDS:
            return
        query = query.strip()
        if query.lower() == "clear":
            messages, images = [], []
            print("(conversation cleared)", flush=True)
            continue
        if not query:
            query = IMAGE_TAG + OCR_PROMPT
        tags = query.count(IMAGE_TAG)
        wanted = tags or (0 if images else 1)
        new_images, ok = [], True
        for _ in range(wanted):
            try:
                path = _read(IMAGE_PROMPT)
            except KeyboardInterrupt:
                print(flush=True)
                return
            if path is None:
                return
            path = _clean_path(path)
            if not path:
                if tags:
                    _say_error(f"the query has {tags} <image> tag(s): give an image path or URL for each")
                    ok = False
                break  # no tag: the user chose a text-only turn
            try:
                new_images.append(open_image(path))
            except BadImage as e:
                _say_error(e)
                ok = False
                break
        if not ok:
            continue
        if not tags and new_images:
            query = IMAGE_TAG + query
        turn = {"role": "user", "content": query}
        record = {"messages": messages + [turn], "images": images + new_images}
        try:
            answer = _answer(engine, record, args)
        except (BadImage, ValueError) as e:  # e.g. an image the processor refuses
            _say_error(e)
            continue
        messages += [turn, {"role": "assistant", "content": answer}]
        images += new_images


def one_shot(engine, args: InferArgs) -> str:
    query = args.query.strip() if args.query and args.query.strip() else OCR_PROMPT
    images = []
    if args.image:
        try:
            images = [open_image(_clean_path(args.image))]
        except BadImage as e:
            raise UserError(str(e), "check the --image path or URL") from None
        if IMAGE_TAG not in query:
            query = IMAGE_TAG + query
    elif IMAGE_TAG in query:
        raise UserError("--query has an <image> tag but no --image was given", "pass --image PATH_OR_URL")
    if query.count(IMAGE_TAG) > len(images):
        raise UserError(f"--query has {query.count(IMAGE_TAG)} <image> tags but one --image", "use one <image> tag")
    answer = engine.generate([{"messages": [{"role": "user", "content": query}], "images": images}], **_gen_kwargs(args))[0]
    print(answer, flush=True)
    return answer


# ---------------------------------------------------------------- dataset mode

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


def _open_result(path: Path):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "w", encoding="utf-8")
    except OSError as e:
        raise UserError(f"can't write results to {path} ({e.strerror})", "pass a writable --result_path") from None


def token_accuracy(engine, rows: list[dict], batch_size: int) -> dict:
    """Teacher-forced next-token accuracy and loss on the reference answers (training's eval_acc)."""
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
    preds, refs, failed = [], [], 0
    start = time.time()
    with _open_result(path) as out, Progress(len(rows), "infer", every_s=PROGRESS_EVERY_S) as bar:
        for s in range(0, len(rows), args.infer_batch_size):
            chunk = [rows[i] for i in range(s, min(s + args.infer_batch_size, len(rows)))]
            encoded, errors = [], {}
            for j, row in enumerate(chunk):
                try:
                    encoded.append(engine.encode_prompt(row))
                except (BadImage, ValueError) as e:
                    errors[j] = " ".join(str(e).split())
            answers = iter(engine.generate(encoded, **gen) if encoded else [])
            for j, row in enumerate(chunk):
                ref = _reference(row)
                rec = {"index": s + j, "image": _image_label(row), "query": _query(row), "reference": ref}
                if j in errors:
                    failed += 1
                    rec.update(prediction=None, error=errors[j])
                else:
                    pred = next(answers)
                    rec["prediction"] = pred
                    if ref is not None:
                        rec.update({k: round(v, 6) if isinstance(v, float) else v
                                    for k, v in per_row_metrics(pred, ref).items()})
                        if render:
                            rec["render"] = render_match(pred, ref)
                        preds.append(pred)
                        refs.append(ref)
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            out.flush()
            bar.update(len(chunk))
    summary = {}
    if refs:
        names = [m for m in metrics if m != "token_acc"]
        summary.update({k: round(v, 6) if isinstance(v, float) else v for k, v in compute_metrics(preds, refs, names).items()})
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


# ---------------------------------------------------------------- entry points

def run_infer(args: InferArgs):
    """`ocrtune infer`: a dataset (`--load_dataset_config`/`--dataset`), one-shot (`--image`/`--query`),
    or the interactive loop."""
    validate(args)
    _quiet_transformers()
    if dataset_mode(args):
        metrics = parse_metrics(args.metrics)
        engine, info = load_for_inference(args)
        summary = run_dataset(engine, info, args, metrics)
        print(json.dumps(summary, ensure_ascii=False))
        return summary
    engine, info = load_for_inference(args)
    if args.image or args.query:
        return one_shot(engine, args)
    interactive(engine, args)
    return None


def run_eval(args: InferArgs) -> dict:
    """`ocrtune eval`: dataset mode plus `--metrics`; prints a table and writes <results>.jsonl and
    <results>_summary.json. Without a dataset flag it uses the run's own validation split."""
    validate(args)
    if args.image:
        raise UserError("ocrtune eval runs over a dataset, not one --image", "use ocrtune infer --image for one image")
    metrics = parse_metrics(args.metrics)
    if not metrics:
        raise UserError("--metrics is empty", f"pass a comma list of: {', '.join(METRIC_CHOICES)}")
    if not (args.dataset or args.val_dataset or args.load_dataset_config or args.ckpt_dir):
        raise UserError("ocrtune eval needs data", "pass --dataset (or --val_dataset), or a --ckpt_dir from an ocrtune sft run")
    _quiet_transformers()
    engine, info = load_for_inference(args)
    if not (args.dataset or args.val_dataset):
        if not info["run_args"].get("dataset") and not info["run_args"].get("val_dataset"):
            raise UserError("ocrtune eval needs data", "pass --dataset (or --val_dataset), or a --ckpt_dir from an ocrtune sft run")
        args.load_dataset_config = True
    summary = run_dataset(engine, info, args, metrics)
    summary_path = Path(summary["result_path"]).with_name(Path(summary["result_path"]).stem + "_summary.json")
    summary["summary_path"] = str(summary_path)
    summary_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(format_table(summary))
    print(f"dataset: {summary['dataset']}")
    print(f"results: {summary['result_path']}")
    print(f"summary: {summary_path}")
    return summary
