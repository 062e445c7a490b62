"""The embedded multi-step task (chain2..chain5): its verifier on hand-made solutions, disjoint splits, correct
demonstrations and pairs, reset states built from demonstrations, and every script on it."""
import sys

import pytest
import torch

from common.chain import chain_questions, verify_chain
from common.resets import build_reset_states, sample_rollin_lengths, tokenize_demonstrations
from common.task_data import load_preference_task
from common.tasks import CHAIN_TASKS, load_task
from conftest import read_jsonl, run_together

ROW = {"answer": "47"}


@pytest.mark.parametrize("response,score", [
    ("17 + 25 = 42. 42 - 8 = 34. 34 + 13 = 47. Answer: 47", 1.0),  # the worked solution
    ("Answer: 47.", 1.0),  # just the answer line
    ("answer:\n47", 1.0),  # any case, the number on the next line
    ("17 + 25 = 42, then 42 - 8 = 34, and 34 + 13 = 47", 1.0),  # no answer line: the last number
    ("First 47 looked right, but 34 + 13 = 46", 0.0),  # the right number hidden mid-text, a wrong final one
    ("34 + 13 = 47. Answer: 46", 0.0),  # the right result in a step, a wrong final answer
    ("Answer: 47. Wait, no. Answer: 46", 0.0),  # the last answer line counts
    ("Answer: 46. Checking again. Answer: 47", 1.0),
    ("Answer: forty-seven", 0.0),  # a malformed final line scores 0, even with 47 earlier
    ("34 + 13 = 47. Answer: 4 7", 0.0),
    ("Answer: 4.7", 0.0),  # not an integer
    ("Answer: 47,5", 0.0),
    ("The result is 470", 0.0),
    ("", 0.0),
])
def test_verifier_on_hand_made_solutions(response, score):
    assert verify_chain(ROW, response) == score


@pytest.mark.parametrize("task", CHAIN_TASKS)
def test_splits_are_disjoint_and_demonstrations_are_right(task):
    train, test = load_task(task, "train"), load_task(task, "test")
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert len({r["prompt"] for r in train}) == len(train) > 4000 and len(test) == 300
    ops = int(task.removeprefix("chain"))
    for row in train[:200] + test[:200]:
        expression = row["prompt"].removeprefix("What is ").split("?")[0]
        assert expression.count("+") + expression.count("-") == ops
        assert eval(expression) == int(row["answer"]) >= 0  # the answer is the expression's value
        assert row["response"].count("=") == ops  # one step per operation
        assert verify_chain(row, row["response"]) == 1.0 and verify_chain(row, row["chosen"]) == 1.0
        assert verify_chain(row, row["rejected"]) == 0.0  # the pair's rejected side has a miscalculated step
    assert load_task(task, "train", num_rows=5, seed=1) != load_task(task, "train", num_rows=5, seed=2)  # shuffled
    pairs = load_preference_task(task, "test", num_rows=3)
    assert all(p["chosen"] != p["rejected"] for p in pairs)


def test_worked_solutions_keep_every_step_non_negative():
    for _, solution, answer in chain_questions(4, count=500):
        results = [int(step.split("= ")[1]) for step in solution.split(". ")[:-1]]
        assert min(results) >= 0 and results[-1] == answer


def test_reset_states_come_from_demonstrations(tokenizer):
    rows = load_task("chain3", "train", num_rows=4)
    demo_ids, lengths = tokenize_demonstrations(tokenizer, rows, 64)
    for row, ids, n in zip(rows, demo_ids, lengths):
        assert ids[n - 1] == tokenizer.eos_token_id and 30 <= n <= 50  # the worked solution, then EOS
        assert tokenizer.decode(ids[:n - 1]) == row["response"]
    query = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 0, 5], [1, 2, 3]])
    query_mask = (query != 0).long()
    h = sample_rollin_lengths(lengths, 1.0, (1, 1, range(4)), max_fraction=0.5)
    assert ((h >= 1) & (h <= (lengths - 1) // 2)).all()  # at most half of the solution forced, never its EOS
    states, state_mask = build_reset_states(query, query_mask, demo_ids, h, tokenizer.pad_token_id)
    for i in range(4):
        real = states[i][state_mask[i].bool()]
        assert torch.equal(real[-int(h[i]):], demo_ids[i, :h[i]])  # the state ends with the demonstration's prefix


def test_every_script_runs_on_the_chain_task(tiny_model_dir, tiny_reward_dir, tmp_path):
    tiny = ["--model_name", tiny_model_dir, "--task", "chain3", "--num_iterations", "1", "--prompts_per_iteration",
            "4", "--micro_batch_size", "2", "--response_length", "48", "--num_eval_prompts", "4",
            "--eval_batch_size", "4", "--num_train_prompts", "16"]
    commands = {name: [sys.executable, f"{name}.py", *tiny, "--output_dir", str(tmp_path)]
                for name in ("ppo", "ppo_pp", "drpo", "rebel", "apo", "grpo")}
    commands["grpo"] += ["--grpo.num_generations", "2"]
    commands["apo"] += ["--apo.num_samples", "2"]
    commands["sft"] = [sys.executable, "sft.py", "--model_name", tiny_model_dir, "--task", "chain3",
                       "--num_train_rows", "8", "--batch_size", "4", "--micro_batch_size", "4",
                       "--max_response_length", "64", "--num_eval_prompts", "4", "--output_dir", str(tmp_path)]
    commands["reward"] = [sys.executable, "reward.py", "--model_name", tiny_reward_dir, "--task", "chain3",
                          "--pairs", "dataset", "--num_train_prompts", "8", "--num_eval_prompts", "4",
                          "--batch_size", "4", "--micro_batch_size", "2", "--epochs", "1", "--output_dir",
                          str(tmp_path)]
    names = list(commands)
    for pair in (names[i:i + 2] for i in range(0, len(names), 2)):  # two at a time on two cores
        run_together([commands[n] for n in pair])
    for name in ("ppo", "ppo_pp", "drpo", "rebel", "apo", "grpo"):
        final = read_jsonl(tmp_path / f"{name}__1" / "metrics.jsonl")[-1]
        assert 0 <= final["eval/accuracy"] <= 1 and "eval/pass@1" in final
    drpo = [r for r in read_jsonl(tmp_path / "drpo__1" / "metrics.jsonl") if "val/rollin_length" in r]
    assert drpo[0]["val/rollin_length"] > 0  # resets forced part of the 30-50 token demonstrations
