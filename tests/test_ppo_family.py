"""PPO, PPO++ and DR-PO: rewards, GAE, whitening and losses against hand-worked values; roll-in tokens get no
gradient; beta = 0 reproduces ppo.py; smoke, resume, reward-model and two-process runs of the tiny model."""
import math
import os
import sys

import pytest
import torch
from conftest import ROOT, read_jsonl, run_together
from safetensors.torch import load_file

from ppo import PolicyAndValue, clipped_policy_loss, clipped_value_loss, compute_gae, masked_whiten, per_token_rewards

TINY = ["--num_iterations", "2", "--prompts_per_iteration", "4", "--micro_batch_size", "2", "--response_length", "8",
        "--num_eval_prompts", "8", "--eval_batch_size", "8", "--num_train_prompts", "32", "--learning_rate", "1e-3"]
TRAIN_KEYS = ("objective/scores", "objective/kl", "objective/entropy", "objective/rlhf_reward", "loss/policy",
              "loss/value", "policy/approxkl", "policy/clipfrac", "val/num_eos", "val/response_length",
              "val/value_error", "perf/seconds_per_iter", "lr", "episode")


# ---------------------------------------------------------------------------------------------
# Pure functions, by hand
# ---------------------------------------------------------------------------------------------
def test_per_token_rewards_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-2.0, -2.0, -1.0, -9.0], [-3.0, -3.0, -2.0, -2.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)  # row 1: a forced first token, then 2 chosen
    rewards = per_token_rewards(torch.tensor([1.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    # r_t = -0.1 * (lp - ref) on masked tokens; the score on the last masked token; 0 elsewhere
    assert rewards.tolist()[0] == pytest.approx([-0.1, 0.0, 0.2 + 1.0, 0.0])
    assert rewards.tolist()[1] == pytest.approx([0.0, -0.2, -0.1 - 1.0, 0.0])


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 9.0]])
    # the last position is padding: its reward and value count as 0
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # delta_2 = 1 + 0 - 0.4 = 0.6;  delta_1 = 0 + 0.4 - 0.2 = 0.2;  delta_0 = 0 + 0.2 - 0.5 = -0.3
    # A_2 = 0.6;  A_1 = 0.2 + 0.5 * 0.6 = 0.5;  A_0 = -0.3 + 0.5 * 0.5 = -0.05
    assert advantages.tolist()[0] == pytest.approx([-0.05, 0.5, 0.6, 0.0])
    assert returns.tolist()[0] == pytest.approx([0.45, 0.7, 1.0, 0.0])
    # lambda = 1 and no values: discounted returns, 1 + 0.5 * 2 = 2
    advantages, returns = compute_gae(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool),
                                      0.5, 1.0)
    assert advantages.tolist()[0] == pytest.approx([2.0, 2.0]) and returns.tolist()[0] == pytest.approx([2.0, 2.0])


def test_masked_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    # masked entries 1, 2, 3: mean 2, sample variance (1 + 0 + 1) / 2 = 1
    assert masked_whiten(x, mask).flatten().tolist() == pytest.approx([-1.0, 0.0, 0.0, 1.0, 0.0, 0.0], abs=1e-6)


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 2)
    for ratio, adv, expected in [(1.5, 1.0, -1.2), (1.5, -1.0, 1.5), (0.5, 1.0, -0.5), (0.5, -1.0, 0.8),
                                 (1.1, 2.0, -2.2)]:
        lp = torch.full((1, 2), math.log(ratio))
        loss = clipped_policy_loss(lp, old, torch.full((1, 2), adv), 0.2)
        assert loss.tolist()[0] == pytest.approx([expected] * 2), (ratio, adv)


def test_clipped_value_loss_by_hand():
    old = torch.zeros(3)
    values = torch.tensor([0.5, 0.5, 0.1], requires_grad=True)
    returns = torch.tensor([1.0, 0.0, 1.0])
    loss = clipped_value_loss(values, old, returns, 0.2)
    # 0: V clipped to 0.2 is further from R = 1: 0.5 * 0.8^2;  1: the unclipped error is larger: 0.5 * 0.5^2;
    # 2: inside the clip range: 0.5 * 0.9^2
    assert loss.tolist() == pytest.approx([0.32, 0.125, 0.405])
    loss.sum().backward()
    assert values.grad.tolist() == pytest.approx([0.0, 0.5, -0.9])  # the clipped term passes no gradient


