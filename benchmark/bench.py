"""Speed and memory of the algorithm files, and of grpo.py against the bound for the same batch.

    python benchmark/bench.py                                        # grpo.py, default configuration
    python benchmark/bench.py --scripts grpo rebel apo --prompts_per_iteration 16
    python benchmark/bench.py --extra="--grpo.kl_coef 0.04"
    python benchmark/bench.py --model_size 1.7B --extra="--response_length 128 --grpo.num_generations 8"
    python benchmark/bench.py --config path/to/config.json          # any causal-LM config, random weights

--model_size (a Llama shape of benchmark/memory_model.py) or --config builds a model of that shape with
random weights and the packaged SmolLM2 tokenizer, saved once under {output_dir}/models/ and passed to every
script as --model_name: speed and memory need the shape, not the weights, and nothing is downloaded.

Each script runs for a few iterations as its own process (short evaluation); seconds per
iteration, generation seconds, generated tokens per second and peak memory are read from its
metrics.jsonl (median over the iterations after the first, which warms up). apo.py's stage 1 is
reported apart (`stage 1 s`): it is paid once per model, task and settings and cached in
`{output_dir}/apo_stage1/`, so a second benchmark reuses it.

The floor, for grpo.py: the time no implementation can beat on this device: reading the weights once per
decode step (response_length steps, all rows at once) at the memory bandwidth, plus 6 x parameters x
tokens (forward and backward over prompt + response) at the peak FLOP/s of the compute dtype. The
bandwidth and peak of known GPUs are in DEVICES (dense, no sparsity); elsewhere pass --bandwidth_gbs and
--peak_tflops (without them the floor is not reported).

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

from common import generation  # noqa: E402
from common.generation import batched_logprobs, forward_logprobs, generate, truncate_after_eos  # noqa: E402
from common.models import load_causal_lm, load_tokenizer  # noqa: E402
from common.processes import peak_memory_gb  # noqa: E402
from common.tasks import encode_prompts, load_task  # noqa: E402
from memory_model import SHAPES  # noqa: E402

# memory bandwidth (GB/s) and dense peak TFLOP/s (bf16, fp32 without tensor cores) of known GPUs, by name
DEVICES = {"H200": (4800, 989, 67), "H100 PCIe": (2000, 756, 51), "H100": (3350, 989, 67),
           "A100-SXM4-80GB": (2039, 312, 19.5), "A100": (1555, 312, 19.5), "L40S": (864, 362, 91.6),
           "L4": (300, 121, 30.3), "A10G": (600, 70, 31.2)}


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
    model_size: Optional[str] = None
    """a Llama shape with random weights instead of --model_name: 0.135B, 1.7B, 7B or 70B (memory_model.py)"""
    config: Optional[str] = None
    """a model config (config.json or its folder) to build with random weights instead of --model_name"""
    bandwidth_gbs: Optional[float] = None
    """memory bandwidth for the floor, GB/s (default: the GPU's from DEVICES; none on CPU)"""
    peak_tflops: Optional[float] = None
    """peak TFLOP/s of the compute dtype for the floor (default: the GPU's from DEVICES; none on CPU)"""


def grpo_defaults(flags: list):
    """grpo.py's Args with `flags` applied, without running it."""
    import grpo

    return tyro.cli(grpo.Args, args=flags, use_underscores=True)


def random_model(bench: Args) -> str:
    """The folder of a randomly initialised model of --model_size or --config with the SmolLM2 tokenizer
    (built once, bf16 on disk), for --model_name."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from common.models import EMBEDDED_MODEL

    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    if bench.model_size:
        if bench.model_size not in SHAPES:
            raise SystemExit(f"[bench] unknown --model_size {bench.model_size}; choose from {' '.join(SHAPES)}")
        s = SHAPES[bench.model_size]
        config = LlamaConfig(hidden_size=s["h"], num_hidden_layers=s["n"], intermediate_size=s["i"],
                             num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                             tie_word_embeddings=s["tied"], max_position_embeddings=8192)
        name = bench.model_size
    else:
        config = AutoConfig.from_pretrained(bench.config)
        name = os.path.basename(os.path.dirname(os.path.abspath(bench.config))) + "_random"
    config.vocab_size = len(tokenizer)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (tokenizer.pad_token_id, tokenizer.bos_token_id,
                                                                     tokenizer.eos_token_id)
    path = os.path.join(bench.output_dir, "models", name)
    if not os.path.exists(os.path.join(path, "config.json")):
        print(f"[bench] building {name} with random weights in {path}", flush=True)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def device_figures(bench: Args, device: torch.device, bf16: bool):
    """(name, bandwidth GB/s, peak TFLOP/s) for the floor; bandwidth and peak None where unknown."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    known = next((v for k, v in DEVICES.items() if k in name), None)
    bandwidth = bench.bandwidth_gbs or (known[0] if known else None)
    peak = bench.peak_tflops or ((known[1] if bf16 else known[2]) if known else None)
    return name, bandwidth, peak


def script_command(name: str, flags: list, iterations: int, output_dir: str) -> list:
    """`python name.py` for `iterations` iterations with a short evaluation, its run folder in `output_dir`."""
    return [sys.executable, os.path.join(ROOT, f"{name}.py"), "--num_iterations", str(iterations),
            "--num_eval_prompts", "8", "--output_dir", output_dir, "--exp_name", f"bench_{name}", *flags]


def read_timings(name: str, output_dir: str) -> dict:
    """Medians of the perf metrics of `name`'s run in `output_dir` over the iterations after the first (the first
    warms up: its seconds apart), its peak memory through training (`perf/peak_memory_gb`) and through the whole
    run, the final evaluation included (`run_peak_memory_gb`), and apo.py's stage-1 seconds."""
    with open(os.path.join(output_dir, f"bench_{name}__1", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    timed = [r for r in rows if "perf/seconds_per_iter" in r]
    train = timed[1:]
    if not train:
        raise ValueError(f"bench_{name} logged no iteration after the first in {output_dir}")
    out = {k: float(np.median([r[k] for r in train]))
           for k in ("perf/seconds_per_iter", "perf/generate_seconds", "perf/tokens_per_second")}
    out["perf/peak_memory_gb"] = max(r["perf/peak_memory_gb"] for r in train)
    out["run_peak_memory_gb"] = max(r.get("perf/peak_memory_gb", 0) for r in rows)
    out["stage1"] = next((r["perf/stage1_seconds"] for r in rows if "perf/stage1_seconds" in r), None)
    out["first_seconds_per_iter"], out["iterations"] = timed[0]["perf/seconds_per_iter"], len(timed)
    return out


def time_script(name: str, flags: list, iterations: int, output_dir: str) -> dict:
    """Run `name`.py for `iterations` iterations; medians of its perf metrics, peak memory, wall time."""
    start = time.time()
    subprocess.run(script_command(name, flags, iterations, output_dir), check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return {**read_timings(name, output_dir), "wall": time.time() - start}


def prompt_batch(cfg, tokenizer):
    """grpo.py's batch of prompts for `cfg` (the task's first --prompts_per_iteration training prompts), each
    repeated for its group: ids and mask (B, P) on CPU."""
    rows = load_task(cfg.task, "train", cfg.data_files, cfg.prompts_per_iteration)
    ids, mask = encode_prompts(tokenizer, rows, cfg.max_prompt_length, "bench")
    G = cfg.grpo.num_generations
    return ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)


def floor_seconds(n_params: int, decode_steps: int, tokens_trained: int, bf16: bool, bandwidth: float,
                  peak: float):
    """The floor (s) and how it is made: the weights read once per decode step at `bandwidth` GB/s, plus
    6 x parameters x tokens (forward and backward) at `peak` TFLOP/s."""
    weight_bytes = n_params * (2 if bf16 else 4)
    floor = decode_steps * weight_bytes / (bandwidth * 1e9) + 6 * n_params * tokens_trained / (peak * 1e12)
    return floor, (f"{decode_steps} decode steps x {weight_bytes / 1e9:.2f} GB of weights at {bandwidth:g} GB/s + "
                   f"6 x params x {tokens_trained} tokens at {peak:g} TFLOP/s")


if __name__ == "__main__":
    bench = tyro.cli(Args, use_underscores=True)
    flags = shlex.split(bench.extra) + (["--prompts_per_iteration", str(bench.prompts_per_iteration)]
                                        if bench.prompts_per_iteration else [])
    flags += ["--model_name", random_model(bench)] if bench.model_size or bench.config else []
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
        bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda"
                                                 and torch.cuda.is_bf16_supported())
        tokenizer = load_tokenizer(cfg.model_name)
        policy = load_causal_lm(cfg.model_name, device, torch.float32)
        ref = (load_causal_lm(cfg.model_name, device, torch.bfloat16 if bf16 else torch.float32).eval()
               if cfg.grpo.kl_coef > 0 else None)
        ids, mask = (t.to(device) for t in prompt_batch(cfg, tokenizer))
        timings = []
        for _ in range(bench.bound_repeats):
            start = time.time()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):  # as grpo.py computes
                responses = generate(policy, ids, mask, T, cfg.temperature, tokenizer.pad_token_id,
                                     tokenizer.eos_token_id, sampler=cfg.sampler)
                gen_seconds = time.time() - start
                responses, rmask, lengths, _ = truncate_after_eos(responses, tokenizer.eos_token_id,
                                                                  tokenizer.pad_token_id)
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
        # the floor: weights read once per decode step, and 6 x parameters x tokens of arithmetic
        n_params = sum(p.numel() for p in policy.parameters())
        gpu, bandwidth, peak = device_figures(bench, device, bf16)
        tokens_trained = ids.shape[0] * (ids.shape[1] + T)
        shape = (f"{n_params / 1e9:.3f}B parameters ({policy.config.num_hidden_layers} layers, hidden "
                 f"{policy.config.hidden_size}), {'bf16 autocast' if bf16 else 'fp32'}, sampler "
                 f"{'static' if generation.uses_static_sampler(policy, device, cfg.sampler) else 'plain'}")
        if bandwidth and peak:
            floor, how = floor_seconds(n_params, T, tokens_trained, bf16, bandwidth, peak)
            lines.append(f"grpo.py iteration / floor = {results['grpo']['perf/seconds_per_iter'] / floor:.1f} "
                         f"(floor {floor:.3f} s: {how})")
        lines.insert(0, f"{gpu}; {shape}\n")

    table = "\n".join(lines)
    print(f"\n[bench] {table}")
    os.makedirs(bench.output_dir, exist_ok=True)
    with open(os.path.join(bench.output_dir, "bench.md"), "w") as f:
        f.write(table + "\n")
