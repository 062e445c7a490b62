"""Speed and memory of the algorithm files, and of grpo.py against the bound for the same batch.

    python benchmark/bench.py                                        # grpo.py, default configuration
    python benchmark/bench.py --scripts grpo rebel apo --prompts_per_iteration 16
    python benchmark/bench.py --extra="--grpo.kl_coef 0.04"

Each script runs for a few iterations as its own process (short evaluation); seconds per
iteration, generation seconds, generated tokens per second and peak memory are read from its
metrics.jsonl (median over the iterations after the first, which warms up). apo.py's stage 1 is
reported apart (`stage 1 s`): it is paid once per model, task and settings and cached in
`{output_dir}/apo_stage1/`, so a second benchmark reuses it.

The bound, for grpo.py: for one batch of the same prompts, group size, response length and
micro-batch size, one sampled `generate` plus one forward/backward over the batch (plus one
reference forward when the KL coefficient is non-zero), with nothing else. The ratio says what
the script's plumbing (scoring, logging, optimizer step, EOS handling) costs on top of the work
it cannot avoid.
"""
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.generation import batched_logprobs, forward_logprobs, generate, truncate_after_eos  # noqa: E402
from common.models import load_causal_lm, load_tokenizer  # noqa: E402
from common.run import peak_memory_gb  # noqa: E402
from common.tasks import encode_prompts, load_task  # noqa: E402


@dataclass
class Args:
    scripts: tuple[str, ...] = ("grpo",)
    """algorithm files to time (without .py): grpo ppo ppo_pp drpo rebel apo"""
    iterations: int = 4
    """iterations per script (the first is a warm-up and is left out of the median)"""
    prompts_per_iteration: Optional[int] = None
    """the same number of prompts per iteration for every script (default: each script's own)"""
    extra: str = ""
    """extra flags for every script, e.g. --extra="--response_length 32" (the bound follows grpo.py's)"""
    bound: bool = True
    """also time the bound for grpo.py's batch (when grpo is among --scripts)"""
    bound_repeats: int = 2
    """times the bound is measured (the median is reported)"""
    output_dir: str = "runs/bench"
    """where the scripts' run folders (and apo.py's stage-1 cache) go"""


def grpo_defaults(flags: list):
    """grpo.py's Args with `flags` applied, without running it."""
    import grpo

    return tyro.cli(grpo.Args, args=flags, use_underscores=True)


def time_script(name: str, flags: list, iterations: int, output_dir: str) -> dict:
    """Run `name`.py for `iterations` iterations; medians of its perf metrics, peak memory, wall time."""
    cmd = [sys.executable, os.path.join(ROOT, f"{name}.py"), "--num_iterations", str(iterations),
           "--num_eval_prompts", "8",
           "--output_dir", output_dir, "--exp_name", f"bench_{name}", *flags]
    start = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.time() - start
    with open(os.path.join(output_dir, f"bench_{name}__1", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train = [r for r in rows if "perf/seconds_per_iter" in r][1:]
    out = {k: float(np.median([r[k] for r in train]))
           for k in ("perf/seconds_per_iter", "perf/generate_seconds", "perf/tokens_per_second")}
    out["perf/peak_memory_gb"] = max(r["perf/peak_memory_gb"] for r in train)
    out["stage1"] = next((r["perf/stage1_seconds"] for r in rows if "perf/stage1_seconds" in r), None)
    out["wall"] = wall
    return out


if __name__ == "__main__":
    bench = tyro.cli(Args, use_underscores=True)
    flags = shlex.split(bench.extra) + (["--prompts_per_iteration", str(bench.prompts_per_iteration)]
                                        if bench.prompts_per_iteration else [])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines = ["| script | seconds per iteration | of which generation (s) | generated tokens per second "
             "| peak memory (GB) | stage 1 s | wall s |",
             "|---|---|---|---|---|---|---|"]
    results = {}
    for name in bench.scripts:
        print(f"[bench] {name}.py {' '.join(flags)}: {bench.iterations} iterations", flush=True)
        r = results[name] = time_script(name, flags, bench.iterations, bench.output_dir)
        stage1 = f"{r['stage1']:.0f}" if r["stage1"] is not None else "-"
        lines.append(f"| {name}.py | {r['perf/seconds_per_iter']:.2f} | {r['perf/generate_seconds']:.2f} | "
                     f"{r['perf/tokens_per_second']:.1f} | {r['perf/peak_memory_gb']:.2f} | {stage1} | "
                     f"{r['wall']:.0f} |")

    if bench.bound and "grpo" in bench.scripts:
        # the bound: the same batch as grpo.py's, only the unavoidable work
        cfg = grpo_defaults(flags)
        G, T = cfg.grpo.num_generations, cfg.response_length
        tokenizer = load_tokenizer(cfg.model_name)
        policy = load_causal_lm(cfg.model_name, device, torch.float32)
        ref = load_causal_lm(cfg.model_name, device, torch.float32).eval() if cfg.grpo.kl_coef > 0 else None
        rows = load_task(cfg.task, "train", cfg.data_files, cfg.prompts_per_iteration)
        ids, mask = encode_prompts(tokenizer, rows, cfg.max_prompt_length, "bench")
        ids, mask = ids.repeat_interleave(G, 0).to(device), mask.repeat_interleave(G, 0).to(device)
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
                lp = forward_logprobs(policy, qr[i:i + cfg.micro_batch_size], att[i:i + cfg.micro_batch_size], T,
                                      cfg.temperature)
                (lp * rmask[i:i + cfg.micro_batch_size]).sum().backward()
            policy.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings.append((time.time() - start, gen_seconds, lengths.sum().item()))
        bound, bound_gen, tokens = (float(np.median([t[i] for t in timings])) for i in range(3))
        lines.append(f"| bound (grpo batch: generate + forward/backward) | {bound:.2f} | {bound_gen:.2f} | "
                     f"{tokens / bound:.1f} | "
                     f"{peak_memory_gb(device):.2f} | - | - |")
        lines.append(f"\ngrpo.py iteration / bound = {results['grpo']['perf/seconds_per_iter'] / bound:.2f} "
                     f"(target <= 1.3); "
                     f"{cfg.prompts_per_iteration} prompts x {G} samples, {T} tokens, "
                     f"micro-batch {cfg.micro_batch_size}, "
                     f"kl_coef {cfg.grpo.kl_coef}")

    table = "\n".join(lines)
    print(f"\n[bench] device {device}\n{table}")
    os.makedirs(bench.output_dir, exist_ok=True)
    with open(os.path.join(bench.output_dir, "bench.md"), "w") as f:
        f.write(table + "\n")
