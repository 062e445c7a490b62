"""Predicted peak memory per GPU of an RL iteration: weights, gradients, optimizer, frozen models, activations.

    python benchmark/memory_model.py                                    # the table of benchmark/README.md
    python benchmark/memory_model.py --shape 1.7B --method grpo --micro_batch_size 32 --prompt_length 40 \\
        --response_length 128 --precision fp32                          # one configuration, itemised
    python benchmark/memory_model.py --check                            # predictions against peaks measured here

The model counts bytes; it runs nothing. For a Llama-shaped decoder (hidden h, layers n, MLP width i,
key/value width kv, vocabulary V) of P parameters:
- weights: the policy in fp32 (its master copy: bf16 autocast keeps fp32 weights and casts them per
  matrix product, caching a bf16 copy of each weight that trains: 2 bytes more per trained parameter; a
  frozen LoRA base is cast again at each product, never cached); frozen models (reference,
  reward) in bf16 under bf16, else fp32. With LoRA the reference is the policy with its adapters off: 0.
- gradients and AdamW: 4 + 8 bytes per trained parameter (all of P, or the adapters' with LoRA). With
  one micro-batch per optimizer step, gradients fill in as the backward pass frees activations: the
  update holds the larger of the two, not both.
- activations kept for the backward pass, per token and layer (a micro-batch's response tokens, and its
  prompts' tokens once per group of rows that share the prompt): the two RMSNorms' inputs and outputs
  (4h), q, k, v before and after rotary embedding and the attention output (3h + 3kv), the MLP's
  gate, up, SiLU and product (4i): 7h + 3kv + 4i values, in the compute dtype (fp32: 4 bytes, bf16:
  2, the norms' fp32 upcasts aside). SDPA keeps no s x s matrix. With gradient checkpointing only each
  layer's input (h) is kept, plus one layer's full set during its recomputation.
- logits of the response tokens: the LM head's output, its log-softmax and their gradient, fp32:
  3 x 4 bytes x b x T x V.
- PPO's value model: a second trained model of P parameters (or its own adapters with LoRA) with
  its own activations.
- sharding over N GPUs: DDP replicates everything; ZeRO-2 divides gradients and optimizer state by N;
  FSDP (ZeRO-3) divides weights, gradients, optimizer state and the frozen models by N (a layer's
  weights are gathered while it runs: one layer's worth more). Activations are per GPU either way.
- sampling: the KV cache of the whole batch, 2 x n x kv x rows x (prompt + response) in the compute
  dtype, beside the weights and optimizer state (gradients are freed after each step).
- evaluation: a method that holds no reference in training (GRPO at kl_coef 0) loads one for the
  held-out KL (--eval_samples > 0; with LoRA the adapters are switched off instead).
The peak is the largest of update, sampling and evaluation, plus a fixed overhead: on a GPU 1.5 GB for
the CUDA context and the allocator's slack; on CPU the Python runtime's resident memory with torch,
transformers and the rest imported, which --check measures.
"""
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from typing import Literal, Optional

import tyro

GB = 1e9
# Llama-shaped configurations: hidden, layers, MLP width, heads, key/value heads, vocabulary, tied embeddings
SHAPES = {
    "0.135B": dict(h=576, n=30, i=1536, heads=9, kv_heads=3, V=49152, tied=True),  # SmolLM2-135M
    "1.7B": dict(h=2048, n=24, i=8192, heads=32, kv_heads=32, V=49152, tied=True),  # SmolLM2-1.7B
    "7B": dict(h=4096, n=32, i=11008, heads=32, kv_heads=32, V=32000, tied=False),  # Llama-2-7B
    "70B": dict(h=8192, n=80, i=28672, heads=64, kv_heads=8, V=32000, tied=False),  # Llama-2-70B
}
OVERHEAD_GB = 1.5


