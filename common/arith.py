"""The embedded arithmetic tasks, generated offline: `arith` (one operation) and `chain2` .. `chain5` (N chained
operations, worked step by step). Rows as common/tasks.py describes them; the held-out split by a hash of the prompt."""
import hashlib
import random

from common.errors import DataError

CHAIN_TASKS = ("chain2", "chain3", "chain4", "chain5")  # the number is the level: operations per question


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
    """The first `num_rows` of the split's questions (by `_is_test_prompt` of each one's first field) after a shuffle
    seeded by task, split and seed, and that generator (it goes on to draw the rows' wrong answers). num_rows None:
    every training question, `test_default` held-out ones."""
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
        rows.append({
            "id": f"arith-{split}:{len(rows)}",
            "prompt": prompt,
            "answer": str(answer),
            "response": f"{expression} = {answer}",
            "chosen": f"{expression} = {answer}",
            "rejected": f"{expression} = {wrong}",
        })
    return rows


# ---------------------------------------------------------------------------------------------
# The embedded multi-step task: chained additions and subtractions, solved step by step
# ---------------------------------------------------------------------------------------------
CHAIN_INSTRUCTION = "Work it out one step at a time, then give the result as 'Answer: <number>'."


def chain_questions(ops: int, count: int = 6000):
    """`count` distinct questions of `ops` operations, as (expression, worked solution, answer), in a fixed order.

    Operands are 2..30; a subtraction that would go below 0 becomes an addition, so every step's
    result is a whole number from 0 to 180. The worked solution writes one step per sentence:
    "17 + 25 = 42. 42 - 8 = 34. 34 + 13 = 47. Answer: 47".
    """
    rng, seen, out = random.Random(f"chain-{ops}"), set(), []
    while len(out) < count:
        value = rng.randint(2, 30)
        expression, steps = str(value), []
        for _ in range(ops):
            operand = rng.randint(2, 30)
            sign = "+" if rng.random() < 0.5 or value - operand < 0 else "-"
            new = value + operand if sign == "+" else value - operand
            expression += f" {sign} {operand}"
            steps.append(f"{value} {sign} {operand} = {new}.")
            value = new
        if expression not in seen:
            seen.add(expression)
            out.append((expression, " ".join(steps) + f" Answer: {value}", value))
    return out


def chain_rows(task: str, split: str, num_rows: int | None, seed: int = 0):
    """Rows of the chain task `task` ("chain3": 3 operations) from `split`, shuffled by `seed`.

    Train and test are disjoint (a hash of the question decides). Each row has the worked solution as
    its demonstration (`response`, the states DR-PO resets to, SFT's target) and a preference pair:
    the solution (chosen) and the same solution with one step miscalculated and carried through (rejected).
    """
    ops = int(task.removeprefix("chain"))
    questions, rng = _split_and_shuffle(task, chain_questions(ops), split, num_rows, seed, test_default=300)
    rows = []
    for expression, solution, answer in questions:
        rows.append({"id": f"{task}-{split}:{len(rows)}", "prompt": f"What is {expression}? {CHAIN_INSTRUCTION}",
                     "answer": str(answer), "response": solution, "chosen": solution,
                     "rejected": _miscalculated(expression, rng)})
    return rows


def _miscalculated(expression: str, rng: random.Random) -> str:
    """The worked solution of `expression` with one step off by 1, 2 or 10, carried through to a wrong answer."""
    tokens = expression.split()
    value, wrong_step, steps = int(tokens[0]), rng.randrange((len(tokens) - 1) // 2), []
    for k in range(0, len(tokens) - 1, 2):
        sign, operand = tokens[k + 1], int(tokens[k + 2])
        new = value + operand if sign == "+" else value - operand
        if k // 2 == wrong_step:
            new += rng.choice([-10, -2, -1, 1, 2, 10])
        steps.append(f"{value} {sign} {operand} = {new}.")
        value = new
    return " ".join(steps) + f" Answer: {value}"
