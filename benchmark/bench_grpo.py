"""Speed and memory of grpo.py against the bound for the same batch on the same machine.

    python benchmark/bench_grpo.py                         # default GRPO configuration, 4 iterations
    python benchmark/bench_grpo.py --extra "--grpo.kl_coef 0.04"

It runs grpo.py for a few iterations (as its own process) and reads seconds per iteration,
generated tokens per second and peak memory from its metrics.jsonl. Then it times the bound:
for one batch of the same prompts, group size, response length and micro-batch size, one
sampled `generate` plus one forward/backward over the batch (plus one reference forward when the
KL coefficient is non-zero), with nothing else. The ratio says how much the script's plumbing
(scoring, logging, optimizer step, EOS handling) costs on top of the work it cannot avoid.
"""
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.generation import batched_logprobs, forward_logprobs, generate, truncate_after_eos  # noqa: E402
from common.models import load_causal_lm, load_tokenizer  # noqa: E402
from common.tasks import encode_prompts, load_task  # noqa: E402
from common.tracking import peak_memory_gb  # noqa: E402


@dataclass
class Args:
    iterations: int = 4
    """grpo.py iterations to time (the first is a warm-up and is left out of the median)"""
    bound_repeats: int = 2
    """times the bound is measured (the median is reported)"""
    extra: str = ""
    """extra grpo.py flags, e.g. "--grpo.kl_coef 0.04" (the bound follows the batch settings)"""
    skip_script: bool = False
    """measure only the bound"""


def grpo_defaults(extra: str) -> dict:
    """The parsed grpo.py Args with `extra` applied, without running it."""
    import grpo

    return tyro.cli(grpo.Args, args=shlex.split(extra), use_underscores=True)


if __name__ == "__main__":
    bench = tyro.cli(Args, use_underscores=True)
    cfg = grpo_defaults(bench.extra)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    G, T = cfg.grpo.num_generations, cfg.response_length
    print(f"[bench] device {device}, {cfg.prompts_per_iteration} prompts x {G} samples, {T} tokens, "
          f"micro-batch {cfg.micro_batch_size}, kl_coef {cfg.grpo.kl_coef}")

    script = {}
    if not bench.skip_script:
        out = tempfile.mkdtemp()
        cmd = [sys.executable, os.path.join(ROOT, "grpo.py"), "--num_iterations", str(bench.iterations),
               "--num_eval_prompts", "8", "--output_dir", out, *shlex.split(bench.extra)]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        with open(os.path.join(out, f"{cfg.exp_name}__{cfg.seed}", "metrics.jsonl")) as f:
            rows = [r for r in map(json.loads, f) if "perf/seconds_per_iter" in r][1:]
        script = {k: float(np.median([r[k] for r in rows])) for k in
                  ("perf/seconds_per_iter", "perf/generate_seconds", "perf/tokens_per_second", "perf/peak_memory_gb")}

    # the bound: the same batch, only the unavoidable work
    tokenizer = load_tokenizer(cfg.model_name)
    policy = load_causal_lm(cfg.model_name, device, torch.float32)
    ref = load_causal_lm(cfg.model_name, device, torch.float32).eval() if cfg.grpo.kl_coef > 0 else None
    rows = load_task(cfg.task, "train", cfg.data_files, cfg.prompts_per_iteration)
    ids, mask = encode_prompts(tokenizer, rows, cfg.max_prompt_length, "bench")
    ids, mask = ids.repeat_interleave(G, 0).to(device), mask.repeat_interleave(G, 0).to(device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-12)
    timings = []
    for _ in range(bench.bound_repeats):
        start = time.time()
        responses = generate(policy, ids, mask, T, cfg.temperature, tokenizer.pad_token_id, tokenizer.eos_token_id)
        gen_seconds = time.time() - start
        responses, rmask, lengths, _ = truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
        qr, att = torch.cat([ids, responses], 1), torch.cat([mask, rmask.long()], 1)
        if ref is not None:
            batched_logprobs(ref, qr, att, T, cfg.temperature, cfg.micro_batch_size)
        for i in range(0, qr.shape[0], cfg.micro_batch_size):
            lp = forward_logprobs(policy, qr[i:i + cfg.micro_batch_size], att[i:i + cfg.micro_batch_size], T, cfg.temperature)
            (lp * rmask[i:i + cfg.micro_batch_size]).sum().backward()
        optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append((time.time() - start, gen_seconds, lengths.sum().item()))
    bound, bound_gen, tokens = (float(np.median([t[i] for t in timings])) for i in range(3))

    print("\n| measure | grpo.py | bound |")
    print("|---|---|---|")
    if script:
        print(f"| seconds per iteration | {script['perf/seconds_per_iter']:.2f} | {bound:.2f} |")
        print(f"| of which generation (s) | {script['perf/generate_seconds']:.2f} | {bound_gen:.2f} |")
        print(f"| generated tokens per second | {script['perf/tokens_per_second']:.1f} | {tokens / bound:.1f} |")
        print(f"| peak memory (GB) | {script['perf/peak_memory_gb']:.2f} | {peak_memory_gb(device):.2f} |")
        print(f"\n[bench] grpo.py iteration / bound = {script['perf/seconds_per_iter'] / bound:.2f} (target <= 1.3)")
    else:
        print(f"| seconds per iteration | - | {bound:.2f} |")
        print(f"| generated tokens per second | - | {tokens / bound:.1f} |")
