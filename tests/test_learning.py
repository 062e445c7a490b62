"""Does each file learn, not only run (the CleanRL standard)? On the easiest lock, lock3, with the pocket model:

1. sft.py on a guessing teacher's demonstrations (common/lock.py: it does not know 30 of the 100 addition facts and
   writes a random digit for them) takes the random pocket model from 0% of held-out locks opened to a reference
   with partial skill, as benchmark/resets.py builds its reference; the RL tests start from that model.
2. Each RL file from that reference raises held-out greedy success by a stated margin in a few seconds.
3. reward.py from that reference learns to prefer the right answer to one whose first step is wrong (and carried
   through) on held-out prompts. Pairs wrong at any step (the task's own pairs) are not learned reliably in 30
   seconds: 0.48-0.78 held-out accuracy over 7 runs (benchmark/README.md, "Learning tests").

A loss with its sign flipped (minimising the reward, or maximising the NLL) makes its file's test fail; that was
checked once per file by planting the flip (benchmark/README.md, "Learning tests"). Every margin below is argued
next to it; the measured values are in benchmark/README.md.
"""
import json
import random
import sys

import pytest

from common.lock import guessing_teacher, lock_answer, lock_rows
from conftest import read_jsonl, run_script, run_together

EVAL = ["--num_eval_prompts", "200", "--eval_batch_size", "200"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """sft.py on lock3's 747 training prompts as the guessing teacher wrote them: (model folder, its metrics)."""
    folder = tmp_path_factory.mktemp("learning")
    demos = folder / "demos.jsonl"
    demos.write_text("".join(json.dumps(r) + "\n" for r in guessing_teacher(lock_rows("lock3", "train", None), 0.3)))
    run_script([sys.executable, "sft.py", "--model_name", "pocket", "--task", "lock3", "--data_files", str(demos),
                *EVAL, "--max_response_length", "4", "--epochs", "16", "--batch_size", "64", "--micro_batch_size", "64",
                "--learning_rate", "1e-3", "--lr_schedule", "constant", "--output_dir", str(folder)], timeout=120)
    return str(folder / "sft__1" / "model"), read_jsonl(folder / "sft__1" / "metrics.jsonl")


def accuracy(metrics, step=None):
    """Held-out greedy success at the first evaluation (step 0) or the last one."""
    evals = [m for m in metrics if "eval/accuracy" in m]
    return (evals[0] if step == 0 else evals[-1])["eval/accuracy"]


def test_sft_learns(reference):
    _, metrics = reference
    # the random model opens no lock (1 in 1000 by chance); the teacher's own success is about 0.73^3 = 39%, and a
    # model that learned its rule opens 30-40%: measured 30% (benchmark/README.md). 20% needs the rule learned on
    # most of the facts; a model that did not learn it stays near 0.1^3.
    assert accuracy(metrics, 0) <= 0.01
    assert accuracy(metrics) >= 0.2


def test_the_reference_reads_and_writes_the_lock_in_its_own_words(reference):
    folder = reference[0].rsplit("/", 1)[0]
    samples = [s for s in read_jsonl(f"{folder}/eval_samples.jsonl") if s["step"] > 0]
    assert samples and all(s["prompt"].startswith("open ") and s["prompt"].endswith(" :") for s in samples)
    assert not any("<unk>" in s["response"] for s in samples)  # the pocket tokenizer covers what the model writes


# per file: its flags on lock3 (64 generated samples an iteration, like benchmark/resets.py; learning rate: the
# file's default times 10, as there) and its iterations: 2,048 samples, 3,072 for REBEL and A*-PO, whose gains in
# 2,048 were the smallest (+3.5 and +4.5 points at the worst of 4 seeds; benchmark/README.md)
RL = {
    "ppo": ["--prompts_per_iteration", "64", "--learning_rate", "1e-4", "--num_iterations", "32"],
    "ppo_pp": ["--prompts_per_iteration", "64", "--learning_rate", "1e-4", "--num_iterations", "32"],
    "drpo": ["--prompts_per_iteration", "64", "--learning_rate", "1e-4", "--num_iterations", "32"],
    "grpo": ["--prompts_per_iteration", "8", "--learning_rate", "2e-4", "--num_iterations", "32"],
    "rebel": ["--prompts_per_iteration", "32", "--learning_rate", "3e-5", "--num_iterations", "48"],
    "apo": ["--prompts_per_iteration", "64", "--learning_rate", "5e-5", "--num_iterations", "48"],
}
# two runs at a time (each script runs on one thread, so 2 cores take two), paired by length (15-20 s alone for the
# PPO family, 13 REBEL, 10 A*-PO, 7 GRPO) so that a pair's slower run waits least
PAIRS = [("ppo_pp", "ppo"), ("drpo", "rebel"), ("apo", "grpo")]


@pytest.fixture(scope="module")
def rl_runs(reference, tmp_path_factory):
    """Every RL file from the reference on lock3: {name: its metrics}."""
    model, _ = reference
    folder = tmp_path_factory.mktemp("rl")
    commands = {name: [sys.executable, f"{name}.py", "--model_name", model, "--task", "lock3", "--response_length",
                       "5", "--micro_batch_size", "32", *EVAL, "--eval_samples", "0", "--output_dir", str(folder),
                       *flags] for name, flags in RL.items()}
    for pair in PAIRS:
        run_together([commands[name] for name in pair], timeout=240)
    return {name: read_jsonl(folder / f"{name}__1" / "metrics.jsonl") for name in RL}


@pytest.mark.parametrize("name", list(RL))
def test_rl_file_learns(name, rl_runs):
    start, end = accuracy(rl_runs[name], 0), accuracy(rl_runs[name])
    # greedy evaluation on the same 200 prompts: an unchanged policy scores exactly the same, so the gain is the
    # training's. Measured gains over 4 seeds: +6.5 points (DR-PO's worst seed) to +31 (benchmark/README.md); a
    # flipped loss sign lowers success. 3 points = 6 of the 200 prompts.
    print(f"{name}.py: held-out success {start:.3f} -> {end:.3f}")
    assert end >= start + 0.03, f"{name}.py: held-out success {start:.3f} -> {end:.3f}"


def first_step_wrong_pairs(path, split: str):
    """Two pairs per `split` prompt of lock3 (chosen: the answer; rejected: the first digit wrong, carried through),
    written as a --data_files file; returns how many."""
    rng, records = random.Random(split), []
    for seed in (0, 1):
        for row in lock_rows("lock3", split, None, seed=seed):
            digits = [int(w) for w in row["prompt"].split()[1:-1]]
            wrong = [(digits[0] + rng.randint(1, 9)) % 10] + digits[1:]
            records.append({"prompt": row["prompt"], "response": row["answer"],
                            "rejected": " ".join(map(str, lock_answer(wrong)))})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return len(records)


def test_reward_learns(reference, tmp_path):
    model, _ = reference
    train, held_out = tmp_path / "train.jsonl", tmp_path / "held_out.jsonl"
    first_step_wrong_pairs(train, "train")
    n = first_step_wrong_pairs(held_out, "test")
    run_script([sys.executable, "reward.py", "--model_name", model, "--task", "lock3", "--pairs", "dataset",
                "--data_files", str(train), "--eval_data_files", str(held_out), "--num_eval_prompts", str(n),
                "--eval_batch_size", "512", "--max_length", "16", "--epochs", "3", "--batch_size", "32",
                "--micro_batch_size", "32", "--learning_rate", "3e-4", "--lr_schedule", "constant",
                "--output_dir", str(tmp_path)], timeout=120)
    evals = [m for m in read_jsonl(tmp_path / "reward__1" / "metrics.jsonl") if "eval/preference_accuracy" in m]
    start, end = evals[0]["eval/preference_accuracy"], evals[-1]["eval/preference_accuracy"]
    # a fresh score head ranks at chance; on 506 pairs chance has a standard error of 0.022, so 0.7 is 9 of them
    # above it, and a flipped loss learns the opposite preference (below 0.5). Measured: 0.94-0.99 over 3 seeds.
    print(f"reward.py: held-out preference accuracy {start:.3f} -> {end:.3f}")
    assert end >= 0.7 and end >= start + 0.15, f"reward.py: held-out preference accuracy {start:.3f} -> {end:.3f}"
