"""Predicted peak memory per GPU of an RL iteration: weights, gradients, optimizer, frozen models, activations.

    python benchmark/memory_model.py                                    # the table of benchmark/README.md
    python benchmark/memory_model.py --shape 1.7B --method grpo --micro_batch_size 32 --prompt_length 40 \\
        --response_length 128 --precision fp32                          # one configuration, itemised

The model counts bytes; it runs nothing. For a Llama-shaped decoder (hidden h, layers n, MLP width i,
key/value width kv, vocabulary V) of P parameters:
- weights: the policy in fp32 (its master copy: bf16 autocast keeps fp32 weights and casts them per
  matrix product, which caches a bf16 copy of each weight, 2 bytes x P more); frozen models (reference,
  reward) in bf16 under bf16, else fp32. With LoRA the reference is the policy with its adapters off: 0.
- gradients and AdamW: 4 + 8 bytes per trained parameter (all of P, or the adapters' with LoRA).
- activations kept for the backward pass, per token and layer: the two RMSNorms' inputs and outputs
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
  dtype; it is freed before the update, so the peak is the larger of sampling and update.
A fixed 1.5 GB per GPU covers the CUDA context and the allocator's slack.
"""
from dataclasses import dataclass
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
    sharding: Literal["ddp", "zero2", "fsdp"] = "ddp"
    num_gpus: int = 1
    micro_batch_size: int = 8
    prompt_length: int = 64
    response_length: int = 128
    generation_rows: int = 64
    """sequences sampled at once (prompts x samples per process)"""
    kl_coef: float = 0.0
    """GRPO's: > 0 holds a reference model"""


def parameters(s: dict) -> int:
    kv = s["h"] // s["heads"] * s["kv_heads"]
    layer = 2 * s["h"] * s["h"] + 2 * s["h"] * kv + 3 * s["h"] * s["i"] + 2 * s["h"]
    return s["n"] * layer + s["V"] * s["h"] * (1 if s["tied"] else 2) + s["h"]


def lora_parameters(s: dict, r: int) -> int:
    kv = s["h"] // s["heads"] * s["kv_heads"]
    per_layer = r * ((s["h"] + s["h"]) * 2 + (s["h"] + kv) * 2 + (s["h"] + s["i"]) * 3)
    return s["n"] * per_layer


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
    out["weights"] = models * 4 * P / shard_w + (models * 2 * P / shard_w if a.precision == "bf16" else 0)
    if a.sharding == "fsdp" and N > 1:
        out["weights"] += models * (4 + (2 if a.precision == "bf16" else 0)) * P / s["n"]  # one gathered layer
    out["gradients"] = models * 4 * trained / shard_o
    out["optimizer"] = models * 8 * trained / shard_o
    out["frozen models"] = (frozen_bytes * P / shard_w) if has_ref and not a.lora_r else 0.0
    tokens = a.micro_batch_size * (a.prompt_length + a.response_length)
    per_token_layer = 7 * s["h"] + 3 * kv + 4 * s["i"]
    if a.gradient_checkpointing:
        acts = tokens * (s["n"] * s["h"] + per_token_layer) * compute_bytes
    else:
        acts = tokens * s["n"] * per_token_layer * compute_bytes
    out["activations"] = models * acts
    out["logits"] = 3 * 4 * a.micro_batch_size * a.response_length * s["V"]
    kv_cache = 2 * s["n"] * kv * a.generation_rows * (a.prompt_length + a.response_length) * compute_bytes
    out = {k: v / GB for k, v in out.items()}
    update = sum(out.values())
    sampling = sum(out[k] for k in ("weights", "gradients", "optimizer", "frozen models")) + kv_cache / GB
    out["KV cache (sampling)"] = kv_cache / GB
    out["overhead"] = OVERHEAD_GB
    out["peak"] = max(update, sampling) + OVERHEAD_GB
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
                one = predict(s, Args(method=method, **kw))["peak"]
                z2 = predict(s, Args(method=method, sharding="zero2", num_gpus=8, **kw))["peak"]
                fsdp = predict(s, Args(method=method, sharding="fsdp", num_gpus=8, **kw))["peak"]
                rows.append(f"| {name} | {parameters(s) / 1e9:.2f}B | {method} | {mode} | {one:.1f} | {z2:.1f} | "
                            f"{fsdp:.1f} | {'yes' if one <= 80 else 'no'} |")
    return "\n".join(rows)


def main(a: Args):
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
