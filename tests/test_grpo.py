"""GRPO: advantages and loss against hand-worked values; smoke (from a copy of the file and its import closure), resume,
two-process and bad-input runs."""
import json
import math
import os
import shutil
import sys

import pytest
import torch
from conftest import ROOT, read_jsonl, run_script
from safetensors.torch import load_file

from grpo import aggregate_loss, group_advantages, grpo_per_token_loss

TINY = ["--num_iterations", "2", "--prompts_per_iteration", "4", "--grpo.num_generations", "2",
        "--micro_batch_size", "4", "--response_length", "8", "--num_eval_prompts", "8", "--eval_batch_size", "8",
        "--num_train_prompts", "32", "--learning_rate", "1e-3"]


def test_group_advantages_by_hand():
    scores = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0])  # two groups of 3
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # sample std of (1, 0, 0) = 0.57735
    adv = group_advantages(scores, 3, scale_rewards=True)
    expected = [(2 / 3) / std, (-1 / 3) / std, (-1 / 3) / std, 0.0, 0.0, 0.0]
    assert adv.tolist() == pytest.approx(expected, rel=1e-3, abs=1e-6)
    mean_only = group_advantages(scores, 3, scale_rewards=False).tolist()
    assert mean_only == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0, 0, 0], abs=1e-6)


def test_loss_aggregation_by_hand():
    lp = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -3.0])
    per_token = grpo_per_token_loss(lp, lp, None, adv, 0.2, 0.0)  # ratio 1: loss = -A on every token
    assert per_token.tolist() == [[-1, -1, -1], [3, 3, 3]]
    # grpo: mean over sequences of per-sequence means = ((-1 - 1) / 2 + 3 / 1) / 2 = 1.0
    assert aggregate_loss(per_token, mask, "grpo", 2, mask.sum(), 3).item() == pytest.approx(1.0)
    # bnpo: token sum / token count = (-2 + 3) / 3
    assert aggregate_loss(per_token, mask, "bnpo", 2, mask.sum(), 3).item() == pytest.approx(1 / 3)
    # dr_grpo: token sum / (sequences * response_length) = 1 / 6
    assert aggregate_loss(per_token, mask, "dr_grpo", 2, mask.sum(), 3).item() == pytest.approx(1 / 6)
    # micro-batches with the minibatch's normalisers add up to the minibatch loss
    for kind in ("grpo", "bnpo", "dr_grpo"):
        whole = aggregate_loss(per_token, mask, kind, 2, mask.sum(), 3)
        parts = sum(aggregate_loss(per_token[i:i + 1], mask[i:i + 1], kind, 2, mask.sum(), 3) for i in range(2))
        assert parts.item() == pytest.approx(whole.item())


def test_clipping_and_k3_by_hand():
    old = torch.zeros(1, 2)
    lp = torch.full((1, 2), math.log(1.5))  # ratio 1.5, outside 1 +/- 0.2
    pos = grpo_per_token_loss(lp, old, None, torch.tensor([1.0]), 0.2, 0.0)
    neg = grpo_per_token_loss(lp, old, None, torch.tensor([-1.0]), 0.2, 0.0)
    assert pos.tolist()[0] == pytest.approx([-1.2, -1.2])  # min(1.5 A, 1.2 A) for A > 0: clipped
    assert neg.tolist()[0] == pytest.approx([1.5, 1.5])  # min(-1.5, -1.2) for A < 0: unclipped
    ref = lp + math.log(2.0)  # log(ref / pi) = log 2
    kl = grpo_per_token_loss(lp, lp, ref, torch.tensor([0.0]), 0.2, 0.5)
    assert kl.tolist()[0] == pytest.approx([0.5 * (2 - math.log(2) - 1)] * 2)  # beta * k3


OPTIONAL = {"checkpoints", "chain", "fsdp", "lock", "lora", "model_cache", "pocket", "reference_samples", "resets",
            "reward_models", "static_sampler", "supervised", "task_data"}  # modules an option asks for, or other files


def copy_with_closure(name, out):
    """`name` and the common/ modules every run of it loads (benchmark/anatomy.py), alone in the folder `out`: what the
    README says to copy. Returns the modules the file imports only when an option asks for them."""
    sys.path.insert(0, os.path.join(ROOT, "benchmark"))
    from anatomy import import_closure

    always, on_call = import_closure(os.path.join(ROOT, name))
    os.makedirs(out / "common")
    for path in [name, "common/__init__.py"] + [m.replace(".", "/") + ".py" for m in always]:
        shutil.copy(os.path.join(ROOT, path), out / path)
    return {m.split(".")[1] for m in always}, {m.split(".")[1] for m in on_call}


