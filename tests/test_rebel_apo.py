"""REBEL and A*-PO: their losses and V* against hand-worked values, the stage-1 cache, smoke runs."""
import json
import math
import os
import sys

import pytest
import torch
from conftest import read_jsonl, run_script

from apo import APOHParams, apo_loss, optimal_value
from common.config import check_ranges
from rebel import rebel_loss

TINY_RUN = ["--num_iterations", "2", "--num_eval_prompts", "8", "--eval_batch_size", "8", "--response_length", "8",
            "--prompts_per_iteration", "4", "--micro_batch_size", "4"]


# ---------------------------------------------------------------------------------------------
# REBEL loss
# ---------------------------------------------------------------------------------------------
def test_rebel_loss_hand_values():
    # pair 1: y has log-ratio sum (-1 - -1.5) + (-2 - -2) = 0.5 (its third token is padding and ignored),
    #         y' has 0 + 0.25 + 0 = 0.25, so the log-ratio difference is 0.25; R(y) - R(y') = 1 - 0 = 1.
    # pair 2: log-ratio sums 0.3 and -0.2 (difference 0.5), rewards 0 and 1 (difference -1).
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0], [-0.5, -0.5, -0.5], [-1.0, -1.0, -1.0]])
    old = torch.tensor([[-1.5, -2.0, -9.0], [-1.0, -1.25, -1.0], [-0.8, -0.5, -0.5], [-0.8, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]], dtype=torch.float32)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    per_pair = rebel_loss(logprobs, old, mask, rewards, eta=0.5)
    # (0.25 - 0.5 * 1)^2 = 0.0625 and (0.5 - 0.5 * (-1))^2 = 1.0
    assert per_pair.shape == (2,)
    assert torch.allclose(per_pair, torch.tensor([0.0625, 1.0]))
    assert per_pair.mean().item() == pytest.approx(0.53125)
    # eta = 2: (0.25 - 2)^2 = 3.0625 and (0.5 + 2)^2 = 6.25
    assert torch.allclose(rebel_loss(logprobs, old, mask, rewards, eta=2.0), torch.tensor([3.0625, 6.25]))


def test_rebel_loss_zero_when_log_ratio_difference_is_eta_times_reward_difference():
    torch.manual_seed(0)
    eta = 0.3
    logprobs, old = -torch.rand(6, 5), -torch.rand(6, 5)
    mask = torch.ones(6, 5)
    mask[1, 3:] = 0
    log_ratio = ((logprobs - old) * mask).sum(1).view(-1, 2)  # (3, 2)
    # a shared offset cancels
    rewards = torch.stack([log_ratio[:, 0] / eta + 7.0, log_ratio[:, 1] / eta + 7.0], dim=1).flatten()
    assert torch.allclose(rebel_loss(logprobs, old, mask, rewards, eta), torch.zeros(3), atol=1e-10)
    # and the gradient at pi = pi_t is -2 eta (R(y) - R(y')) on y's real tokens: a policy-gradient step on the pair
    lp = old.clone().requires_grad_(True)
    rebel_loss(lp, old, mask, torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 1.0]), eta).sum().backward()
    assert torch.allclose(lp.grad[0], torch.full((5,), -2 * eta))
    assert torch.allclose(lp.grad[1], -lp.grad[0] * mask[1])
    assert torch.allclose(lp.grad[2:4], torch.zeros(2, 5))


# ---------------------------------------------------------------------------------------------
# A*-PO: V* and the loss
# ---------------------------------------------------------------------------------------------
def test_optimal_value_hand_values():
    # beta1 = 1, rewards 0 and ln 3: log((e^0 + e^ln3) / 2) = log 2
    assert optimal_value(torch.tensor([[0.0, math.log(3.0)]]), 1.0).item() == pytest.approx(math.log(2.0), abs=1e-6)
    # beta1 = 0.5, rewards 0 and 1: 0.5 log((1 + e^2) / 2) = 0.716890
    assert optimal_value(torch.tensor([[0.0, 1.0]]), 0.5).item() == pytest.approx(0.716890, abs=1e-5)
    # equal rewards: V* is that reward for any beta1; several prompts at once
    v = optimal_value(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]]), 0.5)
    assert torch.allclose(v, torch.tensor([1.0, 0.5 * math.log((3 + math.e ** 2) / 4)]))


