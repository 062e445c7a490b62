"""The embedded multi-step task `chain2` .. `chain5`: N chained additions and subtractions, worked step by step, and
its verifier (only the final answer counts). Rows as common/tasks.py describes them; generated offline."""
import random
import re

from common.arith import _split_and_shuffle

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


_ANSWER_LINE = re.compile(r"answer\s*:", re.IGNORECASE)
_INTEGER = re.compile(r"-?\d+")


def verify_chain(row, response: str) -> float:
    """1.0 when the final answer equals the row's: the integer right after the last "Answer:" when the response
    has one (a malformed answer after it scores 0), else the last integer of the response.

    Only the final answer counts: a correct number earlier in the text does not.
    """
    marks = list(_ANSWER_LINE.finditer(response))
    if marks:
        found = re.match(r"\s*\$?\s*(-?\d+)\b(?![.,]\d)", response[marks[-1].end():])
        return float(found is not None and found.group(1) == row["answer"])
    numbers = _INTEGER.findall(response)
    return float(bool(numbers) and numbers[-1] == row["answer"])