@dataclass
class Args:
    shape: Optional[Literal["0.135B", "1.7B", "7B", "70B"]] = None
    """one shape, itemised (default: the whole table)"""
    method: Literal["grpo", "ppo", "rebel", "apo"] = "grpo"
    """grpo (no reference at kl_coef 0), ppo (reference and value model; PPO++ and DR-PO alike), rebel, apo
    (reference)"""
    precision: Literal["fp32", "bf16"] = "bf16"
    """compute precision: bf16 = autocast over fp32 weights, frozen models in bf16"""
    lora_r: int = 0
    """LoRA rank on every linear layer (0: full training)"""
    gradient_checkpointing: bool = False
    """keep only each layer's input for the backward pass and recompute the rest"""
    sharding: Literal["ddp", "zero2", "fsdp"] = "ddp"
    """ddp: a full copy per GPU; zero2: gradients and optimizer state sharded; fsdp: weights and frozen models too"""
    num_gpus: int = 1
    """GPUs the sharded state is divided over"""
    micro_batch_size: int = 8
    """sequences per forward/backward on one GPU"""
    prompt_length: int = 64
    """prompt tokens per sequence"""
    response_length: int = 128
    """response tokens per sequence"""
    generation_rows: int = 64
    """sequences sampled at once (prompts x samples per process)"""
    accumulation: bool = True
    """several micro-batches per optimizer step: the first one's gradients are held while the next keeps its
    activations (--no-accumulation: one micro-batch per step, whose gradients fill in as its activations are freed)"""
    group_size: int = 1
    """consecutive rows of a micro-batch that share their prompt (GRPO's num_generations): the update runs that prompt
    through the model once for the group (not with gradient checkpointing, which takes one pass per row)"""
    kl_coef: float = 0.0
    """GRPO's: > 0 holds a reference model"""
    eval_reference: bool = True
    """the evaluation loads a reference for the KL when training holds none (--eval_samples > 0)"""
    overhead_gb: float = OVERHEAD_GB
    """memory outside the model: the CUDA context and allocator slack on a GPU; the Python runtime on CPU"""
    check: bool = False
    """run grpo.py and drpo.py here with the packaged 0.135B model for 2 iterations each (full, LoRA, gradient
    checkpointing; about 15 minutes on 2 CPU cores) and print each measured peak beside its prediction"""
    malloc_mmap_threshold: int = 65536
    """--check: glibc's MALLOC_MMAP_THRESHOLD_ for the runs. 64 KiB: freed tensors leave the resident set at once,
    so the peak counts live tensors, as torch.cuda.max_memory_allocated does on a GPU; 0: glibc's default, whose
    heap keeps freed memory (the resident set a user sees)"""


def parameters(s: dict) -> int:
    kv = s["h"] // s["heads"] * s["kv_heads"]
    layer = 2 * s["h"] * s["h"] + 2 * s["h"] * kv + 3 * s["h"] * s["i"] + 2 * s["h"]
    return s["n"] * layer + s["V"] * s["h"] * (1 if s["tied"] else 2) + s["h"]


def lora_parameters(s: dict, r: int) -> int:
    kv = s["h"] // s["heads"] * s["kv_heads"]
    per_layer = r * ((s["h"] + s["h"]) * 2 + (s["h"] + kv) * 2 + (s["h"] + s["i"]) * 3)
    return s["n"] * per_layer


def shape_of(config) -> dict:
    """The SHAPES entry of a Llama-style transformers config (hidden, layers, MLP width, heads, vocabulary, tied)."""
    return dict(h=config.hidden_size, n=config.num_hidden_layers, i=config.intermediate_size,
                heads=config.num_attention_heads, kv_heads=config.num_key_value_heads, V=config.vocab_size,
                tied=config.tie_word_embeddings)


