"""The roll-in schedules (common/resets.py): each one's depth distribution and its update rule on hand-made success
histories, their state through a checkpoint; grpo_reset.py: roll-in tokens carry no gradient, reset probability 0 is
grpo.py, and --resume_from continues the schedule."""
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from common.resets import (SCHEDULES, AdaptiveSchedule, AnnealSchedule, ReverseSchedule, make_schedule,
                           sample_rollin_lengths, splice_reset_responses)
from conftest import read_jsonl, run_script, run_together
from test_grpo import TINY  # grpo.py's short run on the tiny model

N = 4000  # rows per distribution check: a frequency's binomial sd is at most sqrt(0.25 / 4000) = 0.008
LENGTHS = torch.full((N,), 9)  # a 9-token prefix (8 steps and the EOS): depths 0..8
ROWS = (1, 7, range(N))  # (seed, iteration, row ids): one generator per row


def test_uniform_is_the_authors_draw():
    lengths = torch.randint(1, 30, (N,), generator=torch.Generator().manual_seed(0))
    for beta in (0.5, 1.0):
        expected = sample_rollin_lengths(lengths, beta, ROWS, 0.5)
        assert torch.equal(make_schedule("uniform", N, 10, max_fraction=0.5).depths(lengths, beta, ROWS, 7), expected)


def test_every_schedule_keeps_the_reset_probability_and_a_groups_shared_depth():
    for name in SCHEDULES:
        schedule = make_schedule(name, N, 10)
        h = schedule.depths(LENGTHS, 0.0, ROWS, 1)
        assert h.sum() == 0, name  # no resets: every sample from the prompt
        h = schedule.depths(LENGTHS, 0.3, ROWS, 1)
        # resets are 30% of the rows (sd 0.0072: the bound is 7 of them); anneal's binomial depth can be 0 on a reset
        assert 0.25 < (h > 0).float().mean() < 0.35, name
        assert h.max() <= 8, name  # the EOS, the prefix's last token, is never forced
        group = schedule.depths(torch.full((4,), 9), 1.0, (1, 7, [5, 5, 5, 5]), 1)  # one prompt's group: one row id
        assert len(set(group.tolist())) == 1, name


def test_reverse_starts_at_the_end_and_moves_back_when_a_fifth_succeed():
    schedule = ReverseSchedule()
    assert set(schedule.depths(LENGTHS, 1.0, ROWS, 1).tolist()) == {8}  # f = 1: the policy writes only the EOS
    schedule.start = 0.5  # the start at 4 of 8 tokens
    h = schedule.depths(LENGTHS, 1.0, ROWS, 1)
    assert h.min() == 4
    # 80% at the start, 20% uniform on {4..8}: P(h = 4) = 0.8 + 0.2 / 5 = 0.84, each other depth 0.04 (sd <= 0.006)
    freq = torch.bincount(h, minlength=9)[4:].float() / N
    assert torch.allclose(freq, torch.tensor([0.84, 0.04, 0.04, 0.04, 0.04]), atol=0.03)
    rows, lengths = torch.arange(10), torch.full((10,), 9)
    at_start, deeper = torch.full((10,), 4), torch.full((10,), 6)
    schedule.update(rows, at_start, lengths, torch.tensor([1.0] * 1 + [0.0] * 9))  # 10% succeed: stay
    assert schedule.start == 0.5
    schedule.update(rows, deeper, lengths, torch.ones(10))  # deeper samples succeed: they do not count
    assert schedule.start == 0.5
    schedule.update(rows, at_start, lengths, torch.tensor([1.0] * 2 + [-1.0] * 8))  # 20%: one step back (1/8)
    assert schedule.start == 0.375
    for _ in range(5):
        schedule.update(rows, torch.full((10,), round(schedule.start * 8)), lengths, torch.ones(10))
    assert schedule.start == 0.0  # at the prompt, and not past it
    assert set(schedule.depths(LENGTHS, 1.0, ROWS, 1).tolist()) <= set(range(9))


