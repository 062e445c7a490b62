"""Gradients that do not depend on how the batch is cut: the first update of every algorithm file on a tiny Llama
(CPU, fixed seed, one fixed batch of rollouts whose lengths differ) is the same, to floating-point tolerance, for
micro-batch sizes 1, 2, 4 and the whole minibatch, and for 1 and 2 processes (gloo), for every loss aggregation it
offers (GRPO's three, and a KL term in the loss for GRPO and PPO); and sft.py's and reward.py's one optimizer step on
fixed data, for the same micro-batch sizes and process counts.

Not invariant by design, and so not tested: REBEL with micro-batches of 1 (a micro-batch holds whole pairs, the
regression compares the two responses of a prompt). The PPO family whitens advantages over the whole batch of every
process, so 2 processes see the statistics 1 process does (per-process whitening, as in the authors' code, moves
the gradient by 5-80% of its norm at these batch sizes). A mis-normalised loss (a micro-batch's own token count in
place of the minibatch's, or a process's in place of all processes') moves these gradients by far more than the
tolerance.
"""
import os
import sys

import pytest
import torch

from conftest import ROOT, run_script

# The relative L2 error allowed. Cutting the batch differently only reorders float32 sums: a gradient entry sums at
# most ~10^3 terms (sequences x positions x micro-batches), so its rounding error is at most n u = 10^3 x 6e-8 = 6e-5
# of the sum of the terms' magnitudes (the worst case; a random walk gives sqrt(n) u ~ 2e-6); GRPO's and whitened
# advantages are zero-mean, so terms cancel and the signed sum can be ~10x smaller than the magnitudes: 6e-4 at worst.
# A mis-normalised loss scales a micro-batch's gradient by the ratio of two token counts (responses of <= 12 tokens
# whose lengths differ: >= 1/12 = 8e-2) or of two process counts (1/2). 2e-3 sits between the two.
TOLERANCE = 2e-3
COMMON = ["--num_iterations", "1", "--response_length", "12", "--num_eval_prompts",
          "2", "--eval_batch_size", "2", "--eval_samples", "0", "--num_train_prompts", "16", "--num_epochs", "1",
          "--num_minibatches", "1"]
GRPO = ["--prompts_per_iteration", "2", "--grpo.num_generations", "4"]  # 8 sequences
P4 = ["--prompts_per_iteration", "4"]
# file, its own flags, micro-batch sizes (the last: the whole minibatch)
FILES = {
    "grpo-grpo": ("grpo.py", [*GRPO, "--grpo.loss_type", "grpo"], [1, 2, 4, 8]),
    "grpo-bnpo": ("grpo.py", [*GRPO, "--grpo.loss_type", "bnpo"], [1, 2, 4, 8]),
    "grpo-dr_grpo": ("grpo.py", [*GRPO, "--grpo.loss_type", "dr_grpo"], [1, 2, 4, 8]),
    "grpo-kl": ("grpo.py", [*GRPO, "--grpo.kl_coef", "0.1"], [1, 2, 4, 8]),
    "ppo-klloss": ("ppo.py", [*P4, "--ppo.kl_in", "loss", "--ppo.kl_estimator", "k3"], [1, 2, 4]),
    "ppo": ("ppo.py", P4, [1, 2, 4]),
    "ppo_pp": ("ppo_pp.py", [*P4, "--ppo.reset_prob", "0.5"], [1, 2, 4]),
    "drpo": ("drpo.py", [*P4, "--ppo.reset_prob", "0.5"], [1, 2, 4]),
    "rebel": ("rebel.py", P4, [2, 4, 8]),
    # sft.py and reward.py: one optimizer step on fixed data (no sampling); their flags replace COMMON
    "sft": ("sft.py", ["--num_train_rows", "8", "--batch_size", "8", "--max_response_length", "16"], [1, 2, 4, 8]),
    "reward": ("reward.py", ["--pairs", "dataset", "--num_train_prompts", "8", "--batch_size", "4", "--epochs", "1",
                             "--max_length", "96"], [1, 2, 4]),
    "apo": ("apo.py", [*P4, "--apo.num_samples", "2"], [1, 2, 4]),
}


_CACHE = {}


def gradients_of(script_key, model_dir, reward_dir, out):
    """{(file key, micro-batch size or "2proc"): gradient} of every configuration of one file (its keys sharing
    the first one's batch of rollouts): one process for the micro-batch sizes, then a 2-process run per key."""
    if script_key in _CACHE:
        return _CACHE[script_key]
    harness = os.path.join(ROOT, "tests", "capture_update.py")
    keys = [k for k in FILES if k.split("-")[0] == script_key]
    batch_file = str(out / f"{script_key}.batch")
    one, two = [], []  # the configurations of one process, and of each of two processes
    for key in keys:
        script, flags, micros = FILES[key]
        run_flags = ["--model_name", model_dir, *COMMON, "--reward_model", reward_dir] if key not in ("sft", "reward") \
            else ["--model_name", model_dir, "--num_eval_prompts", "2", "--eval_batch_size", "2"]
        run_flags += ["--output_dir", str(out / script_key), *flags]
        for m in [micros[-1], *micros[:-1]]:  # the whole minibatch first: the file's first one records the batch
            one += ["--", f"{key}@{m}", script, *run_flags, "--micro_batch_size", str(m)]
        two += ["--", f"{key}@2proc", script, *run_flags, "--micro_batch_size", str(micros[-1] // 2)]
    run_script([sys.executable, harness, batch_file, str(out), *one[1:]], timeout=900)
    run_script([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(29600 + list(FILES).index(keys[0])), harness, batch_file, str(out), *two[1:]], timeout=900)
    _CACHE[script_key] = {(key, m): torch.load(out / f"{key}@{m}.pt") for key in keys
                          for m in [*FILES[key][2], "2proc"]}
    return _CACHE[script_key]


@pytest.fixture(scope="module")
def invariance_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("invariance")


@pytest.mark.parametrize("key", FILES)
def test_the_update_does_not_depend_on_micro_batches_or_processes(tiny_model_dir, tiny_reward_dir, invariance_dir, key):
    gradients = gradients_of(key.split("-")[0], tiny_model_dir, tiny_reward_dir, invariance_dir)
    micros = FILES[key][2]
    whole = gradients[(key, micros[-1])]
    assert whole.norm() > 0
    for m in [*micros[:-1], "2proc"]:
        error = ((gradients[(key, m)] - whole).norm() / whole.norm()).item()
        print(f"{key}: micro-batch {m} vs the whole minibatch: relative error {error:.2e}")
        assert error < TOLERANCE, f"{key}: micro-batch {m} moves the gradient by {error:.2e} of its norm"