def predict(s: dict, a: Args) -> dict:
    """Bytes per GPU by part (GB), and the peak."""
    P = parameters(s)
    kv = s["h"] // s["heads"] * s["kv_heads"]
    trained = lora_parameters(s, a.lora_r) if a.lora_r else P
    compute_bytes = 2 if a.precision == "bf16" else 4
    frozen_bytes = 2 if a.precision == "bf16" else 4
    N = a.num_gpus
    shard_w = N if a.sharding == "fsdp" else 1
    shard_o = N if a.sharding in ("zero2", "fsdp") else 1
    models = 2 if a.method == "ppo" else 1  # PPO's value model is a second trained model
    has_ref = a.method in ("ppo", "apo") or (a.method == "grpo" and a.kl_coef > 0)
    out = {}
    out["weights"] = models * 4 * P / shard_w + (models * 2 * trained / shard_w if a.precision == "bf16" else 0)
    if a.sharding == "fsdp" and N > 1:
        out["weights"] += models * (4 + (2 if a.precision == "bf16" else 0)) * P / s["n"]  # one gathered layer
    out["gradients"] = models * 4 * trained / shard_o
    out["optimizer"] = models * 8 * trained / shard_o
    out["frozen models"] = (frozen_bytes * P / shard_w) if has_ref and not a.lora_r else 0.0
    groups = -(-a.micro_batch_size // (1 if a.gradient_checkpointing else a.group_size))  # prompts run in the update
    tokens = a.micro_batch_size * a.response_length + groups * a.prompt_length
    per_token_layer = 7 * s["h"] + 3 * kv + 4 * s["i"]
    if a.gradient_checkpointing:
        acts = tokens * (s["n"] * s["h"] + per_token_layer) * compute_bytes
    else:
        acts = tokens * s["n"] * per_token_layer * compute_bytes
    out["activations"] = models * acts
    out["logits"] = 3 * 4 * a.micro_batch_size * a.response_length * s["V"]
    kv_cache = 2 * s["n"] * kv * a.generation_rows * (a.prompt_length + a.response_length) * compute_bytes
    eval_ref = frozen_bytes * P / shard_w if a.eval_reference and not has_ref and not a.lora_r else 0.0
    out = {k: v / GB for k, v in out.items()}
    update = sum(out.values())
    if not a.accumulation:  # the backward pass frees activations as it allocates gradients: never both whole
        update -= min(out["gradients"], out["activations"] + out["logits"])
    held = sum(out[k] for k in ("weights", "optimizer", "frozen models"))  # between steps: gradients are freed
    out["KV cache (sampling)"] = kv_cache / GB
    out["reference (evaluation)"] = eval_ref / GB
    out["overhead"] = a.overhead_gb
    out["peak"] = max(update, held + kv_cache / GB, held + (eval_ref + kv_cache) / GB) + a.overhead_gb
    out["parameters (B)"] = P / 1e9
    return out


def table() -> str:
    rows = ["| shape | params | method | mode | 1 GPU: DDP | 8 GPUs: ZeRO-2 | 8 GPUs: FSDP | fits one 80 GB GPU |",
            "|---|---|---|---|---|---|---|---|"]
    modes = {"full, fp32": dict(precision="fp32"), "full, bf16": dict(precision="bf16"),
             "bf16 + checkpointing": dict(precision="bf16", gradient_checkpointing=True),
             "LoRA r=16, bf16": dict(precision="bf16", lora_r=16),
             "LoRA + checkpointing": dict(precision="bf16", lora_r=16, gradient_checkpointing=True)}
    for name, s in SHAPES.items():
        for method in ("grpo", "ppo"):
            for mode, kw in modes.items():
                kw = {**kw, "group_size": 8 if method == "grpo" else 1}  # GRPO's 8 samples per prompt
                one = predict(s, Args(method=method, **kw))["peak"]
                z2 = predict(s, Args(method=method, sharding="zero2", num_gpus=8, **kw))["peak"]
                fsdp = predict(s, Args(method=method, sharding="fsdp", num_gpus=8, **kw))["peak"]
                rows.append(f"| {name} | {parameters(s) / 1e9:.2f}B | {method} | {mode} | {one:.1f} | {z2:.1f} | "
                            f"{fsdp:.1f} | {'yes' if one <= 80 else 'no'} |")
    return "\n".join(rows)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (script, its flags, the prediction's settings): the packaged model's defaults otherwise
CHECKS = [
    ("grpo.py", [], dict(method="grpo", group_size=8)),
    ("grpo.py", ["--lora_r", "16"], dict(method="grpo", group_size=8, lora_r=16)),
    ("grpo.py", ["--gradient_checkpointing"], dict(method="grpo", group_size=8, gradient_checkpointing=True)),
    ("grpo.py", ["--micro_batch_size", "32"], dict(method="grpo", group_size=8, micro_batch_size=32)),
    ("drpo.py", [], dict(method="ppo", micro_batch_size=8, generation_rows=16, accumulation=False)),
    ("drpo.py", ["--lora_r", "16"], dict(method="ppo", micro_batch_size=8, generation_rows=16, accumulation=False,
                                          lora_r=16)),
]


def runtime_gb() -> float:
    """Peak resident memory of a Python process that imports what the training scripts import (CPU overhead)."""
    code = ("import resource, sys; sys.path.insert(0, sys.argv[1]); import common.run, peft, torch; "
            "torch.ones(1) @ torch.ones(1); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) * 1024 / GB


def prompt_tokens() -> int:
    """The longest arith training prompt in tokens, chat template included (the packaged model's tokenizer)."""
    sys.path.insert(0, ROOT)
    from common.models import EMBEDDED_MODEL, load_tokenizer
    from common.tasks import encode_prompts, load_task

    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    _, mask = encode_prompts(tokenizer, load_task("arith", "train"), 256, "arith")
    return int(mask.sum(1).max())


def check(malloc_mmap_threshold: int) -> None:
    """Run each of CHECKS for 2 iterations and print its measured peak (RSS, final evaluation included) beside the
    prediction for the packaged model's shape in fp32."""
    overhead, prompt = runtime_gb(), prompt_tokens()
    print(f"CPU, fp32, SmolLM2-135M (packaged); Python runtime {overhead:.2f} GB; prompts up to {prompt} tokens; "
          f"2 iterations, 16 held-out prompts; MALLOC_MMAP_THRESHOLD_={malloc_mmap_threshold or 'default'}\n")
    print("| script | flags | predicted GB | measured GB | error |\n|---|---|---|---|---|")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    if malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(malloc_mmap_threshold)
    errors = []
    for script, flags, settings in CHECKS:
        a = replace(Args(precision="fp32", prompt_length=prompt, response_length=24, micro_batch_size=16,
                         generation_rows=64, overhead_gb=overhead), **settings)
        predicted = predict(SHAPES["0.135B"], a)["peak"]
        with tempfile.TemporaryDirectory() as out:
            subprocess.run([sys.executable, script, "--num_iterations", "2", "--num_eval_prompts", "16",
                            "--output_dir", out, *flags], cwd=ROOT, env=env, check=True, capture_output=True)
            with open(os.path.join(out, f"{script[:-3]}__1", "metrics.jsonl")) as f:
                measured = max(json.loads(line).get("perf/peak_memory_gb", 0) for line in f)
        errors.append(predicted / measured - 1)
        print(f"| {script} | {' '.join(flags) or '(defaults)'} | {predicted:.2f} | {measured:.2f} | "
              f"{errors[-1]:+.1%} |", flush=True)
    print(f"\nlargest error {max(errors, key=abs):+.1%}")


def main(a: Args):
    if a.check:
        check(a.malloc_mmap_threshold)
        return
    if a.shape is None:
        print("Predicted peak GB per GPU; micro-batch 8, prompt 64 + response 128 tokens, 64 rows sampled at once"
              " (--help for the assumptions)\n")
        print(table())
        return
    out = predict(SHAPES[a.shape], a)
    print(f"{a.shape} ({out.pop('parameters (B)'):.2f}B parameters), {a.method}, {a.precision}, LoRA r={a.lora_r}, "
          f"checkpointing {a.gradient_checkpointing}, {a.sharding} on {a.num_gpus} GPU(s):")
    for k, v in out.items():
        print(f"  {k:22s} {v:8.2f} GB")


if __name__ == "__main__":
    main(tyro.cli(Args))
