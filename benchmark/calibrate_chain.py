"""How hard the chain task is for a model: held-out accuracy from the prompt and from resets into the demonstration.

    python benchmark/calibrate_chain.py                        # the packaged SmolLM2-135M-Instruct, chain2..chain5
    python benchmark/calibrate_chain.py --levels 3 4 --depths 0 0.5 --num_prompts 100

For each level and each roll-in depth d (the fraction of the worked solution's tokens forced before
the model writes: 0 is a start from the prompt, as at evaluation; 0.5 forces half the solution, as
a DR-PO reset would), the model completes `--num_prompts` held-out questions greedily and with
`--num_samples` samples at `--temperature`; a completion counts when the verifier accepts the whole
response (forced prefix and continuation). Prints greedy accuracy, mean sampled accuracy (pass@1)
and pass@k, with the table as markdown. A task where resets help and the prompt does not is one
where the d > 0 columns are far above the d = 0 one.
"""
import os
import sys
from dataclasses import dataclass, field

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.evaluation import pass_at_k  # noqa: E402
from common.generation import generate, truncate_after_eos  # noqa: E402
from common.models import EMBEDDED_MODEL, load_causal_lm, load_tokenizer  # noqa: E402
from common.resets import build_reset_states, splice_reset_responses, tokenize_demonstrations  # noqa: E402
from common.chain import verify_chain  # noqa: E402
from common.rewards import score_with_verifier  # noqa: E402
from common.tasks import encode_prompts, load_task  # noqa: E402


@dataclass
class Args:
    model_name: str = EMBEDDED_MODEL
    """the model to calibrate on (hub id or folder)"""
    levels: list[int] = field(default_factory=lambda: [2, 3, 4, 5])
    """chain levels (operations per question)"""
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75])
    """roll-in depths: the fraction of each demonstration's tokens forced (0: from the prompt)"""
    num_prompts: int = 64
    """held-out questions per level"""
    num_samples: int = 8
    """sampled completions per question, for pass@1 and pass@k"""
    temperature: float = 0.7
    """sampling temperature"""
    response_length: int = 80
    """tokens per response, forced prefix included"""
    batch_size: int = 64
    """sequences per generation call"""
    seed: int = 1
    """sampling seed"""


@torch.no_grad()
def complete(model, tokenizer, ids, mask, demo_ids, rollin, n, temperature, response_length, batch_size):
    """Responses (prefix[:h] + the model's continuation), n per prompt: (P*n, T) tokens."""
    out = []
    per_call = max(1, batch_size // n)
    for i in range(0, len(ids), per_call):
        q = ids[i:i + per_call].repeat_interleave(n, 0)
        qm = mask[i:i + per_call].repeat_interleave(n, 0)
        prefixes, h = demo_ids[i:i + per_call].repeat_interleave(n, 0), rollin[i:i + per_call].repeat_interleave(n)
        states, state_mask = build_reset_states(q, qm, prefixes, h, tokenizer.pad_token_id)
        continuation = generate(model, states, state_mask, response_length - int(h.min()), temperature,
                                tokenizer.pad_token_id, tokenizer.eos_token_id)
        responses, _ = splice_reset_responses(prefixes, h, continuation, response_length, tokenizer.pad_token_id)
        out.append(truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)[0])
    return torch.cat(out)


def main(args: Args):
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model_name)
    model = load_causal_lm(args.model_name, torch.device("cpu"), torch.float32).eval()
    ks = [k for k in (1, 2, 4, 8, 16, 32) if k <= args.num_samples]
    rows_out = []
    for level in args.levels:
        rows = load_task(f"chain{level}", "test", None, args.num_prompts)
        ids, mask = encode_prompts(tokenizer, rows, 512, f"chain{level}")
        demo_ids, lengths = tokenize_demonstrations(tokenizer, rows, args.response_length)  # (P, T), (P,)
        for depth in args.depths:
            rollin = (depth * (lengths - 1)).long()  # forced tokens: never the EOS, at most all but it
            greedy = complete(model, tokenizer, ids, mask, demo_ids, rollin, 1, 0.0, args.response_length,
                              args.batch_size)
            sampled = complete(model, tokenizer, ids, mask, demo_ids, rollin, args.num_samples, args.temperature,
                               args.response_length, args.batch_size)
            texts = lambda t: tokenizer.batch_decode(t, skip_special_tokens=True)  # noqa: E731
            greedy_ok = score_with_verifier(verify_chain, rows, texts(greedy))
            sampled_ok = score_with_verifier(verify_chain, [r for r in rows for _ in range(args.num_samples)],
                                             texts(sampled)).view(len(rows), args.num_samples)
            correct = sampled_ok.sum(1).long()
            passes = {k: sum(pass_at_k(args.num_samples, int(c), k) for c in correct) / len(rows) for k in ks}
            line = {"level": level, "depth": depth, "forced": rollin.float().mean().item(),
                    "greedy": greedy_ok.mean().item(), **{f"pass@{k}": v for k, v in passes.items()}}
            rows_out.append(line)
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in line.items()),
                  flush=True)
    header = ["level", "roll-in depth", "tokens forced", "greedy"] + [f"pass@{k}" for k in ks]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows_out:
        cells = [f"chain{r['level']}", f"{r['depth']:.2f}", f"{r['forced']:.1f}", f"{100 * r['greedy']:.1f}%"]
        print("| " + " | ".join(cells + [f"{100 * r[f'pass@{k}']:.1f}%" for k in ks]) + " |")


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
