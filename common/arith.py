"""The embedded arithmetic task `arith` (one operation), and the split and shuffle every embedded task shares."""
import hashlib
import random

from common.errors import DataError


def arith_questions():
    """Every question of the embedded task as (prompt, expression, answer): 1,151 in four families."""
    families = [
        [(f"{a} + {b}", a + b) for a in range(20) for b in range(20)],  # small sums
        [(f"{a} + {b}", a + b) for a in range(20, 60) for b in range(1, 10)],  # two-digit plus one-digit
        [(f"{a} - {b}", a - b) for a in range(10, 40) for b in range(1, 10)],  # differences
        [(f"{a} times {b}", a * b) for a in range(2, 13) for b in range(2, 13)],  # times tables
    ]
    return [(f"What is {e}? Answer with just the number.", e, answer) for family in families for e, answer in family]


def _is_test_prompt(prompt: str) -> bool:
    """Held-out split by a hash of the prompt text, so train and test never share a question."""
    return int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 4 == 0


def _split_and_shuffle(task: str, questions, split: str, num_rows, seed: int, test_default: int = 0):
    """The first `num_rows` (None: all training, `test_default` held-out) of the split's questions shuffled by a
    generator seeded by task, split and seed, and the generator (it draws the rows' wrong answers next)."""
    questions = [q for q in questions if _is_test_prompt(q[0]) == (split == "test")]
    num_rows = num_rows or (len(questions) if split == "train" else test_default)
    if num_rows > len(questions):
        raise DataError(f"the {task} task has only {len(questions)} distinct {split} questions; ask for fewer")
    rng = random.Random(f"{task}-{split}-{seed}")
    rng.shuffle(questions)
    return questions[:num_rows], rng


def arith_rows(split: str, num_rows: int, seed: int = 0):
    """`num_rows` distinct questions of the embedded task from `split` ("train": 876 in all, "test": 275), shuffled."""
    questions, rng = _split_and_shuffle("arith", arith_questions(), split, num_rows, seed)
    rows = []
    for prompt, expression, answer in questions:
        wrong = answer + rng.choice([-2, -1, 1, 2, 10])
        rows.append({"id": f"arith-{split}:{len(rows)}", "prompt": prompt, "answer": str(answer),
                     "response": f"{expression} = {answer}", "chosen": f"{expression} = {answer}",
                     "rejected": f"{expression} = {wrong}"})
    return rows
