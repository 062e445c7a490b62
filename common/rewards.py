"""Each task's verifier, (row, response text) -> float (arith's here, the others' beside their rows), and scores from
them that name the row where one fails. A learned reward model's scores are common/reward_models.py's."""
import math
import re

import torch

from common.errors import UserError
from common.tasks import CHAIN_TASKS, LOCK_TASKS

_MARKED = re.compile(r"(?:=|\bis\b|\bequals\b|\bequal to\b|\bget\b|####)\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
_LEADING = re.compile(r"^\s*\**\s*(-?\d[\d,]*(?:\.\d+)?)\b"
                      r"(?!\s*(?:[-+*/x×]|times|plus|minus|and\b|divided))", re.IGNORECASE)


def clean_number(number: str) -> str:
    """A number as answers are compared: no commas, no trailing "." or ".0"."""
    number = number.replace(",", "").rstrip(".")
    return number[:-2] if number.endswith(".0") else number


def extract_answer(text: str) -> str | None:
    """The answer in a free-text response, or None: a leading bare number ("42", "45 is larger"), else the first
    number after "=", "is", "equals" or "####" (not the last number: it would credit echoes of the question)."""
    m = _LEADING.match(text)
    if m:
        return clean_number(m.group(1))
    m = _MARKED.search(text)
    return clean_number(m.group(1)) if m else None


def verify_arith(row, response: str) -> float:
    """1.0 when the response's answer equals the row's answer, else 0.0."""
    return float(extract_answer(response) == row["answer"])


def verifier_for(task: str):
    """The task's verifier (row, response text) -> float, or None for a task without one (tldr, hh)."""
    if task in CHAIN_TASKS:
        from common.chain import verify_chain

        return verify_chain
    if task in LOCK_TASKS:
        from common.lock import verify_lock

        return verify_lock
    if task == "gsm8k":
        from common.task_data import verify_gsm8k

        return verify_gsm8k
    return {"arith": verify_arith}.get(task)


class RewardError(UserError):
    """A reward function failed or returned a non-finite value; the message names the row."""


def score_with_verifier(verifier, rows, responses):
    """Verifier scores: len(rows) rows and texts -> (B,) float tensor; NaN or an exception names the row."""
    scores, name = [], getattr(verifier, "__name__", verifier)
    for row, text in zip(rows, responses):
        where = f"row {row.get('id')} (prompt {row['prompt'][:80]!r}, response {text[:80]!r})"
        try:
            value = float(verifier(row, text))
        except Exception as e:
            raise RewardError(f"reward function {name} raised on {where}: {e!r}") from e
        if not math.isfinite(value):
            raise RewardError(f"reward function {name} returned {value} on {where}; rewards must be finite numbers")
        scores.append(value)
    return torch.tensor(scores, dtype=torch.float32)
