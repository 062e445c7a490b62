"""The lock task family (lock3, lock4, ..., lock16): an answer of H dependent steps, checked as a whole.

A prompt gives H digits, "open 3 1 4 1 5 9 :", and the answer is their running sum modulo 10, one digit a step:
"3 4 8 9 4 3". Step t needs the prompt's t-th digit and the step before it, so one wrong step dooms every later one,
and the verifier gives 1 only for the whole answer (the response's digits, spaces ignored, equal to it). A policy
that gets each step right with probability p opens the lock about p^H of the time from the prompt, and p^(H - h)
from a reset h steps into the demonstration: the exploration problem the resets of PPO++ and DR-PO are for, with
its difficulty set by H. The rule is the same for every prompt, so a model that learns it opens held-out locks.

Rows: held-out prompts disjoint from the training ones (a hash of the prompt decides), the correct answer as the
demonstration (SFT's target, DR-PO's reset states), and a preference pair: the answer (chosen) and the answer with
one step wrong and carried through (rejected).
"""
import random

from common.arith import _is_test_prompt
from common.errors import DataError

LOCK_WORDS = ("open", ":", *"0123456789")  # every word a lock prompt or answer uses


def lock_answer(digits) -> list:
    """The running sum modulo 10 of `digits`: the answer's H steps."""
    out, total = [], 0
    for d in digits:
        total = (total + d) % 10
        out.append(total)
    return out


def _one_step_wrong(digits, rng: random.Random) -> list:
    """The answer with one step's digit wrong and every later step computed from it (the mistake carried through)."""
    answer = lock_answer(digits)
    step = rng.randrange(len(digits))
    wrong = answer[:step] + [(answer[step] + rng.randint(1, 9)) % 10]
    for d in digits[step + 1:]:
        wrong.append((wrong[-1] + d) % 10)
    return wrong


def lock_rows(task: str, split: str, num_rows: int | None, seed: int = 0) -> list:
    """`num_rows` distinct rows of `task` ("lock8": H = 8) from `split`, shuffled by `seed` (default: 4000 training
    rows, or all there are, and 300 held-out ones)."""

    horizon = int(task.removeprefix("lock"))
    want = num_rows or (4000 if split == "train" else 300)
    total = 10 ** horizon
    rng, seen, rows = random.Random(f"{task}-{split}-{seed}"), set(), []
    if total <= 10 ** 4:  # every prompt of the split, shuffled: a small task can run short, and says so
        order = list(range(total))
        rng.shuffle(order)
        candidates = [i for i in order if _is_test_prompt(_prompt(_digits(i, horizon))) == (split == "test")]
        if num_rows and num_rows > len(candidates):
            raise DataError(f"the {task} task has only {len(candidates)} distinct {split} prompts; ask for fewer")
    else:  # 10^6 prompts and more: random draws never run short
        candidates = iter(lambda: rng.randrange(total), None)
    for i in candidates:
        digits = _digits(i, horizon)
        prompt = _prompt(digits)
        if prompt in seen or _is_test_prompt(prompt) != (split == "test"):
            continue
        seen.add(prompt)
        answer = " ".join(map(str, lock_answer(digits)))
        rows.append({"id": f"{task}-{split}:{len(rows)}", "prompt": prompt, "answer": answer, "response": answer,
                     "chosen": answer, "rejected": " ".join(map(str, _one_step_wrong(digits, rng)))})
        if len(rows) == want:
            break
    return rows


def lock_row_from_record(record: dict, rid: str) -> dict:
    """A lock row from a file's record ("prompt": "open 3 1 4 :", "response": the demonstration, any text); its
    answer comes from the prompt, so a file can hold a reference's imperfect demonstrations (any horizon)."""
    words = record["prompt"].split()
    if len(words) < 3 or words[0] != "open" or words[-1] != ":" or not all(w in "0123456789" for w in words[1:-1]):
        raise DataError(f"{rid}: a lock prompt is 'open' then digits separated by spaces then ':' "
                        f"(e.g. 'open 3 1 4 :'), got {record['prompt']!r}; fix or delete that row")
    answer = " ".join(map(str, lock_answer([int(w) for w in words[1:-1]])))
    return {"id": rid, "prompt": record["prompt"], "answer": answer, "response": record["response"].strip(),
            "chosen": answer, "rejected": record.get("rejected", "")}


def guessing_teacher(rows: list, hidden_fraction: float, seed: int = 0) -> list:
    """Demonstrations of `rows`' prompts written by a teacher that does not know `hidden_fraction` of the 100 facts
    "previous digit + prompt digit mod 10" (a fixed random set, by `seed`): on those it writes a uniformly random
    digit and goes on from it. A model trained on them knows the rule on the other facts and guesses on the hidden
    ones: a per-step accuracy of about 1 - 0.9 hidden_fraction, the same at every step and every horizon, with the
    right digit still among its samples (how benchmark/resets.py makes a reference with partial skill)."""
    rng = random.Random(f"hidden-{seed}")
    facts = [(s, d) for s in range(10) for d in range(10)]
    hidden = set(rng.sample(facts, round(hidden_fraction * len(facts))))
    out = []
    for row in rows:
        written, previous = [], 0
        for d in (int(w) for w in row["prompt"].split()[1:-1]):
            previous = rng.randrange(10) if (previous, d) in hidden else (previous + d) % 10
            written.append(previous)
        out.append({"prompt": row["prompt"], "response": " ".join(map(str, written))})
    return out


def _digits(i: int, horizon: int) -> list:
    return [int(c) for c in str(i).zfill(horizon)]


def _prompt(digits) -> str:
    return "open " + " ".join(map(str, digits)) + " :"


def verify_lock(row, response: str) -> float:
    """1.0 when the response's digits (spaces ignored) are exactly the answer's, else 0.0: no credit for a part."""
    return float("".join(c for c in response if c.isdigit()) == row["answer"].replace(" ", ""))
