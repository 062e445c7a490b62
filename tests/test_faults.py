"""Nothing lost under faults: a run killed with SIGKILL at chosen points (sampling, scoring, the update, logging,
an evaluation, the middle of a checkpoint write, between a checkpoint's write and its rename), then restarted with
`--resume_from latest`, ends with exactly the weights and the logged iterations of a run that was never killed."""
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, read_jsonl, run_script, start_script

TINY = ["--num_iterations", "4", "--prompts_per_iteration", "4", "--grpo.num_generations", "2",
        "--micro_batch_size", "2", "--num_minibatches", "2", "--response_length", "8", "--num_eval_prompts", "8",
        "--eval_batch_size", "8", "--num_train_prompts", "32", "--learning_rate", "1e-3", "--save_every", "1",
        "--eval_every", "2"]

# (where the process dies, the call that kills it, the checkpoint folders it leaves); every kill is in iteration 2,
# after checkpoint 1: the reference evaluation makes the first calls of generate, score_with_reward_model, evaluate and
# log_metrics
KILL_POINTS = [
    ("sampling", "common/generation.py:generate", 4, ["iter_1"]),
    ("scoring", "common/reward_models.py:score_with_reward_model", 4, ["iter_1"]),
    ("update", "common/training.py:optimizer_step", 4, ["iter_1"]),  # between iteration 2's two optimizer steps
    ("evaluation", "common/evaluation.py:evaluate", 2, ["iter_1"]),  # the evaluation after iteration 2's update
    ("logging", "common/tracking.py:log_metrics", 3, ["iter_1"]),  # writing iteration 2's metrics line
    ("checkpoint write", "torch/serialization.py:save", 5, ["iter_1", "iter_2.tmp"]),  # weights and optimizer written
    ("checkpoint rename", "builtin:os.replace", 3, ["iter_1", "iter_2.tmp"]),  # all of checkpoint 2 written
]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tiny_reward_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run_script(_command(tiny_model_dir, tiny_reward_dir, out))
    return out / "grpo__1"


def _command(tiny_model_dir, tiny_reward_dir, out, *extra):
    # a reward model gives the random tiny policy graded rewards, so the weights move every iteration
    return [sys.executable, *extra, "grpo.py", "--model_name", tiny_model_dir, "--reward_model", tiny_reward_dir,
            "--output_dir", str(out), *TINY]


@pytest.mark.parametrize("where,target,count,left", KILL_POINTS, ids=[k[0] for k in KILL_POINTS])
def test_killed_and_resumed_run_ends_as_an_uninterrupted_one(where, target, count, left, uninterrupted,
                                                             tiny_model_dir, tiny_reward_dir, tmp_path):
    killer = os.path.join(ROOT, "tests", "kill_at.py")
    cmd = _command(tiny_model_dir, tiny_reward_dir, tmp_path)
    killed = start_script([cmd[0], killer, target, str(count), *cmd[1:]]).wait(600)
    assert killed.returncode == -9, f"not killed at {target} #{count}:\n{killed.stderr[-3000:]}"
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("grpo__1__")]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == left  # the kill landed where it should
    assert not (run_dir / "model").exists()

    resumed = run_script(cmd + ["--resume_from", "latest"])
    assert f"--resume_from latest: {run_dir}" in resumed.stdout
    expected = load_file(uninterrupted / "model" / "model.safetensors")
    got = load_file(run_dir / "model" / "model.safetensors")
    for k in expected:
        assert torch.equal(expected[k], got[k]), (where, k)
    steps = lambda path: [(r["step"], sorted(r)) for r in read_jsonl(path)]  # noqa: E731
    assert steps(run_dir / "metrics.jsonl") == steps(uninterrupted / "metrics.jsonl")  # each iteration logged once
    assert len(read_jsonl(run_dir / "eval_samples.jsonl")) == len(read_jsonl(uninterrupted / "eval_samples.jsonl"))


def test_the_same_command_twice_keeps_both_runs(tiny_model_dir, tmp_path):
    cmd = [sys.executable, "grpo.py", "--model_name", tiny_model_dir, "--output_dir", str(tmp_path), *TINY,
           "--num_iterations", "1", "--save_every", "0"]
    run_script(cmd)
    run_script(cmd)
    runs = sorted(p for p in tmp_path.iterdir() if p.name.startswith("grpo__1__"))
    assert len(runs) == 2
    for run_dir in runs:
        assert (run_dir / "model" / "model.safetensors").exists()
        assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1, 1]
    assert os.readlink(tmp_path / "grpo__1") == runs[1].name  # the link names the newest run
