"""Sequence-classification models: reward models (loading one, what it reads: the prompt as the policy's template
writes it, then the response; its scores) and PPO's value model, loaded the same way. Imported only by the files that
use one: a run with --reward_model, reward.py, and the PPO family."""
import functools

import torch
from transformers import AutoModelForSequenceClassification

from common.models import load_tokenizer, no_dropout, resolve_model, shard_frozen
from common.processes import frozen_dtype
from common.rewards import RewardError
from common.tasks import format_prompt


def load_reward_model(name: str, device: torch.device, dtype: torch.dtype, pad_token_id: int,
                      trust_remote_code: bool = False):
    """Sequence-classification model with one output (reward model, or a value model initialised from it)."""
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model(name), num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return no_dropout(model).to(device)


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


def reward_model_scorer(args, accelerator):
    """--reward_model, frozen (bf16 where supported, sharded under FSDP), as the run's score function:
    (rows, response texts) -> (B,) scores, --eval_batch_size texts at a time."""
    tokenizer = load_tokenizer(args.reward_model, args.trust_remote_code)
    model = load_reward_model(args.reward_model, accelerator.device, frozen_dtype(accelerator), tokenizer.pad_token_id,
                              args.trust_remote_code)
    model = shard_frozen(accelerator, model).eval()
    return functools.partial(score_with_reward_model, model, tokenizer, batch_size=args.eval_batch_size)