def test_adaptive_moves_each_prompt_towards_half_success():
    schedule = AdaptiveSchedule(num_rows=N)
    h = schedule.depths(LENGTHS, 1.0, ROWS, 1)  # no prompt seen: f = 0.5, h = 4 on average (stochastic rounding)
    assert set(h.tolist()) == {4} and schedule.prior() == 0.5
    # prompt 0 solved twice in one iteration, prompt 1 failed, prompt 2 half: f moves by 0.25 (0.5 - success)
    schedule.update(torch.tensor([0, 0, 1, 2, 2]), torch.zeros(5), torch.full((5,), 9),
                    torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0]))
    assert schedule.fraction[:3].tolist() == [0.375, 0.625, 0.5]
    assert schedule.prior() == 0.5  # the mean of the prompts seen: unseen prompts start there
    for _ in range(10):  # solved every time: f falls to 0 and stays (a sample there starts from the prompt)
        schedule.update(torch.tensor([0]), torch.zeros(1), torch.full((1,), 9), torch.ones(1))
    assert schedule.fraction[0] == 0.0
    schedule.fraction[5] = 0.3  # f (len - 1) = 2.4: h = 2 or 3, with mean 2.4 (sd of the mean 0.49 / sqrt(N) = 0.008)
    h = schedule.depths(torch.full((N,), 9), 1.0, (1, 7, [5] * N), 1)  # one row id: the same draw N times
    assert set(h.tolist()) <= {2, 3}
    h = torch.stack([schedule.depths(torch.full((1,), 9), 1.0, (1, it, [5]), it) for it in range(N)]).float()
    assert abs(h.mean().item() - 2.4) < 0.05
    state = schedule.state_dict()
    restored = AdaptiveSchedule(num_rows=N)
    restored.load_state_dict(torch.load(_saved(state), weights_only=True))
    assert torch.equal(restored.fraction.nan_to_num(-1), schedule.fraction.nan_to_num(-1))


def _saved(state):
    """`state` written and read back as accelerate's checkpoints do (torch.save, then a weights-only load)."""
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_anneal_follows_the_cosine_to_zero_by_60_percent():
    schedule = AnnealSchedule(num_iterations=100)  # hints over the first 60 iterations
    p = [schedule.fraction(t) for t in range(1, 101)]
    assert 0.94 < p[0] <= 0.95 and all(a >= b for a, b in zip(p, p[1:]))
    assert abs(p[29] - 0.5) < 0.03  # halfway (t + 1 = 30 of 60): (0.95 + 0.05) / 2
    assert abs(p[59] - 0.05) < 1e-9 and max(p[60:]) == 0.0  # down to 0.05 at iteration 60, then from the prompt
    h = schedule.depths(LENGTHS, 1.0, ROWS, 30).float()
    # h ~ Binomial(8, p): mean 8p, sd of the mean sqrt(8 p (1 - p) / N) < 0.023
    assert abs(h.mean().item() - 8 * schedule.fraction(30)) < 0.1
    assert schedule.depths(LENGTHS, 1.0, ROWS, 61).sum() == 0
    reverse = ReverseSchedule()
    reverse.start = 0.625
    restored = ReverseSchedule()
    restored.load_state_dict(torch.load(_saved(reverse.state_dict()), weights_only=True))
    assert restored.start == 0.625


def test_roll_in_tokens_carry_no_gradient():
    """grpo_reset.py's loss on a batch with roll-ins: the gradient reaches the policy's own tokens only."""
    import grpo_reset

    prefix = torch.tensor([[11, 12, 13, 2], [21, 22, 2, 0]])  # two demonstrations (2: EOS, 0: padding)
    h = torch.tensor([2, 0])
    responses, forced = splice_reset_responses(prefix, h, torch.tensor([[31, 32, 2], [41, 42, 43]]), 5, 0)
    seen = responses != 0  # what truncate_after_eos keeps (no EOS before the end here but row 0's)
    mask = seen & ~forced  # as grpo_reset.py builds it
    logprobs = torch.randn(2, 5, requires_grad=True)
    loss_per_token = grpo_reset.grpo_per_token_loss(logprobs, logprobs.detach(), None, torch.tensor([1.0, -1.0]),
                                                    0.2, 0.0)
    loss = grpo_reset.aggregate_loss(loss_per_token, mask, "grpo", 2, mask.sum(), 5)
    loss.backward()
    assert forced.tolist()[0][:2] == [True, True]
    assert (logprobs.grad[forced] == 0).all()
    assert (logprobs.grad[mask] != 0).all()  # and every token the policy chose has one


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "val/rollin_length"} for r in rows]


