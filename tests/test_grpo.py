"""`ocrtune rlhf --rlhf_type grpo`: the loss against a hand computation, a tiny model that learns a reward, exact
resume, the bad flags' one-line errors, and no reference forward at --beta 0."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ocrtune.errors import UserError
from ocrtune.rl import rewards as rw
from ocrtune.rl.grpo import grpo_loss, group_advantages

PLUGIN = '''
def has_o(completions, solutions, **kwargs):
    return [1.0 if "o" in c else 0.0 for c in completions]

def wrong_length(completions, solutions, **kwargs):
    return [1.0]
'''
# a text-only prompt keeps the tiny model's steps short (no vision tower); about a third of its 4-token samples
# contain an "o" at first (a tenth of its 679 tokens do)
ROWS = [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}], "images": []}] * 4


# ---------------------------------------------------------------- (1) the loss, by hand
def test_loss_equals_the_hand_computed_grpo_loss():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -4.0]])
    old = torch.tensor([[-1.5, -1.9, -0.5], [-0.3, -0.2, -3.0]])
    ref = torch.tensor([[-1.1, -2.5, -0.4], [-0.6, -1.0, -9.0]])
    adv = torch.tensor([0.7, -1.3])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    eps, beta = 0.2, 0.04

    def token_loss(b, t):
        ratio = math.exp(logp[b, t] - old[b, t])
        a = float(adv[b])
        surrogate = min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
        d = float(ref[b, t] - logp[b, t])
        return -surrogate + beta * (math.exp(d) - d - 1)

    kept = [(b, t) for b in range(2) for t in range(3) if mask[b, t]]
    dapo = sum(token_loss(b, t) for b, t in kept) / len(kept)
    per_seq = [sum(token_loss(b, t) for t in range(3) if mask[b, t]) / int(mask[b].sum()) for b in range(2)]
    for loss_type, want in (("dapo", dapo), ("bnpo", dapo), ("grpo", sum(per_seq) / 2)):
        loss, stats = grpo_loss(logp, old, ref, adv, mask, eps, beta, loss_type)
        assert loss.item() == pytest.approx(want, rel=1e-6), loss_type
    # ratios exp(0.5) (row 0, A > 0) and exp(-1.0) (row 1, A < 0) sit outside [0.8, 1.2] on their clipped side
    assert stats["clip_ratio"] == pytest.approx(2 / 5)
    kl = sum(math.exp(float(ref[b, t] - logp[b, t])) - float(ref[b, t] - logp[b, t]) - 1 for b, t in kept) / 5
    assert stats["kl"] == pytest.approx(kl, rel=1e-6)
    # dapo over a whole step: the sum divided by the step's tokens, not this batch's
    loss, _ = grpo_loss(logp, old, ref, adv, mask, eps, beta, "dapo", num_tokens=10)
    assert loss.item() == pytest.approx(dapo * 5 / 10, rel=1e-6)
    # beta 0: no reference needed, no KL
    loss, stats = grpo_loss(logp, old, None, adv, mask, eps, 0.0)
    assert stats["kl"] is None
    assert loss.item() == pytest.approx(sum(token_loss(b, t) - beta * (math.exp(float(ref[b, t] - logp[b, t]))
                                                                        - float(ref[b, t] - logp[b, t]) - 1)
                                            for b, t in kept) / 5, rel=1e-6)


def test_on_policy_gradient_is_the_advantage_weighted_score():
    """ratio 1 (old = current, detached): d loss / d logp = -A / tokens on each completion token."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    adv, mask = torch.tensor([2.0, -1.0]), torch.ones(2, 2, dtype=torch.bool)
    loss, stats = grpo_loss(logp, logp.detach(), None, adv, mask, 0.2, 0.0)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-2.0, -2.0], [1.0, 1.0]]) / 4)
    assert stats["clip_ratio"] == 0.0


def test_group_advantages_are_normalized_per_group():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv, std = group_advantages(r, 4)
    s = math.sqrt(sum((x - 0.5) ** 2 for x in (1, 0, 0, 1)) / 3)  # unbiased, as TRL's
    assert adv[:4].tolist() == pytest.approx([0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.5 / (s + 1e-4)])
    assert adv[4:].tolist() == [0.0] * 4  # a tied group teaches nothing
    assert std.tolist() == pytest.approx([s] * 4 + [0.0] * 4)


