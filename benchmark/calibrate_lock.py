"""How far a model is from opening the lock: its per-step accuracy p, and its held-out success from the prompt and
from resets into the demonstration, beside the p^(H - h) the theory predicts.

    python benchmark/calibrate_lock.py --model_name runs/resets/sft_lock8/model --horizons 8
    python benchmark/calibrate_lock.py --model_name pocket --horizons 4 8 --num_prompts 100

For each horizon H (task lockH) and each reset depth h in H/4 steps (0: from the prompt, as at evaluation; h: the
first h digits of the answer forced, as a DR-PO reset would), on `--num_prompts` held-out prompts:
- p: the probability, at `--temperature`, that the model writes the right next digit after a right prefix (teacher
  forced, averaged over the steps after h and the prompts); p_argmax: how often it is the model's top choice;
- greedy: the share of prompts the model opens greedily from depth h (the evaluation's measure);
- sampled: the share of `--num_samples` samples per prompt at `--temperature` that open it (the share a rollout sees);
- p^(H-h): the sampled success if every step were right with probability p, independently.
Written as a markdown table (and JSON with --output_json).
"""
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.generation import generate, truncate_after_eos  # noqa: E402
from common.models import load_causal_lm, load_tokenizer  # noqa: E402
from common.lock import verify_lock  # noqa: E402
from common.resets import build_reset_states, splice_reset_responses, tokenize_demonstrations  # noqa: E402
from common.rewards import score_with_verifier  # noqa: E402
from common.tasks import encode_prompts, load_task  # noqa: E402


@dataclass
class Args:
    model_name: str = "pocket"
    """the model to calibrate (a folder, e.g. an sft.py run's model/, a hub id, or `pocket`)"""
    horizons: list[int] = field(default_factory=lambda: [4, 8])
    """lock horizons H (tasks lockH)"""
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75])
    """reset depths as fractions of H (h = round(fraction * H) digits forced)"""
    num_prompts: int = 200
    """held-out prompts per horizon"""
    num_samples: int = 8
    """samples per prompt for the sampled success"""
    temperature: float = 0.7
    """sampling temperature (the algorithm files' default)"""
    seed: int = 1
    """sampling seed"""
    output_json: Optional[str] = None
    """also write the rows as JSON here"""


@torch.no_grad()
def step_probabilities(model, tokenizer, rows, temperature: float):
    """Teacher forced on the right answer: (N, H) probability at `temperature` of each right answer digit after the
    right prefix, and (N, H) whether it is the top choice."""
    ids, mask = encode_prompts(tokenizer, rows, 512, "lock")
    demo, lengths = tokenize_demonstrations(tokenizer, rows, 64)  # (N, H + 1): the digits and EOS
    H = int(lengths[0]) - 1
    answer = demo[:, :H]
    full = torch.cat([ids, answer], 1)
    full_mask = torch.cat([mask, torch.ones_like(answer)], 1)
    position_ids = (full_mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=full, attention_mask=full_mask, position_ids=position_ids).logits.float()
    logits = logits[:, ids.shape[1] - 1:-1]  # (N, H): the logits that predict each answer token
    probs = torch.softmax(logits / max(temperature, 1e-6), -1).gather(-1, answer[..., None])[..., 0]
    top = logits.argmax(-1) == answer
    return probs, top


@torch.no_grad()
def success_from(model, tokenizer, rows, h: int, num_samples: int, temperature: float, H: int) -> float:
    """The share of `num_samples` completions per prompt (greedy when temperature is 0) that open the lock, after the
    first h answer tokens are forced."""
    ids, mask = encode_prompts(tokenizer, rows, 512, "lock")
    demo, _ = tokenize_demonstrations(tokenizer, rows, H + 1)
    q, qm, prefixes = (t.repeat_interleave(num_samples, 0) for t in (ids, mask, demo))
    rollin = torch.full((len(q),), h, dtype=torch.long)
    states, state_mask = build_reset_states(q, qm, prefixes, rollin, tokenizer.pad_token_id)
    continuation = generate(model, states, state_mask, H + 2 - h, temperature, tokenizer.pad_token_id,
                            tokenizer.eos_token_id)
    responses, _ = splice_reset_responses(prefixes, rollin, continuation, H + 2, tokenizer.pad_token_id)
    responses = truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)[0]
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return score_with_verifier(verify_lock, [r for r in rows for _ in range(num_samples)], texts).mean().item()


def calibrate(model, tokenizer, horizon: int, depths, num_prompts: int, num_samples: int, temperature: float) -> list:
    """One table row per depth for lock{horizon} (see the module's docstring)."""
    rows = load_task(f"lock{horizon}", "test", None, num_prompts)
    probs, top = step_probabilities(model, tokenizer, rows, temperature)
    out = []
    for fraction in depths:
        h = round(fraction * horizon)
        p = probs[:, h:].mean().item()
        out.append({"task": f"lock{horizon}", "h": h, "p": p, "p_argmax": top[:, h:].float().mean().item(),
                    "greedy": success_from(model, tokenizer, rows, h, 1, 0.0, horizon),
                    "sampled": success_from(model, tokenizer, rows, h, num_samples, temperature, horizon),
                    "p^(H-h)": p ** (horizon - h)})
    return out


def table(lines: list) -> str:
    out = ["| task | reset depth h | p (next digit right) | p_argmax | greedy success | sampled success | p^(H-h) |",
           "|---|---|---|---|---|---|---|"]
    for r in lines:
        out.append(f"| {r['task']} | {r['h']} | {r['p']:.3f} | {r['p_argmax']:.3f} | {100 * r['greedy']:.1f}% | "
                   f"{100 * r['sampled']:.1f}% | {100 * r['p^(H-h)']:.1f}% |")
    return "\n".join(out)


def main(args: Args) -> list:
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model_name)
    model = load_causal_lm(args.model_name, torch.device("cpu"), torch.float32).eval()
    lines = []
    for horizon in args.horizons:
        lines += calibrate(model, tokenizer, horizon, args.depths, args.num_prompts, args.num_samples,
                           args.temperature)
    print(table(lines))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(lines, f, indent=1)
    return lines


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