def test_optimal_value_beta1_zero_is_the_mean_and_the_limits():
    rewards = torch.tensor([[0.0, 1.0, 1.0, 0.0], [2.0, 0.0, 1.0, 1.0]])
    assert torch.allclose(optimal_value(rewards, 0.0), torch.tensor([0.5, 1.0]))  # beta1 = 0 exactly: the mean
    assert torch.allclose(optimal_value(rewards, 1e4), torch.tensor([0.5, 1.0]), atol=1e-3)  # beta1 -> inf: the mean
    assert torch.allclose(optimal_value(rewards, 1e-3), torch.tensor([1.0, 2.0]), atol=2e-3)  # beta1 -> 0+: the max
    with pytest.raises(ValueError, match="apo.beta1 must be >= 0"):  # refused when the flags are parsed
        check_ranges(APOHParams(beta1=-0.5), "apo.")


def test_optimal_value_is_stable_for_large_rewards_and_small_beta1():
    # a naive mean(exp(r / beta1)) overflows at r / beta1 = 1e5; logsumexp does not
    v = optimal_value(torch.tensor([[1000.0, 1000.0, 0.0], [-1000.0, -1000.0, -1000.0]]), 0.01)
    assert torch.isfinite(v).all()
    assert v[0].item() == pytest.approx(1000.0 + 0.01 * math.log(2 / 3), abs=1e-3)
    assert v[1].item() == pytest.approx(-1000.0, abs=1e-3)


def test_apo_loss_hand_values():
    # response 1: sum of lp - lp_ref over real tokens = 0.5 + 1.5 = 2 (padding ignored); beta2 = 0.1 -> 0.2;
    #             target r - V* = 1 - 0.5 = 0.5 -> (0.2 - 0.5)^2 = 0.09
    # response 2: sum = -3 -> -0.3; target 0 - 0.25 -> (-0.3 + 0.25)^2 = 0.0025
    logprobs = torch.tensor([[-1.0, -0.5, -4.0], [-2.0, -2.0, -2.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss = apo_loss(logprobs, ref, mask, torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.25]), beta2=0.1)
    assert torch.allclose(loss, torch.tensor([0.09, 0.0025]))
    assert loss.mean().item() == pytest.approx(0.04625)
    # zero when beta2 * log-ratio equals the optimal advantage
    assert apo_loss(logprobs, ref, mask, torch.tensor([0.7, -0.3]), torch.tensor([0.5, 0.0]),
                    beta2=0.1).abs().max() < 1e-6


# ---------------------------------------------------------------------------------------------
# Smoke runs on the tiny models
# ---------------------------------------------------------------------------------------------
def _check_run(run_dir, extra_train_keys=()):
    from transformers import AutoModelForCausalLM

    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    train = [r for r in rows if "loss/policy" in r]
    assert [r["step"] for r in train] == [1, 2]
    for key in ("loss/policy", "objective/scores", "objective/entropy", "objective/rlhf_reward", "val/num_eos",
                "val/response_length", "lr", "episode", "perf/seconds_per_iter", *extra_train_keys):
        assert all(math.isfinite(r[key]) for r in train), key
    evals = [r for r in rows if "eval/reward" in r]
    assert [r["step"] for r in evals] == [0, 2] and "eval/kl" in evals[-1]
    AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "model"))
    return rows


def test_rebel_smoke(tiny_model_dir, tmp_path):
    run_script([sys.executable, "rebel.py", "--model_name", tiny_model_dir, "--output_dir", str(tmp_path), *TINY_RUN])
    _check_run(os.path.join(tmp_path, "rebel__1"))


