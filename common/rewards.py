"""Rewards behind one call: verifiers (row, response text) -> float, or a reward model's score."""
import math
import re

import torch

from common.errors import UserError
from common.lock import LOCK_TASKS, verify_lock
from common.tasks import format_prompt

_MARKED = re.compile(r"(?:=|\bis\b|\bequals\b|\bequal to\b|\bget\b|####)\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
_LEADING = re.compile(r"^\s*\**\s*(-?\d[\d,]*(?:\.\d+)?)\b"
                      r"(?!\s*(?:[-+*/x×]|times|plus|minus|and\b|divided))", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _clean(number: str) -> str:
    number = number.replace(",", "").rstrip(".")
    return number[:-2] if number.endswith(".0") else number


def extract_answer(text: str) -> str | None:
    """The answer in a free-text response, or None.

    A leading bare number ("42", "45 is larger") wins; else the first number after "=", "is",
    "equals" or "####". A last-number rule would credit echoes of the question ("3 + 4 is ...").
    """
    m = _LEADING.match(text)
    if m:
        return _clean(m.group(1))
    m = _MARKED.search(text)
    return _clean(m.group(1)) if m else None


def verify_arith(row, response: str) -> float:
    """1.0 when the response's answer equals the row's answer, else 0.0."""
    return float(extract_answer(response) == row["answer"])


def verify_gsm8k(row, response: str) -> float:
    """1.0 when the number after the last '####' (else the last number) equals the answer."""
    if "####" in response:
        found = _NUMBER.findall(response.split("####")[-1])
        answer = _clean(found[0]) if found else None
    else:
        found = _NUMBER.findall(response)
        answer = _clean(found[-1]) if found else None
    return float(answer == _clean(row["answer"]))


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


VERIFIERS = {"arith": verify_arith, "gsm8k": verify_gsm8k,
             **{task: verify_chain for task in ("chain2", "chain3", "chain4", "chain5")},
             **{task: verify_lock for task in LOCK_TASKS}}


class RewardError(UserError):
    """A reward function failed or returned a non-finite value; the message names the row."""


def score_with_verifier(verifier, rows, responses):
    """Verifier scores: len(rows) rows and texts -> (B,) float tensor; NaN or an exception names the row."""
    scores = []
    for row, text in zip(rows, responses):
        try:
            value = float(verifier(row, text))
        except Exception as e:
            raise RewardError(f"reward function {getattr(verifier, '__name__', verifier)} raised on row "
                              f"{row.get('id')} (prompt {row['prompt'][:80]!r}, response {text[:80]!r}): {e!r}") from e
        if not math.isfinite(value):
            raise RewardError(f"reward function {getattr(verifier, '__name__', verifier)} returned {value} on row "
                              f"{row.get('id')} (prompt {row['prompt'][:80]!r}, response {text[:80]!r}); "
                              "rewards must be finite numbers")
        scores.append(value)
    return torch.tensor(scores, dtype=torch.float32)


def reward_model_texts(reward_tokenizer, rows, responses):
    """What a reward model reads: the prompt as `format_prompt` writes it for the reward model's tokenizer,
    then the response text as decoded (special tokens, EOS included, skipped). reward.py trains on the same."""
    return [format_prompt(reward_tokenizer, row) + text for row, text in zip(rows, responses)]


def encode_for_reward_model(reward_tokenizer, texts, max_length: int = 2048):
    """Padded ids and attention mask (B, L) of `reward_model_texts`, no special tokens added (the template has them)."""
    return reward_tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                            add_special_tokens=False)


def normalize_rewards(scores, config):
    """(r - config.reward_mean) / config.reward_std where the reward model stores them (reward.py --normalize),
    else r: (B,) -> (B,)."""
    mean, std = getattr(config, "reward_mean", None), getattr(config, "reward_std", None)
    if mean is None or std is None:
        return scores
    return (scores - mean) / std


@torch.no_grad()
def score_with_reward_model(reward_model, reward_tokenizer, rows, responses, batch_size: int, max_length: int = 2048):
    """Reward-model scores of prompt + response texts: -> (B,) float tensor on CPU.

    A reward model saved by reward.py with --normalize stores the mean and std of its raw scores on
    a reference set in its config; the scores returned are then (r - mean) / std.
    """
    texts = reward_model_texts(reward_tokenizer, rows, responses)
    device = next(reward_model.parameters()).device
    scores = []
    for i in range(0, len(texts), batch_size):
        enc = encode_for_reward_model(reward_tokenizer, texts[i:i + batch_size], max_length).to(device)
        scores.append(reward_model(**enc).logits[:, 0].float().cpu())
    scores = normalize_rewards(torch.cat(scores), reward_model.config)
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise RewardError(f"reward model returned {scores[bad[0]].item()} on row {rows[bad[0]].get('id')} "
                          f"(response {responses[bad[0]][:80]!r}); check the reward model's dtype and weights")
    return scores


def score(rows, responses, verifier=None, reward_model=None, reward_tokenizer=None, batch_size: int = 16):
    """One call for both kinds of reward: the reward model when given, else the verifier. -> (B,)"""
    if reward_model is not None:
        return score_with_reward_model(reward_model, reward_tokenizer, rows, responses, batch_size)
    return score_with_verifier(verifier, rows, responses)
