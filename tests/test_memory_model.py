"""benchmark/memory_model.py counts the parameters that the models and peft actually have."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmark"))
from memory_model import SHAPES, Args, lora_parameters, parameters, predict  # noqa: E402

from common.lora import add_lora  # noqa: E402
from common.models import EMBEDDED_MODEL, load_causal_lm  # noqa: E402


def test_parameter_counts_match_the_models(tiny_model_dir):
    model = load_causal_lm(EMBEDDED_MODEL, torch.device("cpu"), torch.float32)
    assert parameters(SHAPES["0.135B"]) == sum(p.numel() for p in model.parameters())
    tiny = load_causal_lm(tiny_model_dir, torch.device("cpu"), torch.float32)
    c = tiny.config
    shape = dict(h=c.hidden_size, n=c.num_hidden_layers, i=c.intermediate_size, heads=c.num_attention_heads,
                 kv_heads=c.num_key_value_heads, V=c.vocab_size, tied=c.tie_word_embeddings)
    assert parameters(shape) == sum(p.numel() for p in tiny.parameters())
    lora = add_lora(tiny, 8, 16.0, "all-linear")
    assert lora_parameters(shape, 8) == sum(p.numel() for p in lora.parameters() if p.requires_grad)


def test_sharding_and_lora_only_ever_lower_the_peak():
    for shape in SHAPES.values():
        full = predict(shape, Args(method="ppo"))["peak"]
        assert predict(shape, Args(method="ppo", lora_r=16))["peak"] < full
        assert predict(shape, Args(method="ppo", gradient_checkpointing=True))["peak"] < full
        assert predict(shape, Args(method="ppo", sharding="fsdp", num_gpus=8))["peak"] < \
            predict(shape, Args(method="ppo", sharding="zero2", num_gpus=8))["peak"] < full