def test_rebel_smoke_reward_model_kl_minibatches(tiny_model_dir, tiny_reward_dir, tmp_path):
    run_script([sys.executable, "rebel.py", "--model_name", tiny_model_dir, "--reward_model", tiny_reward_dir,
                "--output_dir", str(tmp_path), *TINY_RUN, "--rebel.kl_coef", "0.1", "--num_minibatches", "2",
                "--num_epochs", "2"])
    rows = _check_run(os.path.join(tmp_path, "rebel__1"), ("objective/kl", "policy/approxkl"))
    assert any(r.get("loss/policy", 0) > 0 for r in rows)  # a reward model's scores differ within pairs


def test_apo_smoke_and_stage1_cache(tiny_model_dir, tiny_reward_dir, tmp_path):
    args = [sys.executable, "apo.py", "--model_name", tiny_model_dir, "--reward_model", tiny_reward_dir,
            "--output_dir", str(tmp_path), "--num_train_prompts", "12", "--apo.num_samples", "4",
            "--apo.entropy_coef", "0.01", *TINY_RUN]
    first = run_script(args)
    assert "cached the rewards" in first.stdout and "loaded the cached" not in first.stdout
    rows = _check_run(os.path.join(tmp_path, "apo__1"), ("objective/kl", "objective/v_star"))
    (cache,) = os.listdir(os.path.join(tmp_path, "apo_stage1"))
    with open(os.path.join(tmp_path, "apo_stage1", cache)) as f:
        rewards = torch.tensor(json.load(f)["rewards"])
    assert rewards.shape == (12, 4)

    second = run_script(args)  # same settings: stage 1 is loaded, not sampled, and training is unchanged
    assert "loaded the cached" in second.stdout and "cached the rewards" not in second.stdout
    assert "apo stage 1:" not in second.stderr  # no sampling progress bar
    assert (read_jsonl(os.path.join(tmp_path, "apo__1", "metrics.jsonl"))[1]["objective/v_star"]
            == rows[1]["objective/v_star"])
    assert len(os.listdir(os.path.join(tmp_path, "apo_stage1"))) == 1

    third = run_script(args + ["--apo.stage1_only", "--apo.beta1", "0", "--temperature", "1.0"])
    # another temperature, another entry
    assert "cached the rewards" in third.stdout and "[apo] reference" not in third.stdout
    assert len(os.listdir(os.path.join(tmp_path, "apo_stage1"))) == 2


def test_apo_two_processes_share_stage1_and_stay_in_sync(tiny_model_dir, tiny_reward_dir, tmp_path):
    # 11 prompts over 2 processes (an uneven split), greedy so that each prompt's rewards do not depend on
    # which process sampled them: the gathered stage-1 rewards must equal one process's, in prompt order
    args = ["apo.py", "--model_name", tiny_model_dir, "--reward_model", tiny_reward_dir, "--num_train_prompts", "11",
            "--apo.num_samples", "2", "--temperature", "0", *TINY_RUN, "--micro_batch_size", "2"]
    run_script([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531", *args,
                "--output_dir", str(tmp_path / "two")])
    run_script([sys.executable, *args, "--output_dir", str(tmp_path / "one"), "--apo.stage1_only"])
    rewards = []
    for name in ("two", "one"):
        (cache,) = os.listdir(tmp_path / name / "apo_stage1")
        with open(tmp_path / name / "apo_stage1" / cache) as f:
            rewards.append(torch.tensor(json.load(f)["rewards"]))
    # the same greedy responses scored by the same reward model in batches cut differently (float32, O(1) scores
    # of a 2-layer model: ~1e-6 apart); a prompt's rewards in another prompt's place differ by ~1e-1
    assert rewards[0].shape == (11, 2) and torch.allclose(rewards[0], rewards[1], atol=1e-4)
    assert rewards[0][:, 0].unique().numel() > 1  # prompts score differently, so the order is really checked
    final = read_jsonl(os.path.join(tmp_path, "two", "apo__1", "metrics.jsonl"))[-1]
    assert final["dist/param_checksum_spread"] == 0.0
