"""The bundled formula reader: scripts/package_reader.py packs a model folder in 8 bits, `ocrtune.models.reader`
checks and restores it, and `--model ocrtune-reader` loads it. The tiny preset stands in for the trained weights,
except in the tests of the shipped package itself (its figures, its size, the defaults that load it)."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from ocrtune.errors import UserError
from ocrtune.models import reader
from samples import sample_rows, write_png

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "package_reader.py"
# 8-bit tolerance of the restored tiny model's logits, relative L2 (||restored - original|| / ||original||). Each
# weight is off by at most half its row's scale (max |w| / 254, checked exactly below), about 0.7% of a tensor's norm;
# the tiny preset's random weights (initializer range 0.1) amplify that through 4 layers to 3.5% measured.
LOGITS_REL_TOL = 0.06


def packer():
    spec = importlib.util.spec_from_file_location("package_reader", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def package(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reader") / "pkg"
    assert packer()(["--model", str(tiny_model_dir), "--output", str(out)]) == 0
    return out


@pytest.fixture
def use_package(package, monkeypatch) -> Path:
    monkeypatch.setenv(reader.ENV, str(package))
    return package


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return write_png(sample_rows(1)[0], tmp_path_factory.mktemp("reader_img") / "formula.png")


def cli_error(capsys, argv) -> str:
    from ocrtune.cli.main import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


def tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_package_files_and_sizes(package, tiny_model_dir):
    """int8 weights about a quarter of float32, float16 for small tensors, a manifest hash for every file."""
    from safetensors import safe_open
    manifest = json.loads((package / reader.MANIFEST).read_text())
    assert manifest["format_version"] == reader.FORMAT_VERSION and manifest["weights"] == [reader.WEIGHTS]
    assert set(manifest["files"]) == {p.name for p in package.iterdir()} - {reader.MANIFEST}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == reader.sha256(package / name) and entry["bytes"] == (package / name).stat().st_size
    ratio = (package / reader.WEIGHTS).stat().st_size / (tiny_model_dir / "model.safetensors").stat().st_size
    assert 0.24 < ratio < 0.30, ratio
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        original = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(package / reader.WEIGHTS), "pt") as f:
        packed = {k: f.get_tensor(k) for k in f.keys()}
    assert manifest["parameters"] == sum(t.numel() for t in original.values())
    assert "lm_head.weight" not in packed  # tied: stored once, as the embeddings
    for name, t in original.items():
        big = t.dim() >= 2 and t.numel() >= reader.QUANT_MIN_ELEMENTS
        assert str(packed[name].dtype) == ("torch.int8" if big else "torch.float16"), name
        assert (name + reader.SCALE in packed) == big
    assert str(packed["model.embed_tokens.weight:scale"].dtype) == "torch.float16"
    for name in ("chat_template.jinja", "tokenizer.json", "processor_config.json", "config.json"):
        assert (package / name).read_bytes() == (tiny_model_dir / name).read_bytes()


def test_keep_float16_by_name(tiny_model_dir, tmp_path):
    out = tmp_path / "pkg"
    assert packer()(["--model", str(tiny_model_dir), "--output", str(out), "--keep_float16", r"embed_tokens|\.mlp\.fc1"]) == 0
    from safetensors import safe_open
    with safe_open(str(out / reader.WEIGHTS), "pt") as f:
        dtypes = {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert dtypes["model.embed_tokens.weight"] == dtypes["visual.blocks.1.mlp.fc1.weight"] == "F16"
    assert "model.embed_tokens.weight:scale" not in dtypes and dtypes["visual.blocks.1.mlp.fc2.weight"] == "I8"


def test_restored_model_matches_within_8_bits(use_package, tiny_model_dir, tmp_path):
    """Every weight within half a quantization step, the logits within LOGITS_REL_TOL; a second call reuses the folder."""
    import torch
    from safetensors import safe_open

    from ocrtune.models.loading import load_model, resolve_model
    path, spec = resolve_model("ocrtune-reader")
    assert spec.name == "ocrtune-reader" and path.name.startswith("ocrtune-reader-")
    assert (path / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        original = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        restored = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(use_package / reader.WEIGHTS), "pt") as f:
        scales = {k[:-len(reader.SCALE)]: f.get_tensor(k).float() for k in f.keys() if k.endswith(reader.SCALE)}
    assert restored.keys() == original.keys() and len(scales) == 26
    for name, w in original.items():
        err = (restored[name] - w).abs()
        assert restored[name].dtype == torch.float32
        if name in scales:
            step = scales[name].reshape(-1, *[1] * (w.dim() - 1))
            assert bool((err <= step * 0.5001).all()), name
        else:
            assert float(err.max()) <= float(w.abs().max()) * 2**-10, name  # float16
    torch.manual_seed(0)
    ids = torch.randint(10, 600, (2, 40))
    with torch.no_grad():
        a, b = load_model(tiny_model_dir)(input_ids=ids).logits, load_model(path)(input_ids=ids).logits
    rel = float((a - b).norm() / a.norm())
    assert 0 < rel < LOGITS_REL_TOL, rel
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) >= 0.9
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("ocrtune-reader")[0] == path and (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_shards_restore_the_same_weights(tiny_model_dir, tmp_path, monkeypatch, use_package):
    from safetensors.torch import load_file
    out = tmp_path / "sharded"
    assert packer()(["--model", str(tiny_model_dir), "--output", str(out), "--shard_mb", "0.25"]) == 0
    manifest = json.loads((out / reader.MANIFEST).read_text())
    shards = manifest["weights"]
    assert len(shards) == 3 and shards[0] == "model-00001-of-00003.int8.safetensors" and manifest["index"] == reader.INDEX
    assert not (out / reader.WEIGHTS).exists()
    assert all((out / s).stat().st_size <= 0.25 * 2**20 + 16384 for s in shards)
    first = reader.restore_reader(cache=tmp_path / "c1")
    one = load_file(str(first / "model.safetensors"))
    monkeypatch.setenv(reader.ENV, str(out))
    restored = reader.restore_reader(cache=tmp_path / "c2")
    assert restored.parent == tmp_path / "c2" / "models" and restored.name != first.name  # another manifest
    two = load_file(str(restored / "model.safetensors"))
    assert one.keys() == two.keys() and all(bool((one[k] == two[k]).all()) for k in one)


def test_flipped_byte_names_the_file(package, tmp_path, monkeypatch, capsys, image):
    bad = tmp_path / "bad"
    shutil.copytree(package, bad)
    weights = bad / reader.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    monkeypatch.setenv(reader.ENV, str(bad))
    monkeypatch.setenv("OCRTUNE_CACHE", str(tmp_path / "cache"))
    err = cli_error(capsys, ["infer", "--model", "ocrtune-reader", "--image", str(image)])
    assert err == (f"error: reader package file {weights} does not match its manifest (sha256 differs: damaged or "
                   f"replaced); package the reader again (scripts/package_reader.py), or unset {reader.ENV}")
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())
    monkeypatch.delenv(reader.ENV)  # the installed package's folder: the fix is a reinstall
    monkeypatch.setattr(reader, "reader_dir", lambda: bad)
    with pytest.raises(UserError, match=r"does not match its manifest .*; reinstall ocrtune \(pip install --force-reinstall"):
        reader.restore_reader(cache=tmp_path / "cache")


def test_damaged_manifest(package, tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    shutil.copytree(package, bad)
    monkeypatch.setenv(reader.ENV, str(bad))
    manifest = json.loads((bad / reader.MANIFEST).read_text())
    (bad / reader.MANIFEST).write_text(json.dumps(manifest)[:-20])
    with pytest.raises(UserError, match=r"^reader manifest .*reader.json is damaged \(JSONDecodeError\); package the reader"):
        reader.restore_reader(cache=tmp_path / "c")
    del manifest["files"][reader.WEIGHTS]  # weights whose sha256 nobody holds are not read
    (bad / reader.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"is damaged \(not a complete ocrtune-reader manifest\)"):
        reader.restore_reader(cache=tmp_path / "c")
    (bad / reader.MANIFEST).write_text(json.dumps({**json.loads((package / reader.MANIFEST).read_text()), "format_version": 9}))
    with pytest.raises(UserError, match=r"has format version 9, newer than this ocrtune reads \(1\); upgrade ocrtune$"):
        reader.restore_reader(cache=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_no_package_is_one_line(tmp_path, monkeypatch, capsys, image):
    empty = tmp_path / "reader_weights"
    empty.mkdir()
    monkeypatch.setenv(reader.ENV, str(empty))
    err = cli_error(capsys, ["infer", "--model", "ocrtune-reader", "--image", str(image)])
    assert err == (f"error: the formula reader is not bundled in this install (no reader.json in {empty}); pass another "
                   f"--model (tiny, a hub id or a model folder), or set {reader.ENV} to a reader package folder "
                   "(scripts/package_reader.py writes one)")


def test_packer_refusals(tiny_model_dir, tmp_path, capsys):
    main, before = packer(), tree(tiny_model_dir)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    cases = [
        (["--output", str(taken)], f"error: --output {taken} exists and is not empty; choose a new folder, or empty this one"),
        (["--output", str(tiny_model_dir / "pkg")],
         f"error: --output {tiny_model_dir / 'pkg'} lies inside --model {tiny_model_dir}, which this command reads; "
         "writing there would destroy it; choose another --output"),
        (["--output", str(tmp_path / "big"), "--max_mb", "0.6"],
         "error: the package would be 0.7 MB, over --max_mb 0.6; package a smaller model, or raise --max_mb"),
    ]
    for extra, line in cases:
        assert main(["--model", str(tiny_model_dir), *extra]) == 2, extra
        assert capsys.readouterr().err == line + "\n"
    assert main(["--model", str(taken), "--output", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --model {taken} is not a model folder (no config.json, ")
    assert tree(tiny_model_dir) == before and tree(taken) == {"keep.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no package, no temp folder left


def test_infer_with_the_reader(use_package, image, capsys):
    """`ocrtune infer --model ocrtune-reader --image X` answers as the restored folder does when named directly."""
    from ocrtune.cli.main import main
    from ocrtune.infer.args import InferArgs
    from ocrtune.infer.cli import run_infer
    from ocrtune.models.loading import resolve_model
    with pytest.raises(SystemExit) as e:
        main(["infer", "--model", "ocrtune-reader", "--image", str(image), "--max_new_tokens", "6"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.strip()
    direct = run_infer(InferArgs(model=str(resolve_model("ocrtune-reader")[0]), image=str(image), max_new_tokens=6))
    assert out == capsys.readouterr().out == direct + "\n"


def test_default_model_of_every_command_is_the_reader(use_package):
    """No model given: infer/eval/serve load the reader, sft/rlhf train it (DEFAULT_MODEL)."""
    from ocrtune.infer.args import InferArgs
    from ocrtune.infer.load import load_for_inference
    from ocrtune.models import registry
    from ocrtune.models.loading import resolve_model
    from ocrtune.serve.args import ServeArgs
    from ocrtune.serve.loader import default_model_name
    assert registry.DEFAULT_MODEL == "ocrtune-reader"
    engine, info = load_for_inference(InferArgs())
    assert info["model_dir"] == str(resolve_model("ocrtune-reader")[0]) == str(resolve_model(None)[0])
    assert info["kind"] == "base" and default_model_name(ServeArgs()) == "ocrtune-reader"


# ---------------------------------------------------------------- the shipped package
SHIPPED = Path(reader.__file__).parent / "reader_weights"
# BLEU-4 of the shipped weights on the package's 24 print validation rows (latex-ocr-sample-print), greedy, float32 on
# the CPU, as the model card states it; a damaged, swapped or retrained weight file moves it
SHIPPED_SAMPLE_PRINT_BLEU4 = 0.7346


def test_shipped_package_is_whole_and_within_its_size():
    manifest = json.loads((SHIPPED / reader.MANIFEST).read_text())
    total = sum((SHIPPED / name).stat().st_size for name in manifest["files"]) + (SHIPPED / reader.MANIFEST).stat().st_size
    assert total <= 40_000_000 and manifest["parameters"] == 32_302_080
    reader.check_package(SHIPPED, manifest)  # every file's sha256
    card = manifest["card"]
    assert card["print_bleu4"] >= 0.69 and card["eval_rows"] == {"print": 1000, "handwrite": 100}


def test_shipped_reader_reads_the_bundled_print_rows_at_its_stated_bleu(tmp_path, monkeypatch):
    from ocrtune.infer.cli import run_eval
    from ocrtune.infer.args import InferArgs
    monkeypatch.delenv(reader.ENV, raising=False)
    summary = run_eval(InferArgs(model="ocrtune-reader", val_dataset=["latex-ocr-sample-print"],
                                 metrics="bleu,exact_match", result_path=str(tmp_path / "r.jsonl")))
    assert summary["count"] == 24 and summary["failed_rows"] == 0
    assert abs(summary["bleu4"] - SHIPPED_SAMPLE_PRINT_BLEU4) <= 0.02, summary
