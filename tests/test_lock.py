"""The lock task (common/lock.py) and the pocket model (common/pocket.py): the verifier on hand-made answers, disjoint
splits with correct demonstrations and one-step-wrong pairs, and the pocket tokenizer reading every embedded task.
Whether the files learn on the lock with the pocket model: tests/test_learning.py."""
import pytest

from common.lock import lock_answer, verify_lock
from common.task_data import load_preference_task
from common.tasks import LOCK_TASKS, load_task


@pytest.mark.parametrize("response,score", [
    ("3 4 8 9", 1.0), ("3489", 1.0), (" 3 4 8 9 ", 1.0),  # spaces do not matter
    ("3 4 8 0", 0.0), ("3 4 8", 0.0), ("3 4 8 9 1", 0.0), ("", 0.0), ("open 3 1 4 1 : 3 4 8 9", 0.0),
])
def test_verifier_gives_one_only_for_the_whole_answer(response, score):
    assert verify_lock({"answer": "3 4 8 9"}, response) == score


def test_the_answer_is_the_running_sum_modulo_10():
    assert lock_answer([3, 1, 4, 1, 5, 9]) == [3, 4, 8, 9, 4, 3]


@pytest.mark.parametrize("task", ["lock3", "lock8"])
def test_splits_are_disjoint_and_demonstrations_and_pairs_are_right(task):
    horizon = int(task[4:])
    train, test = load_task(task, "train", num_rows=500), load_task(task, "test", num_rows=200)
    assert len({r["prompt"] for r in train}) == 500 and not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for row in train + test:
        digits = [int(w) for w in row["prompt"].split()[1:-1]]
        assert len(digits) == horizon and row["response"] == " ".join(map(str, lock_answer(digits)))
        assert verify_lock(row, row["response"]) == 1.0 and verify_lock(row, row["rejected"]) == 0.0
        wrong = [int(w) for w in row["rejected"].split()]
        first = next(i for i, (a, b) in enumerate(zip(wrong, lock_answer(digits))) if a != b)
        # one step wrong, the later steps computed from it: the rule holds everywhere but at that step
        assert all(wrong[i] == (wrong[i - 1] + digits[i]) % 10 for i in range(first + 1, horizon))
    assert load_preference_task(task, "train", num_rows=3) == train[:3]


def test_the_smallest_lock_has_all_its_prompts_and_says_when_asked_for_more():
    from common.tasks import DataError

    assert len(load_task("lock3", "train")) + len(load_task("lock3", "test")) == 1000  # every 3-digit prompt, once
    with pytest.raises(DataError, match="only"):
        load_task("lock3", "test", num_rows=900)


def test_the_pocket_tokenizer_reads_every_embedded_task(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.pocket import pocket_model_dir

    folder = pocket_model_dir(str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) <= 2_000_000
    rows = load_task("arith", "test", num_rows=50) + load_task("chain5", "test", num_rows=50)
    for task in LOCK_TASKS:
        rows += load_task(task, "test", num_rows=5)
    for row in rows:
        for text in (row["prompt"], row["response"]):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids, text
    lock = load_task("lock8", "test", num_rows=1)[0]
    ids = tokenizer(lock["response"], add_special_tokens=False)["input_ids"]
    assert len(ids) == 8 and tokenizer.decode(ids) == lock["response"]  # a token per step, decoded as it was
    assert pocket_model_dir(str(tmp_path)) == folder  # cached
