"""Every numeric flag of every command has a domain, and a value outside it (given or from an environment
variable) ends at parse time with exit 2 and one `error:` line naming the flag; values that could only fail
once a model is known (LoRA rank, generation length, target modules) are refused before anything is built.
Bad dataset shapes and a non-UTF-8 logging.jsonl get one line too. Every case calls the CLI in-process."""
from __future__ import annotations

import dataclasses
import math
import sys
import typing

import pytest

from ocrtune.args import Domain
from ocrtune.cli.parsing import _base_type
from ocrtune.export.args import ExportArgs
from ocrtune.infer.args import InferArgs
from ocrtune.rl.args import RlhfArgs
from ocrtune.serve.args import ServeArgs
from ocrtune.synth.run import SynthArgs
from ocrtune.webui.args import WebUiArgs
from ocrtune.train.args import SftArgs

COMMANDS = {"sft": SftArgs, "rlhf": RlhfArgs, "infer": InferArgs, "eval": InferArgs, "export": ExportArgs, "serve": ServeArgs,
            "synth": SynthArgs, "web-ui": WebUiArgs}
ENV_NAMES = sorted({f.metadata["env"] for cls in COMMANDS.values() for f in dataclasses.fields(cls) if f.metadata.get("env")})


def numeric_fields(cls) -> list[tuple[dataclasses.Field, type]]:
    hints = typing.get_type_hints(cls)
    return [(f, _base_type(hints[f.name])) for f in dataclasses.fields(cls)
            if _base_type(hints[f.name]) in (int, float)]


class Reached(BaseException):  # not an Exception: main() reports those
    """The command got past parsing: the value was accepted."""


@pytest.fixture
def cli(monkeypatch, capsys):
    """argv -> (exit code, stderr lines); the command itself never runs (the parsed args raise `Reached`)."""
    import ocrtune.cli.main as cli_main
    import ocrtune.cli.parsing as parsing
    real_build = parsing.build
    parser = cli_main._parser()  # built once: building it is most of a call's time, and parsing leaves it as it was
    monkeypatch.setattr(cli_main, "_parser", lambda: parser)

    def build_only(cls, ns):
        real_build(cls, ns)
        raise Reached(cls.__name__)

    monkeypatch.setattr(parsing, "build", build_only)
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)

    def call(argv: list[str]) -> tuple[int, list[str]]:
        capsys.readouterr()
        try:
            cli_main.main(argv)
        except SystemExit as e:
            return e.code, capsys.readouterr().err.splitlines()
        except Reached:
            return "accepted", capsys.readouterr().err.splitlines()
        raise AssertionError("main() returned without exiting")
    return call


def out_of_domain(d: Domain, tp: type) -> list[str]:
    """Values just outside each end, 0 and -1 where they are outside, and the absurd ones."""
    values = {d.lo if d.lo_open else d.lo - 1, d.hi if d.hi_open else d.hi + (1 if tp is int else d.hi * 0.5),
              0, -1, 10**20, -10**20}
    values = {v for v in values if not d.contains(tp(v))}
    below = d.lo - 2  # below the range though `lo - 1` is a special value (save_total_limit 0, max_steps -1)
    values.add(below if not d.contains(below) else d.lo - 3)
    texts = [str(int(v)) if tp is int else repr(float(v)) for v in sorted(values)]
    return texts + ["inf", "-inf", "nan"] + (["1.5"] if tp is int else [])


def one_error(code, err, flag: str) -> str | None:
    if code == 2 and len(err) == 1 and err[0].startswith("error: ") and flag in err[0] and "unexpected" not in err[0]:
        return None
    return f"{flag}: exit {code}, stderr {err}"


