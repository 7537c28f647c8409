"""LoRA merge: the merged folder gives the same logits and greedy text as base + adapter, loads with
plain transformers (no ocrtune), and merging is idempotent."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ocrtune.data.registry import OCR_PROMPT
from ocrtune.errors import UserError
from samples import sample_rows, write_png
from tolerance import float32_atol, matmul_stages

MAX_PIXELS = 8 * 28 * 28  # smaller than the samples (280x40): the run's setting must reach the merged processor


@pytest.fixture(scope="module")
def lora_ckpt(tiny_model_dir, tmp_path_factory) -> Path:
    """A short LoRA run on the tiny model so the adapter is far from its zero init."""
    from ocrtune.train.args import SftArgs
    from ocrtune.train.trainer import run_sft
    out = tmp_path_factory.mktemp("export_run")
    result = run_sft(SftArgs(model=str(tiny_model_dir), dataset=["latex-ocr-sample#24"], dataset_test_ratio=0.25,
                             max_steps=20, eval_steps=20, batch_size=4, learning_rate=5e-3, output_dir=str(out),
                             max_pixels=MAX_PIXELS, report_to=["none"]))
    return Path(result["last_model_checkpoint"])


@pytest.fixture(scope="module")
def merged(lora_ckpt) -> Path:
    from ocrtune.export.merge import merge_lora
    return merge_lora(lora_ckpt)


def _engine(ckpt, **kw):
    from ocrtune.infer.args import InferArgs
    from ocrtune.infer.load import load_for_inference
    return load_for_inference(InferArgs(ckpt_dir=str(ckpt), **kw))


def _logits(engine, rows) -> torch.Tensor:
    from ocrtune.data.images import open_image
    from ocrtune.models.template import collate
    enc = [engine.template.encode(r["messages"], [open_image(i) for i in r["images"]]) for r in rows]
    batch = {k: v.to(engine.device) for k, v in collate(enc, engine.tokenizer.pad_token_id).items() if k != "labels"}
    with torch.no_grad():
        return engine.model(**batch).logits.float().cpu(), batch["attention_mask"].bool().cpu()


def test_adapter_is_trained(lora_ckpt):
    from safetensors.torch import load_file
    weights = load_file(lora_ckpt / "adapter_model.safetensors")
    b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert b, "no lora_B weights in the adapter"
    assert all(v.abs().max() > 1e-4 for v in b.values()), "some lora_B stayed at its zero init"


def test_merged_folder_contents(merged, lora_ckpt):
    assert merged == lora_ckpt.parent / f"{lora_ckpt.name}-merged"
    names = {p.name for p in merged.iterdir()}
    for f in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "processor_config.json", "ocrtune_merge.json"):
        assert f in names, f"{f} missing from {sorted(names)}"
    assert not any(n.startswith("adapter") for n in names)
    assert not [p for p in merged.parent.iterdir() if p.name.startswith(f".{merged.name}")], "temp folder left behind"
    from safetensors import safe_open
    with safe_open(merged / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "lora" in k or "base_layer" in k], "weights still hold LoRA modules"
    proc = json.loads((merged / "processor_config.json").read_text())
    assert proc["image_processor"]["size"]["longest_edge"] == MAX_PIXELS


def test_merged_matches_base_plus_adapter(lora_ckpt, merged):
    rows = sample_rows(4)
    lora_engine, lora_info = _engine(lora_ckpt)
    merged_engine, merged_info = _engine(merged)
    assert lora_info["kind"] == "lora" and merged_info["kind"] == "model"
    assert lora_info["dtype"] == merged_info["dtype"] == "float32"
    a, mask = _logits(lora_engine, rows)
    b, _ = _logits(merged_engine, rows)
    assert a.shape == b.shape
    diff = (a - b).abs()[mask].max().item()
    # W + s*B@A rounded once into the merged weight vs. computed apart: float32 rounding of the language
    # model's depth and width, relative to the logits' magnitude (see tests/tolerance.py)
    tol = float32_atol(a[mask], *matmul_stages(merged_engine.model.config))
    assert diff <= tol, f"merged logits differ from base+adapter by {diff} (float32 bound {tol})"
    # the adapter must matter, far beyond that bound, or the comparison above proves nothing
    with lora_engine.model.disable_adapter():
        c, _ = _logits(lora_engine, rows)
    assert (a - c).abs()[mask].max().item() > 100 * tol, "the adapter does not change the logits"
    preds_a = lora_engine.generate(rows, max_new_tokens=24)
    preds_b = merged_engine.generate(rows, max_new_tokens=24)
    assert preds_a == preds_b
    assert any(p for p in preds_a), "the model generated nothing"


def test_merge_is_idempotent_unless_forced(lora_ckpt, merged):
    from ocrtune.export.merge import merge_lora
    weights = merged / "model.safetensors"
    before = weights.stat().st_mtime_ns, weights.stat().st_ino
    assert merge_lora(lora_ckpt) == merged
    assert (weights.stat().st_mtime_ns, weights.stat().st_ino) == before, "merged again without --force"
    assert merge_lora(lora_ckpt, force=True) == merged
    assert (merged / "model.safetensors").stat().st_ino != before[1], "--force did not merge again"
    assert (merged / "config.json").exists()


PLAIN_SCRIPT = textwrap.dedent(r"""
    import json, sys
    sys.modules["ocrtune"] = None  # importing ocrtune from here on fails: prove it is not needed
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    folder, prompt, images = sys.argv[1], sys.argv[2], sys.argv[3:]
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    answers = []
    for image in images:
        inputs = processor(text=[text], images=[Image.open(image).convert("RGB")], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        answers.append(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip())
    print(json.dumps({"answers": answers, "ocrtune_imported": any(m == "ocrtune" or m.startswith("ocrtune.")
                      for m, v in sys.modules.items() if v is not None)}))
""")


def test_merged_loads_with_plain_transformers(lora_ckpt, merged, tmp_path):
    engine, _ = _engine(lora_ckpt)
    pngs = [write_png(row, tmp_path / f"s{i}.png") for i, row in enumerate(sample_rows(3))]
    expected = [engine.generate([{"messages": [{"role": "user", "content": "<image>" + OCR_PROMPT}], "images": [str(p)]}],
                                max_new_tokens=24)[0] for p in pngs]
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, str(script), str(merged), OCR_PROMPT, *map(str, pngs)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["ocrtune_imported"] is False
    assert got["answers"] == expected
    assert any(expected), "the model generated nothing"


def test_infer_merge_lora_flag(lora_ckpt, merged):
    engine, info = _engine(lora_ckpt, merge_lora=True)
    assert info["kind"] == "model" and Path(info["ckpt_dir"]) == merged
    assert not hasattr(engine.model, "peft_config")


def test_export_cli(lora_ckpt, merged, tmp_path, capsys):
    from ocrtune.cli.main import main
    with pytest.raises(SystemExit) as e:
        main(["export", "--ckpt_dir", str(lora_ckpt), "--merge_lora", "true"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == str(merged)
    # a full model folder has nothing to merge; a missing folder is a one-line error, exit 2
    for bad, words in ((merged, "nothing to merge"), (tmp_path / "nope", "does not exist")):
        with pytest.raises(SystemExit) as e:
            main(["export", "--ckpt_dir", str(bad)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and err.count("\n") == 1 and err.startswith("error: ")


def test_export_errors(lora_ckpt, tmp_path):
    from ocrtune.export.merge import merge_lora
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a merged checkpoint"):
        merge_lora(lora_ckpt, occupied)
    assert (occupied / "notes.txt").read_text() == "mine"
    with pytest.raises(UserError, match="inside the checkpoint"):
        merge_lora(lora_ckpt, lora_ckpt / "sub")


def test_stale_merged_folder_from_another_adapter_is_refused(lora_ckpt, merged, tmp_path):
    """The run was resumed and re-saved this step: the merged folder no longer matches its adapter."""
    import shutil
    from ocrtune.export.merge import merge_lora
    from safetensors.torch import load_file, save_file
    ckpt = tmp_path / "run" / lora_ckpt.name
    shutil.copytree(lora_ckpt.parent, tmp_path / "run", ignore=shutil.ignore_patterns("*-merged", "images", "runs"))
    shutil.copytree(merged, tmp_path / "run" / merged.name)
    weights = load_file(ckpt / "adapter_model.safetensors")
    save_file({k: v * 2 for k, v in weights.items()}, ckpt / "adapter_model.safetensors")
    with pytest.raises(UserError, match="merged from a different adapter.*--force true"):
        merge_lora(ckpt)
    with pytest.raises(UserError, match="merged from a different adapter"):
        _engine(ckpt, merge_lora=True)
    out = merge_lora(ckpt, force=True)
    assert json.loads((out / "ocrtune_merge.json").read_text())["adapter_sha256"] != \
        json.loads((merged / "ocrtune_merge.json").read_text())["adapter_sha256"]
    assert merge_lora(ckpt) == out  # now it matches: reused


def test_killed_merge_leftovers_are_removed_but_a_live_one_is_kept(lora_ckpt, merged, tmp_path):
    import fcntl
    from ocrtune.export.merge import merge_lora
    out = tmp_path / "m"
    stale = [tmp_path / ".m-abcd1234", tmp_path / ".m-zz_9y8x7"]  # what mkdtemp left when the export was killed
    for d in stale:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"0" * 1000)
    live = tmp_path / ".m-live0000"
    live.mkdir()
    other = tmp_path / ".mm-abcd1234"  # another target's: not ours to remove
    other.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a concurrent export writing it holds it
    try:
        assert merge_lora(lora_ckpt, out) == out
    finally:
        os.close(fd)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".m-live0000", ".mm-abcd1234", "m"], left
