"""Seconds per call of the two samplers (--sampler plain | static) on the same model and prompts, alone.

    python benchmark/sampler_speed.py                      # the packaged model, make demo's shapes, CPU or GPU
    python benchmark/sampler_speed.py --model_name path/to/model --response_length 128 --repeats 5

Two shapes: a training rollout (8 prompts x 8 samples, --temperature) and a greedy evaluation batch
(64 distinct prompts), both of `arith` prompts and --response_length new tokens. Each sampler is timed
--repeats times per shape, in two rounds (plain, static, plain, static) so a slow start or a neighbour's
load shows as a spread; the medians are printed. On a GPU the static sampler's first call compiles
(printed apart, not in the median). `--sampler auto` picks static on a GPU and plain elsewhere.
"""
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import generation  # noqa: E402
from common.models import load_causal_lm, load_tokenizer  # noqa: E402
from common.tasks import encode_prompts, load_task  # noqa: E402


@dataclass
class Args:
    model_name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """model id or folder (offline: the packaged copy)"""
    response_length: int = 24
    """new tokens per row"""
    temperature: float = 0.7
    """sampling temperature of the rollout shape"""
    repeats: int = 3
    """timed calls per sampler, shape and round"""
    seed: int = 1
    """torch seed for the sampled rollouts"""


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(args: Args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(args.model_name)
    model = load_causal_lm(args.model_name, device, torch.float32)
    rows = load_task("arith", "test", num_rows=64)
    ids, mask = encode_prompts(tokenizer, rows, 256, "sampler_speed")
    ids, mask = ids.to(device), mask.to(device)
    shapes = {f"rollout 8 prompts x 8 samples, T={args.temperature}": (ids[:8].repeat_interleave(8, 0),
                                                                     mask[:8].repeat_interleave(8, 0),
                                                                     args.temperature),
              "greedy evaluation, 64 prompts": (ids, mask, 0.0)}
    times = {(s, m): [] for s in shapes for m in ("plain", "static")}
    torch.manual_seed(args.seed)
    for _ in range(2):
        for mode in ("plain", "static"):
            for shape, (q, qm, temperature) in shapes.items():
                def call(q=q, qm=qm, temperature=temperature, mode=mode):
                    generation.generate(model, q, qm, args.response_length, temperature, tokenizer.pad_token_id,
                                        tokenizer.eos_token_id, sampler=mode)
                if not times[(shape, mode)]:  # the first call: compiles on a GPU
                    print(f"[sampler_speed] {mode:6s} {shape}: first call {timed(call, device):.2f} s", flush=True)
                times[(shape, mode)] += [timed(call, device) for _ in range(args.repeats)]
    print(f"\n{device.type}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, fp32, "
          f"{args.response_length} new tokens; seconds per call (median of {2 * args.repeats}, min-max)\n")
    print("| shape | plain | static | static / plain |\n|---|---|---|---|")
    for shape in shapes:
        plain, static = (statistics.median(times[(shape, m)]) for m in ("plain", "static"))
        spread = {m: f"{min(times[(shape, m)]):.2f}-{max(times[(shape, m)]):.2f}" for m in ("plain", "static")}
        print(f"| {shape} | {plain:.2f} ({spread['plain']}) | {static:.2f} ({spread['static']}) | "
              f"{static / plain:.2f} |")


if __name__ == "__main__":
    main(tyro.cli(Args))