# ---------------------------------------------------------------------------------------------
# Roll-in tokens carry no loss: real gradients of a tiny policy and value model
# ---------------------------------------------------------------------------------------------
def _loss_and_grads(model, query_responses, attention_mask, responses, action_mask, old_logprobs, old_values,
                    advantages, returns, T):
    from common.generation import logprobs_from_logits

    model.zero_grad()
    logits, values = model(query_responses, attention_mask, T)
    logits.retain_grad()
    values.retain_grad()
    logprobs = logprobs_from_logits(logits, responses, 1.0)
    m = action_mask.float()
    per_token = (clipped_policy_loss(logprobs, old_logprobs, advantages, 0.2)
                 + 0.1 * clipped_value_loss(values, old_values, returns, 0.2))
    ((per_token * m).sum() / m.sum()).backward()
    return logits.grad, values.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_rollin_tokens_get_no_gradient(tiny_model_dir, tiny_reward_dir, tokenizer):
    from common.generation import logprobs_from_logits, truncate_after_eos
    from common.models import load_causal_lm
    from common.reward_models import load_reward_model
    from common.resets import splice_reset_responses

    torch.manual_seed(0)
    cpu, T = torch.device("cpu"), 6
    model = PolicyAndValue(load_causal_lm(tiny_model_dir, cpu, torch.float32),
                           load_reward_model(tiny_reward_dir, cpu, torch.float32, tokenizer.pad_token_id))
    queries = torch.randint(3, 1000, (2, 4))
    query_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    prefixes = torch.randint(3, 1000, (2, T))
    rollin = torch.tensor([3, 0])  # row 0 forces 3 tokens, row 1 starts from its prompt
    continuations = torch.randint(3, 1000, (2, T))
    continuations[1, 4] = tokenizer.eos_token_id
    responses, forced = splice_reset_responses(prefixes, rollin, continuations, T, tokenizer.pad_token_id)
    responses, mask, _, _ = truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
    action_mask = mask & ~forced
    assert forced[0].tolist() == [True] * 3 + [False] * 3 and action_mask[0].tolist() == [False] * 3 + [True] * 3
    query_responses = torch.cat([queries, responses], 1)
    attention_mask = torch.cat([query_mask, mask.long()], 1)
    with torch.no_grad():  # the rollout quantities, built as ppo.py builds them
        logits, old_values = model(query_responses, attention_mask, T)
        old_logprobs = logprobs_from_logits(logits, responses, 1.0) - 0.1  # ratio e^0.1, inside the clip range
    rewards = per_token_rewards(torch.tensor([1.0, -1.0]), old_logprobs, old_logprobs - 0.3, action_mask, 0.05)
    advantages, returns = compute_gae(rewards, old_values, action_mask, 1.0, 0.95)
    advantages = masked_whiten(advantages, action_mask)
    assert advantages[forced].abs().max() == 0

    args = (model, query_responses, attention_mask, responses, action_mask, old_logprobs, old_values)
    logits_grad, values_grad, grads = _loss_and_grads(*args, advantages, returns, T)
    assert logits_grad[forced].abs().max() == 0 and values_grad[forced].abs().max() == 0
    assert logits_grad[action_mask].abs().sum(-1).min() > 0 and values_grad[action_mask].abs().min() > 0
    assert (grads["policy.model.embed_tokens.weight"].abs().sum() > 0
            and grads["value_model.score.weight"].abs().sum() > 0)
    # whatever the targets say on forced tokens, the parameters' gradients do not change
    noisy_adv, noisy_ret = advantages.clone(), returns.clone()
    noisy_adv[forced], noisy_ret[forced] = 1e3, -1e3
    _, _, noisy = _loss_and_grads(*args, noisy_adv, noisy_ret, T)
    for name in grads:
        assert torch.equal(grads[name], noisy[name]), name