def test_every_numeric_flag_has_a_domain_that_holds_its_default():
    missing, bad_default = [], []
    for cmd, cls in COMMANDS.items():
        for f, tp in numeric_fields(cls):
            d = f.metadata.get("domain")
            if d is None:
                missing.append(f"{cmd} --{f.name}")
            elif f.default is not None and not d.contains(f.default):
                bad_default.append(f"{cmd} --{f.name} {f.default}")
            elif d is not None:
                assert math.isfinite(d.lo) and math.isfinite(d.hi) and d.hi < 10**20, (cmd, f.name)
    assert not missing and not bad_default, (missing, bad_default)
    assert len([f for cls in COMMANDS.values() for f in numeric_fields(cls)]) >= 55


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if numeric_fields(COMMANDS[c])])
def test_sweep_every_numeric_flag_refuses_values_outside_its_domain(cli, cmd):
    failures, tried = [], 0
    for f, tp in numeric_fields(COMMANDS[cmd]):
        for value in out_of_domain(f.metadata["domain"], tp):
            code, err = cli([cmd, f"--{f.name}={value}"])
            tried += 1
            problem = one_error(code, err, f"--{f.name}")
            if problem:
                failures.append(f"{cmd} {problem} (value {value})")
    assert tried >= 8 * len(numeric_fields(COMMANDS[cmd]))
    assert not failures, "\n".join(failures[:20])


def test_sweep_environment_variables_go_through_the_same_domains(cli, monkeypatch):
    failures = []
    for cmd, cls in COMMANDS.items():
        for f, tp in numeric_fields(cls):
            if not f.metadata.get("env"):
                continue
            for value in out_of_domain(f.metadata["domain"], tp):
                monkeypatch.setenv(f.metadata["env"], value)
                code, err = cli([cmd])
                monkeypatch.delenv(f.metadata["env"])
                problem = one_error(code, err, f.metadata["env"])
                if problem or f"--{f.name}" not in err[0]:
                    failures.append(f"{cmd} {problem} (value {value})")
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("argv, env, line", [
    (["sft", "--adam_beta2", "2"], {}, "error: --adam_beta2 must be below 1, got 2.0; use a number from 0 to below 1"),
    (["sft", "--num_train_epochs", "inf"], {}, "error: --num_train_epochs must be a finite number, got inf; "
                                               "use a number from 0 to 1000000"),
    (["sft", "--seed", "-1"], {}, "error: --seed must be at least 0, got -1; use a whole number from 0 to 4294967295"),
    (["sft", "--seed", "100000000000000000000"], {},
     "error: --seed must be at most 4294967295, got 100000000000000000000; use a whole number from 0 to 4294967295"),
    (["sft", "--dataloader_num_workers", "-1"], {},
     "error: --dataloader_num_workers must be at least 0, got -1; use a whole number from 0 to 256"),
    (["sft", "--gradient_accumulation_steps", "1000000"], {},
     "error: --gradient_accumulation_steps must be at most 65536, got 1000000; use a whole number from 1 to 65536"),
    (["infer", "--max_new_tokens", "1000000000000"], {},
     "error: --max_new_tokens must be at most 1048576, got 1000000000000; use a whole number from 1 to 1048576"),
    (["infer", "--num_beams", "100000"], {}, "error: --num_beams must be at most 64, got 100000; use a whole number from 1 to 64"),
    (["sft", "--learning_rate", "nan"], {}, "error: --learning_rate must be a finite number, got nan; "
                                            "use a number above 0, up to 10"),
    (["sft"], {"MAX_STEPS": "-5"}, "error: --max_steps must be -1 (off) or at least 1, got -5 from the environment "
                                   "variable MAX_STEPS; use -1 (off) or a whole number from 1 to 1000000000"),
    (["serve"], {"MAX_PIXELS": "10"}, "error: --max_pixels must be at least 3136, got 10 from the environment variable "
                                      "MAX_PIXELS; use a whole number from 3136 to 1073741824"),
])
def test_the_reported_examples_name_the_flag_the_value_and_the_range(cli, monkeypatch, argv, env, line):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert cli(argv) == (2, [line])


def test_values_inside_the_domains_still_parse(cli):
    for argv in (["sft", "--max_steps", "-1", "--save_total_limit", "0", "--seed", "0", "--adam_beta2", "0.999",
                  "--num_train_epochs", "0.5", "--max_steps", "10", "--lora_rank", "64"],
                 ["infer", "--num_beams", "4", "--top_p", "1", "--temperature", "0"],
                 ["serve", "--port", "0"], ["synth", "--max_rows", "0", "--scramble", "1"]):
        assert cli(argv)[0] == "accepted", argv