def test_reset_probability_zero_is_grpo(tiny_model_dir, tiny_reward_dir, tmp_path):
    # a reward model: graded scores, so the weights move
    common = ["--model_name", tiny_model_dir, "--reward_model", tiny_reward_dir, *TINY]
    run_together([[sys.executable, "grpo.py", *common, "--output_dir", str(tmp_path / "grpo")],
                  [sys.executable, "grpo_reset.py", *common, "--grpo.reset_prob", "0", "--exp_name", "grpo",
                   "--output_dir", str(tmp_path / "reset")]])
    plain, reset = (tmp_path / name / "grpo__1" for name in ("grpo", "reset"))
    a, b = (load_file(os.path.join(run, "model", "model.safetensors")) for run in (plain, reset))
    init = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert any(not torch.equal(a[k], init[k]) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    reset_rows = read_jsonl(reset / "metrics.jsonl")
    assert all(r["val/rollin_length"] == 0 for r in reset_rows if "loss/policy" in r)
    assert _strip(read_jsonl(plain / "metrics.jsonl")) == _strip(reset_rows)


@pytest.mark.parametrize("schedule", ["adaptive"])
def test_resume_continues_the_schedule(schedule, tiny_model_dir, tiny_reward_dir, tmp_path):
    """The adaptive schedule's per-prompt fractions change every iteration: a resumed run that lost them would draw
    other depths (and log another reset/mean_fraction) from iteration 3 on."""
    common = [sys.executable, "grpo_reset.py", "--model_name", tiny_model_dir, "--reward_model", tiny_reward_dir,
              *TINY, "--num_iterations", "4", "--num_train_prompts", "8", "--grpo.reset_prob", "1",
              "--grpo.rollin_schedule", schedule]
    run_together([common + ["--output_dir", str(tmp_path / name), "--save_every", "2"] for name in ("full", "cut")])
    ckpt = tmp_path / "cut" / "grpo_reset__1" / "checkpoints" / "iter_2"
    assert json.loads((ckpt / "iteration.json").read_text()) == {"iteration": 2}
    run_script(common + ["--output_dir", str(tmp_path / "cut"), "--resume_from", str(ckpt)])
    full, cut = (read_jsonl(tmp_path / name / "grpo_reset__1" / "metrics.jsonl") for name in ("full", "cut"))
    fractions = [r["reset/mean_fraction"] for r in full if "loss/policy" in r]
    assert len(set(fractions)) > 1  # the state moved during the run
    assert _strip(full) == _strip(cut)
    a, b = (load_file(tmp_path / name / "grpo_reset__1" / "model" / "model.safetensors") for name in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_ppo_family_runs_every_schedule(tiny_model_dir, tmp_path):
    tiny = ["--model_name", tiny_model_dir, "--num_iterations", "2", "--prompts_per_iteration", "4",
            "--micro_batch_size", "2", "--response_length", "8", "--num_eval_prompts", "4", "--eval_batch_size", "4",
            "--num_train_prompts", "16", "--ppo.reset_prob", "1"]
    runs = [("drpo", "reverse"), ("drpo", "anneal"), ("ppo_pp", "adaptive")]
    run_together([[sys.executable, f"{name}.py", *tiny, "--ppo.rollin_schedule", schedule, "--exp_name",
                   f"{name}-{schedule}", "--output_dir", str(tmp_path)] for name, schedule in runs])
    for name, schedule in runs:
        train = [r for r in read_jsonl(tmp_path / f"{name}-{schedule}__1" / "metrics.jsonl") if "loss/policy" in r]
        assert len(train) == 2
        # reverse starts with the whole demonstration but its EOS forced; anneal's first depth is 0.95 of it
        if schedule != "adaptive":
            assert train[0]["val/rollin_length"] > 0
        stat = {"reverse": "reset/start_fraction", "adaptive": "reset/mean_fraction"}.get(schedule)
        assert stat is None or 0 <= train[-1][stat] <= 1