# ---------------------------------------------------------------------------------------------
# Runs of the scripts on the tiny model
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tiny_model_dir, tiny_reward_dir, tmp_path_factory):
    """Run folders of: ppo.py; ppo_pp.py and drpo.py with beta = 0; ppo_pp.py with resets and a reward model
    (checkpoint after each iteration) and its resumed copy; drpo.py (beta = 1) on two processes."""
    out = tmp_path_factory.mktemp("runs")
    script = lambda name, *extra: [sys.executable, name, "--model_name", tiny_model_dir, *TINY, *extra]  # noqa: E731
    pp_reset = ["--reward_model", tiny_reward_dir, "--ppo.reset_prob", "0.5"]
    run_together([
        script("ppo.py", "--output_dir", str(out / "ppo")),
        script("ppo_pp.py", "--output_dir", str(out / "ppo_pp0"), "--exp_name", "ppo", "--ppo.reset_prob", "0"),
        script("drpo.py", "--output_dir", str(out / "drpo0"), "--exp_name", "ppo", "--ppo.reset_prob", "0"),
        script("ppo_pp.py", "--output_dir", str(out / "ppo_pp"), "--save_every", "1", *pp_reset),
        script("ppo_pp.py", "--output_dir", str(out / "ppo_pp_resumed"), "--save_every", "1", *pp_reset),
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29527",
         *script("drpo.py", "--output_dir", str(out / "drpo2"), "--num_minibatches", "1")[1:]],
    ])
    ckpt = out / "ppo_pp_resumed" / "ppo_pp__1" / "checkpoints" / "iter_1"  # continued in its own run folder
    run_together([script("ppo_pp.py", "--output_dir", str(out / "ppo_pp_resumed"), "--resume_from", str(ckpt),
                         *pp_reset)])
    return {name: out / name / f"{exp}__1"
            for name, exp in [("ppo", "ppo"), ("ppo_pp0", "ppo"), ("drpo0", "ppo"),
                              ("ppo_pp", "ppo_pp"), ("ppo_pp_resumed", "ppo_pp"), ("drpo2", "drpo")]}


def _check_run(run_dir, reward_model=False):
    from transformers import AutoModelForCausalLM

    rows = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in rows if "loss/policy" in r]
    assert [r["step"] for r in train] == [1, 2]
    for key in TRAIN_KEYS:
        assert key in train[-1] and math.isfinite(train[-1][key]), key
    assert {"eval/reward", "eval/kl", "eval/win_rate", "eval/eos_rate"} <= set(rows[-1])
    assert "eval/accuracy" in rows[-1]  # the task verifier's gold score, also when training on a learned reward
    assert rows[-1]["dist/param_checksum_spread"] == 0.0
    # 8 prompts before and after (on two processes: both halves)
    assert len(read_jsonl(run_dir / "eval_samples.jsonl")) == 16
    AutoModelForCausalLM.from_pretrained(run_dir / "model")
    return train


def _weights(run_dir):
    return load_file(os.path.join(run_dir, "model", "model.safetensors"))


def test_ppo_smoke(runs):
    assert all("val/rollin_length" not in r for r in _check_run(runs["ppo"]))  # no resets, no roll-in scaffolding


def test_ppo_pp_smoke_with_resets_and_reward_model(runs):
    assert any(r["val/rollin_length"] > 0 for r in _check_run(runs["ppo_pp"], reward_model=True))


def test_drpo_smoke_on_two_processes(runs):
    assert all(r["val/rollin_length"] > 0 for r in _check_run(runs["drpo2"]))  # beta = 1, arith answers are long enough


@pytest.mark.parametrize("name", ["ppo_pp0", "drpo0"])
def test_reset_prob_zero_reproduces_ppo(runs, name, tiny_model_dir):
    ppo, reset = _weights(runs["ppo"]), _weights(runs[name])
    init = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert any(not torch.equal(ppo[k], init[k]) for k in ppo)  # training changed the weights
    for k in ppo:
        assert torch.equal(ppo[k], reset[k]), k
    reset_rows = read_jsonl(runs[name] / "metrics.jsonl")
    assert all(r["val/rollin_length"] == 0 for r in reset_rows if "loss/policy" in r)
    strip = lambda rows: [{k: v for k, v in r.items()  # noqa: E731
                           if not k.startswith("perf/") and k != "val/rollin_length"} for r in rows]
    assert strip(read_jsonl(runs["ppo"] / "metrics.jsonl")) == strip(reset_rows)


def test_resume_with_resets_gives_the_same_weights(runs):
    full, resumed = _weights(runs["ppo_pp"]), _weights(runs["ppo_pp_resumed"])
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    assert [r["step"] for r in read_jsonl(runs["ppo_pp_resumed"] / "metrics.jsonl") if "loss/policy" in r] == [1, 2]


@pytest.mark.parametrize("a,b,limit", [("ppo.py", "ppo_pp.py", 60), ("ppo.py", "drpo.py", 60),
                                         ("grpo.py", "grpo_reset.py", 60), ("grpo.py", "rebel.py", 131),
                                         ("rebel.py", "apo.py", 150)])
def test_files_differ_by_their_method_only(a, b, limit):
    """`diff a b` stays about the method (the reset files: the reset alone); counted as benchmark/anatomy.py does."""
    sys.path.insert(0, os.path.join(ROOT, "benchmark"))
    from anatomy import changed_lines

    assert changed_lines(a, b) <= limit, f"diff {a} {b}: {changed_lines(a, b)} changed lines, more than {limit}"