# ---- values that only the model can bound

@pytest.fixture
def run_cli(monkeypatch, capsys):
    """argv -> (exit code, stderr lines) of the real command, in-process."""
    from ocrtune.cli.main import main
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)

    def call(argv):
        with pytest.raises(SystemExit) as e:
            main(argv)
        return e.value.code, capsys.readouterr().err.splitlines()
    return call


def shape_only_model(tmp_path, positions=32768):
    """A model folder with a config.json alone: enough for every check that runs before the weights load."""
    import json
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2_vl",
                                               "text_config": {"max_position_embeddings": positions}}))
    return str(d)


@pytest.mark.parametrize("cmd", ["infer", "sft"])
def test_max_new_tokens_beyond_the_models_positions_is_refused_before_loading(run_cli, tmp_path, cmd):
    model = shape_only_model(tmp_path, positions=4096)
    extra = ["--query", "hi"] if cmd == "infer" else ["--predict_with_generate", "true", "--output_dir", str(tmp_path / "o")]
    assert run_cli([cmd, "--model", model, "--max_new_tokens", "5000", *extra]) == (2, [
        f"error: --max_new_tokens 5000 exceeds the model's 4096 positions ({model}); use --max_new_tokens 4096 or less"])
    assert not (tmp_path / "o").exists()


def test_serve_passes_its_max_new_tokens_to_the_model_check(tmp_path):
    from ocrtune.errors import UserError
    from ocrtune.serve.loader import load_engine
    model = shape_only_model(tmp_path, positions=4096)
    with pytest.raises(UserError, match="--max_new_tokens 5000 exceeds the model's 4096 positions"):
        load_engine(ServeArgs(model=model, max_new_tokens=5000))


def no_peft(monkeypatch):
    """A `peft` that fails the test when used: the checks come before PEFT allocates anything."""
    import types
    fake = types.ModuleType("peft")
    fake.LoraConfig = fake.get_peft_model = lambda *a, **k: pytest.fail("PEFT was reached")
    monkeypatch.setitem(sys.modules, "peft", fake)


class FakeQwen:
    """Module names and shapes of a Qwen2-VL language model (hidden 128, 2 KV heads of 16), no weights to load."""

    @staticmethod
    def build():
        import torch.nn as nn
        attn = nn.Module()
        attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj = (nn.Linear(128, 128), nn.Linear(128, 32),
                                                              nn.Linear(128, 32), nn.Linear(128, 128))
        layer = nn.Module()
        layer.self_attn, layer.mlp = attn, nn.Module()
        layer.mlp.gate_proj, layer.mlp.down_proj = nn.Linear(128, 256), nn.Linear(256, 128)
        lm = nn.Module()
        lm.layers = nn.ModuleList([layer])
        inner = nn.Module()
        inner.language_model, inner.visual = lm, nn.Module()
        model = nn.Module()
        model.model, model.lm_head = inner, nn.Linear(128, 1000)
        return model


def test_lora_rank_above_the_smallest_target_size_is_refused_before_peft_allocates(monkeypatch):
    from ocrtune.errors import UserError
    from ocrtune.train.model_setup import prepare_model
    no_peft(monkeypatch)
    with pytest.raises(UserError) as e:
        prepare_model(FakeQwen.build(), SftArgs(lora_rank=100000))
    assert str(e.value) == ("--lora_rank 100000 exceeds the size of the target module "
                            "model.language_model.layers.0.self_attn.k_proj (32); use --lora_rank 32 or less "
                            "(or target larger modules with --target_modules)")
    with pytest.raises(UserError, match=r"--lora_rank 129 exceeds .*self_attn\.o_proj \(128\)"):  # only the named targets count
        prepare_model(FakeQwen.build(), SftArgs(lora_rank=129, target_modules=["o_proj"]))