def test_builtin_rewards_and_a_wrong_length():
    out = rw.score(rw.resolve(["edit_distance", "exact", "bleu"], [1, 2, 3], None), [r"x^{2}", "y"], [r"x ^ {2}", "z"])
    assert out[0] == [1.0, 0.0] and out[1] == [1.0, 0.0]
    assert out[2][0] == pytest.approx(1.0) and out[2][1] < 0.5
    bad = [rw.Reward("short", lambda c, s, **k: [1.0], 1.0)]
    with pytest.raises(UserError, match="reward short returned 1 values for 2 completions"):
        rw.score(bad, ["a", "b"], ["a", "b"])
    with pytest.raises(UserError, match="^reward boom failed: ZeroDivisionError: division by zero; fix the reward function$"):
        rw.score([rw.Reward("boom", lambda c, s, **k: [1 / 0], 1.0)], ["a"], ["a"])


def test_plugin_conventions(tmp_path):
    """Public functions by name, and ms-swift's `orms` registry (a class instantiated)."""
    path = tmp_path / "plug.py"
    path.write_text(PLUGIN + "\nclass Length:\n    def __call__(self, completions, solution, **kw):\n"
                    "        return [float(len(c)) for c in completions]\n\norms = {'length': Length}\n")
    found = rw.load_plugins([str(path)])
    assert {"has_o", "wrong_length", "length"} <= set(found)
    assert found["length"](["ab", "c"], ["", ""]) == [2.0, 1.0]
    assert found["has_o"](["foo", "bar"], ["", ""]) == [1.0, 0.0]


# ---------------------------------------------------------------- runs of the tiny model
def grpo_args(tmp_path, model_dir, **kw):
    from ocrtune.rl.args import RlhfArgs
    plugin = tmp_path / "plug.py"
    plugin.write_text(PLUGIN)
    base = dict(model=str(model_dir), batch_size=8, num_generations=8, max_completion_length=4, learning_rate=2e-2,
                warmup_ratio=0.0, lr_scheduler_type="constant", logging_steps=1, report_to=["none"],
                output_dir=str(tmp_path / "out"), gradient_checkpointing=False, reward_funcs=["has_o"],
                external_plugins=[str(plugin)], seed=5)
    return RlhfArgs(**{**base, **kw})


def forwards_counted(run) -> list:
    calls = []
    run.loss_module.register_forward_hook(lambda *a: calls.append(1))
    return calls


def log_of(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "logging.jsonl").read_text().splitlines()]


def test_tiny_model_learns_a_plugin_reward_without_reference_forwards(tmp_path, tiny_model_dir):
    """(2) the reward 'the completion contains an o' rises within a dozen steps; (5) --beta 0: one forward a step
    (the policy's), never the reference's."""
    from ocrtune.rl.grpo import GrpoRun
    from ocrtune.train.data import rows_data
    run = GrpoRun(grpo_args(tmp_path, tiny_model_dir, max_steps=12, beta=0.0, lora_dropout=0.0, save_steps=100),
                  data=rows_data(ROWS))
    calls = forwards_counted(run)
    result = run.train()
    assert len(calls) == 12 and run.ref_forwards == 0
    log = log_of(result["run_dir"])
    rewards = [r["reward"] for r in log]
    assert len(rewards) == 12 and [r["reward/has_o/mean"] for r in log] == rewards
    assert sum(rewards[-4:]) / 4 >= sum(rewards[:3]) / 3 + 0.3, rewards
    assert "kl" not in log[0]
    assert {"loss", "reward_std", "reward/has_o/std", "completion_length", "clip_ratio", "learning_rate",
            "grad_norm"} <= set(log[0])
    assert 1 <= log[0]["completion_length"] <= 4
    images = Path(result["run_dir"]) / "images"
    assert (images / "train_reward.png").is_file() and (images / "train_reward_has_o.png").is_file()