def test_grpo_smoke(tiny_model_dir, tmp_path):
    """Run from a copy of grpo.py with only the modules of common/ it always loads (a fresh interpreter that cannot
    see the project's own common/): those suffice for a run without options (the KL term is on, a local model)."""
    from transformers import AutoModelForCausalLM

    always, on_call = copy_with_closure("grpo.py", tmp_path / "copy")
    assert not always & OPTIONAL and OPTIONAL - {"resets", "reference_samples", "supervised"} <= on_call
    run_script([sys.executable, "grpo.py", "--model_name", tiny_model_dir, "--output_dir", str(tmp_path),
                "--grpo.kl_coef", "0.04", "--num_epochs", "2", "--grpo.loss_type", "bnpo", *TINY],
               cwd=tmp_path / "copy", cold=True, PYTHONPATH=str(tmp_path / "copy"))
    run_dir = tmp_path / "grpo__1"
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in rows if "loss/policy" in r]
    assert [r["step"] for r in train] == [1, 2]
    for key in ("objective/scores", "objective/kl", "policy/clipfrac", "val/num_eos", "perf/seconds_per_iter", "lr"):
        assert key in train[0] and math.isfinite(train[0][key])
    assert {"eval/accuracy", "eval/kl", "eval/win_rate", "eval/eos_rate"} <= set(rows[-1])
    assert len(read_jsonl(run_dir / "eval_samples.jsonl")) == 16  # 8 prompts before and after
    AutoModelForCausalLM.from_pretrained(run_dir / "model")


def test_grpo_copy_is_small():
    """What a copy of grpo.py carries of common/ stays within 1,200 non-blank lines (benchmark/README.md, "What a copy
    of grpo.py carries"): an option's code belongs in a module imported only when the option asks for it."""
    sys.path.insert(0, os.path.join(ROOT, "benchmark"))
    from anatomy import import_closure

    lines = sum(non_blank for _, non_blank in import_closure(os.path.join(ROOT, "grpo.py"))[0].values())
    assert lines <= 1200, f"a copy of grpo.py holds {lines} non-blank lines of common/, over the 1,200 aimed at"


def test_grpo_with_reward_model(tiny_model_dir, tiny_reward_dir, tmp_path):
    run_script([sys.executable, "grpo.py", "--model_name", tiny_model_dir, "--reward_model", tiny_reward_dir,
                "--output_dir", str(tmp_path), *TINY, "--num_iterations", "1", "--track"])  # wandb disabled in tests
    rows = read_jsonl(tmp_path / "grpo__1" / "metrics.jsonl")
    samples = [s for s in read_jsonl(tmp_path / "grpo__1" / "eval_samples.jsonl") if s["step"] == 1]
    # eval/reward is the learned reward; eval/accuracy the task verifier's gold score of the same responses
    assert abs(rows[-1]["eval/reward"] - sum(s["score"] for s in samples) / len(samples)) < 1e-6
    assert "eval/accuracy" in rows[-1] and 0 <= rows[-1]["eval/accuracy"] <= 1


def _weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def test_resume_gives_the_same_weights(tiny_model_dir, tiny_reward_dir, tmp_path):
    # a reward model gives the random tiny policy graded rewards, so the weights do move
    common = [sys.executable, "grpo.py", "--model_name", tiny_model_dir, "--reward_model", tiny_reward_dir, *TINY,
              "--num_iterations", "4", "--lr_schedule", "linear", "--num_minibatches", "2", "--micro_batch_size", "2"]
    for name in ("full", "resumed"):
        run_script(common + ["--output_dir", str(tmp_path / name), "--save_every", "2"])
    full = _weights(tmp_path / "full" / "grpo__1" / "model")
    ckpt = tmp_path / "resumed" / "grpo__1" / "checkpoints" / "iter_2"
    assert json.loads((ckpt / "iteration.json").read_text()) == {"iteration": 2}
    # the resumed run continues in the checkpoint's run folder: its logs are cut back to iteration 2
    run_script(common + ["--output_dir", str(tmp_path / "resumed"), "--resume_from", str(ckpt)])
    resumed = _weights(tmp_path / "resumed" / "grpo__1" / "model")
    init = _weights(tiny_model_dir)
    assert any(not torch.equal(full[k], init[k]) for k in full)  # training changed the weights
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    assert [r["step"] for r in read_jsonl(tmp_path / "resumed" / "grpo__1" / "metrics.jsonl")
            if "loss/policy" in r] == [1, 2, 3, 4]


def test_two_processes_end_with_identical_weights(tiny_model_dir, tmp_path):
    # launched by torchrun itself, as a user would (the other multi-process tests fork their workers: benchmark/warm.py)
    run_script([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                "grpo.py", "--model_name", tiny_model_dir, "--output_dir", str(tmp_path), *TINY], cold=True)
    final = read_jsonl(tmp_path / "grpo__1" / "metrics.jsonl")[-1]
    assert final["dist/param_checksum_spread"] == 0.0
    assert len(read_jsonl(tmp_path / "grpo__1" / "eval_samples.jsonl")) == 16  # both halves of the eval gathered