@pytest.mark.parametrize("targets, message", [
    (["qproj"], "--target_modules qproj matches no module of the model; name linear layers, e.g. "
                "down_proj, gate_proj, k_proj, o_proj, q_proj, v_proj, or use all-linear"),
    (["mlp"], "--target_modules mlp matches model.language_model.layers.0.mlp, a Module, which LoRA can't "
              "adapt; name linear layers (e.g. q_proj, v_proj), or use all-linear"),
])
def test_target_modules_that_match_no_linear_layer_are_named(monkeypatch, targets, message):
    from ocrtune.errors import UserError
    from ocrtune.train.model_setup import prepare_model
    no_peft(monkeypatch)
    with pytest.raises(UserError) as e:
        prepare_model(FakeQwen.build(), SftArgs(target_modules=targets))
    assert str(e.value) == message


# ---- dataset shapes: one line naming the file / row and the fix

def write_jsonl(path, rows) -> str:
    import json
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


ASSISTANT = {"role": "assistant", "content": "x^2"}


@pytest.mark.parametrize("messages, reason", [
    (["<image>read it", "x^2"], 'messages[0] is a string, not an object; give a list of {"role": ..., "content": ...} objects'),
    ([{"role": "user", "content": ["<image>read it"]}, ASSISTANT],
     'messages[0].content[0] is a string, not a part such as {"type": "text", "text": ...} or {"type": "image"}; '
     'or give the content as one string'),
    ('[{"role": "user", "content": "x"', "messages is a string that is not valid JSON (Expecting ',' delimiter, char 32); "
                                         'give a list of {"role": ..., "content": ...} objects'),
    (7, 'messages is a number, not a list of {"role": ..., "content": ...} objects'),
])
def test_messages_of_the_wrong_shape_name_the_row_and_the_fix(tmp_path, messages, reason):
    from ocrtune.data.checks import check_dataset
    from ocrtune.data.loading import load_dataset
    from ocrtune.errors import UserError
    good = {"messages": [{"role": "user", "content": "read it"}, ASSISTANT]}
    path = write_jsonl(tmp_path / "d.jsonl", [good, {"messages": messages}] if messages != 7 else [{"messages": messages}])
    row = 1 if messages != 7 else 0
    ds = load_dataset(path)
    with pytest.raises(UserError) as e:
        check_dataset(ds, "error", path)
    assert str(e.value) == (f"row {row} of {path}: {reason}; fix or remove the row, or pass --check_dataset_strategy "
                            "discard to drop bad rows")
    if row:  # discard keeps the good row
        assert len(check_dataset(ds, "discard", path)) == 1


def test_an_empty_jsonl_and_a_folder_with_one_malformed_file_are_named(tmp_path):
    from ocrtune.data.loading import load_dataset
    from ocrtune.errors import UserError
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(UserError) as e:
        load_dataset(str(tmp_path / "empty.jsonl"))
    assert str(e.value) == f"dataset file {tmp_path / 'empty.jsonl'} is empty (0 bytes); give it rows (one JSON object a line for .jsonl)"
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"query": "q", "response": "r"}])
    write_jsonl(folder / "b.jsonl", ['{"query": "q", "resp'])
    with pytest.raises(UserError, match=rf"^could not read dataset file {folder / 'b.jsonl'}: .*; check that the file is valid jsonl$"):
        load_dataset(str(folder))


@pytest.mark.parametrize("count", ["0", "100000000000000000000"])
def test_a_sample_count_of_zero_or_absurd_size_is_refused(count):
    from ocrtune.data.loading import parse_dataset_arg
    from ocrtune.errors import UserError
    with pytest.raises(UserError) as e:
        parse_dataset_arg(f"latex-ocr-sample#{count}")
    assert str(e.value) == (f"row count {count} in --dataset 'latex-ocr-sample#{count}' is out of range; write name#N "
                            "with N from 1 to 1000000000, e.g. latex-ocr-sample#500 (or latex-ocr-sample for every row)")
    assert parse_dataset_arg("latex-ocr-sample#1000000000") == ("latex-ocr-sample", 10**9)


# ---- ocrtune plot over a damaged logging.jsonl