def test_bf16_model_samples_under_the_training_autocast(tmp_path, tiny_model_dir):
    """On a bf16 model the LoRA weights stay float32 with PEFT's input upcast off: the rollouts' generation runs
    under the training forward's autocast (else its LoRA matmuls meet bf16 inputs and float32 weights), and a
    step logs finite rewards and loss."""
    import torch

    from ocrtune.rl.grpo import GrpoRun
    from ocrtune.train.data import rows_data
    run = GrpoRun(grpo_args(tmp_path, tiny_model_dir, max_steps=2, beta=0.04, dtype="bfloat16",
                            save_steps=100), data=rows_data(ROWS))
    lora = [p for n, p in run.loss_module.named_parameters() if "lora_A" in n]
    assert lora and {p.dtype for p in lora} == {torch.float32}
    log = log_of(run.train()["run_dir"])
    assert len(log) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) for r in log), log


def test_resume_replays_the_same_samples_and_weights(tmp_path, tiny_model_dir):
    """(3) 4 steps saved at 2 and 4; a copy of the run cut back to checkpoint-2 and resumed ends with the same
    adapter and the same logged rewards; (5) --beta > 0: a reference forward per micro-batch."""
    from ocrtune.rl.grpo import GrpoRun
    from ocrtune.train.data import rows_data
    args = grpo_args(tmp_path, tiny_model_dir, max_steps=4, save_steps=2, beta=0.1, lora_dropout=0.1)
    run = GrpoRun(args, data=rows_data(ROWS))
    calls = forwards_counted(run)
    run_dir = Path(run.train()["run_dir"])
    assert len(calls) == 8 and run.ref_forwards == 4  # policy + reference, each step
    log = log_of(run_dir)
    assert all(r["kl"] >= 0 for r in log) and log[-1]["kl"] > 0  # the adapter moved away from the reference

    copy = tmp_path / "copy" / run_dir.name
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoint-4")
    resumed = GrpoRun(grpo_args(tmp_path, tiny_model_dir, max_steps=4, save_steps=2, beta=0.1, lora_dropout=0.1,
                                output_dir=str(tmp_path / "copy"), resume_from_checkpoint=str(copy / "checkpoint-2")),
                      data=rows_data(ROWS))
    resumed.train()
    want, got = (load_file(d / "checkpoint-4" / "adapter_model.safetensors") for d in (run_dir, copy))
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    compared = ("reward", "loss", "kl", "completion_length", "step")
    assert [{k: r[k] for k in compared} for r in log_of(copy)] == [{k: r[k] for k in compared} for r in log]
    moved = tmp_path / "elsewhere" / "my-model" / run_dir.name  # an sft run under another model folder name
    shutil.copytree(run_dir, moved)
    check_ckpt_dir_starts(tmp_path, tiny_model_dir, run, moved / "checkpoint-4")


def check_ckpt_dir_starts(tmp_path, tiny_model_dir, trained, ckpt: Path):
    """--ckpt_dir LoRA checkpoint: merged (the new run's reference, its adapter disabled, is the checkpoint's
    policy) or its adapter trained on (--merge_lora false: the run starts from the checkpoint's adapter)."""
    from peft import get_peft_model_state_dict

    from ocrtune.rl.grpo import GrpoRun
    from ocrtune.train.data import rows_data
    batch = trained.rollout([0]).batch
    trained.loss_module.eval()
    with torch.no_grad():
        want = trained.loss_module(**batch)[0]
    merged = GrpoRun(grpo_args(tmp_path, tiny_model_dir, ckpt_dir=str(ckpt), output_dir=str(tmp_path / "merged")),
                     data=rows_data(ROWS))
    merged.loss_module.eval()
    with torch.no_grad():
        policy = merged.loss_module(**batch)[0]
    assert torch.allclose(merged.reference_logprobs(batch), want, atol=1e-5)
    assert torch.allclose(policy, want, atol=1e-5)  # the new adapter starts at zero
    assert merged.run_dir.parent.name == "my-model"  # under the sft run's model folder name, as the sft run was
    cont = GrpoRun(grpo_args(tmp_path, tiny_model_dir, ckpt_dir=str(ckpt), merge_lora=False,
                             output_dir=str(tmp_path / "continued")), data=rows_data(ROWS))
    saved, now = load_file(ckpt / "adapter_model.safetensors"), get_peft_model_state_dict(cont.model)
    assert saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in saved)