@pytest.mark.parametrize("content, line", [
    (b'{"step": 1, "loss": 2.0}\n{"step": 2, "loss": \xff1.5}\n', "is not UTF-8 text (byte 45 is 0xff)"),
    (b'{"step": 1, "loss": 2.0}\n{"step": 2, "loss": }\n{"step": 3, "loss": 1.0}\n', "line 2 of {log} is not valid JSON"),
    (b'{"step": 1, "loss": 2.0}\n[1, 2]\n', "line 2 of {log} is not a JSON object"),
])
def test_plot_over_a_damaged_logging_jsonl_is_one_line(run_cli, tmp_path, content, line):
    log = tmp_path / "logging.jsonl"
    log.write_bytes(content)
    code, err = run_cli(["plot", str(tmp_path)])
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and line.format(log=log) in err[0], err
    assert log.read_bytes() == content and not (tmp_path / "images").exists()


def test_plot_skips_a_last_line_cut_short_and_records_without_a_step(tmp_path):
    from ocrtune.plot.plots import plot_run
    (tmp_path / "logging.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"loss": 1.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [p.name for p in plot_run(tmp_path)] == ["train_loss.png"]


# ---- found by trying each command with bad inputs

def test_a_bad_log_level_is_one_line(run_cli, monkeypatch):
    monkeypatch.setenv("OCRTUNE_LOG_LEVEL", "loud")
    assert run_cli(["list"]) == (2, ["error: environment variable OCRTUNE_LOG_LEVEL='loud' is not a log level; "
                                     "set it to DEBUG, INFO, WARNING or ERROR, or unset it"])
    from ocrtune.cli.main import log_level
    assert log_level("debug") == 10 and log_level("20") == 20 and log_level(None) == 30


def test_a_host_name_the_resolver_refuses_is_one_line():
    from ocrtune.errors import UserError
    from ocrtune.serve.app import bind
    with pytest.raises(UserError, match=r"^can't resolve --host bad\.\.host: .*; use an IP address such as 127\.0\.0\.1$"):
        bind("bad..host", 0)


def test_report_to_names_what_it_can_do(cli):
    code, err = cli(["sft", "--report_to", "wandb"])
    assert code == 2 and len(err) == 1 and "--report_to: invalid choice: 'wandb'" in err[0], err
    assert cli(["sft", "--report_to", "none"])[0] == "accepted"


def test_the_discard_summary_counts_wrong_shapes_as_one_kind(tmp_path, caplog):
    from ocrtune.data.checks import check_dataset
    from ocrtune.data.loading import load_dataset
    good = {"messages": [{"role": "user", "content": "read it"}, ASSISTANT]}
    path = write_jsonl(tmp_path / "d.jsonl", [good, {"messages": ["a", "b"]}, {"messages": [1]}])
    assert len(check_dataset(load_dataset(path), "discard", path)) == 1
    assert f"{path}: dropped 2 of 3 rows (messages of the wrong shape: 2)" in caplog.text


@pytest.mark.parametrize("env, line", [
    ({"NPROC_PER_NODE": "100000000000000000000"}, "NPROC_PER_NODE=100000000000000000000 is out of range (at most 4096)"),
    ({"NPROC_PER_NODE": "2", "NNODES": "99999", "MASTER_ADDR": "10.0.0.1"}, "NNODES=99999 is out of range (at most 4096)"),
])
def test_launcher_variables_are_bounded(monkeypatch, env, line):
    from ocrtune.errors import UserError
    from ocrtune.train.launch import torchrun_args
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError, match="^" + line.replace("(", r"\(").replace(")", r"\)") + "; set it to"):
        torchrun_args(["sft"])


def test_help_shows_each_numeric_flags_allowed_range():
    from ocrtune.cli.parsing import help_text
    field = {f.name: f for f in dataclasses.fields(SftArgs)}
    assert help_text(field["lora_rank"]) == "LoRA rank (default: 8) (allowed: a whole number from 1 to 65536)"
    assert "(allowed: -1 (off) or a whole number from 1 to 1000000000) (env MAX_STEPS)" in help_text(field["max_steps"])