# ---------------------------------------------------------------- (4) bad flags: one line, exit 2
@pytest.mark.parametrize("flags, line", [
    (["--num_generations", "1"], "error: --num_generations must be at least 2, got 1; use a whole number from 2 to 4096"),
    (["--reward_funcs", "nope"], "error: --reward_funcs nope: no such reward; use cdm, edit_distance, bleu, exact, "
                                 "format, or a function of an --external_plugins file"),
    (["--reward_funcs", "bleu", "exact", "--reward_weights", "1"],
     "error: --reward_weights has 1 values for 2 --reward_funcs: give one weight per reward; see `ocrtune rlhf --help`"),
    (["--beta", "-0.1"], "error: --beta must be at least 0, got -0.1; use a number from 0 to 1000000"),
    (["--temperature", "0"], "error: --temperature must be positive, got 0.0; use a number above 0, up to 100"),
    (["--batch_size", "12"], "error: --batch_size 12 is not a multiple of --num_generations 8: a micro-batch holds "
                             "whole groups of completions; see `ocrtune rlhf --help`"),
    (["--train_type", "full"], "error: --train_type full with --beta 0.04: the KL reference is the model with its LoRA "
                               "adapter disabled, and full fine-tuning has none (no second copy is kept); pass --beta 0 "
                               "or --train_type lora"),
    (["--rlhf_type", "dpo"], "error: ocrtune rlhf: argument --rlhf_type: invalid choice: 'dpo' (choose from 'grpo'); "
                             "run 'ocrtune rlhf --help' to see the flags"),
    (["--external_plugins", "{tmp}/none.py"], "error: --external_plugins {tmp}/none.py does not exist; pass the path of "
                                              "a .py file"),
    (["--external_plugins", "{tmp}/bad.py", "--reward_funcs", "x"],
     "error: --external_plugins {tmp}/bad.py failed to load (line 1): SyntaxError: invalid syntax (bad.py, line 1); "
     "fix the file and run again"),
    (["--external_plugins", "{tmp}/plug.py", "--reward_funcs", "missing"],
     "error: --reward_funcs missing: no such reward; use cdm, edit_distance, bleu, exact, format, or a function of an "
     "--external_plugins file"),
])
def test_bad_flags_are_one_line_and_exit_2(tmp_path, capsys, flags, line):
    from ocrtune.cli.main import main
    (tmp_path / "bad.py").write_text("def f(:\n")
    (tmp_path / "plug.py").write_text(PLUGIN)
    argv = ["rlhf", *[f.replace("{tmp}", str(tmp_path)) for f in flags], "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [line.replace("{tmp}", str(tmp_path))]
    assert not (tmp_path / "out").exists()


def test_max_time_stops_after_the_step_in_progress_and_saves_it(tmp_path, tiny_model_dir):
    """sft's stop request drives rlhf too: --max_time 0 ends the run after its first step, saved."""
    from ocrtune.rl.grpo import GrpoRun
    from ocrtune.train.data import rows_data
    run = GrpoRun(grpo_args(tmp_path, tiny_model_dir, max_steps=5, save_steps=100, beta=0.0, max_time=0.0),
                  data=rows_data(ROWS))
    result = run.train()
    assert result["global_step"] == 1
    assert sorted(p.name for p in Path(result["run_dir"]).glob("checkpoint-*")) == ["checkpoint-1"]


def test_rendering_rewards_typeset_with_the_runs_tex_root(tmp_path):
    """--tex_root reaches the cdm/format rewards: an empty folder is refused when the rewards are resolved, naming it."""
    with pytest.raises(UserError, match=str(tmp_path)):
        rw.resolve(["edit_distance", "cdm"], None, None, tex_root=str(tmp_path))
    rewards = rw.resolve(["edit_distance"], None, None, tex_root=str(tmp_path))  # no rendering reward: not checked
    assert [r.name for r in rewards] == ["edit_distance"]
