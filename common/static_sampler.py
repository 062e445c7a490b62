"""The static sampler (--sampler static, or auto on a GPU): `generate`'s contract through transformers' `generate`
with a static KV cache, which it compiles into CUDA graphs on a GPU. Imported only when it is used."""
import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from common.generation import truncate_after_eos

PROMPT_BUCKET = 64  # prompts are left-padded to a multiple of this many tokens, so a new length does not compile again


@torch.no_grad()
def generate_static(model, query_ids, query_mask, response_length: int, temperature: float, pad_token_id: int,
                    eos_token_id: int, return_logprobs: bool = False):
    """`generate`'s contract through transformers' `generate` with a static KV cache (compiled on a GPU).

    The prompts are left-padded to the next multiple of PROMPT_BUCKET columns (padding is masked and
    skipped by the positions, so the tokens are the same) and the cache keeps the longest length seen, so
    the compiled step sees a few shapes, not one per iteration. Pure sampling: no top-k, top-p or other
    logits processor, checked by tests/test_sampler.py. The weights are read in place, so an optimizer
    step reaches the next call.
    """
    width = -(-query_ids.shape[1] // PROMPT_BUCKET) * PROMPT_BUCKET
    ids = F.pad(query_ids, (width - query_ids.shape[1], 0), value=pad_token_id)  # (B, width)
    mask = F.pad(query_mask, (width - query_ids.shape[1], 0), value=0)  # (B, width)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {}
    config = GenerationConfig(max_new_tokens=response_length, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                              cache_implementation="static", return_dict_in_generate=True,
                              output_logits=return_logprobs, **sampling)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under LoRA, the peft model's
    training, model_defaults = model.training, base.generation_config
    # Under bf16 autocast the keys leave the rotary embedding in fp32 and the values in bf16, and transformers' static
    # cache holds one dtype (index_copy_ fails): sample in the weights' own dtype, outside autocast and outside the
    # autocast wrapper accelerate puts on a prepared model's forward (it keeps the plain one as _original_forward).
    wrapper = model.__dict__.get("forward") if hasattr(model, "_original_forward") else None
    model.eval()
    base.generation_config = GenerationConfig()  # the model's own sampling defaults (top-k, penalties) left out
    try:
        if wrapper is not None:
            model.forward = model._original_forward
        with torch.autocast(ids.device.type, enabled=False):
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    finally:
        if wrapper is not None:
            model.forward = wrapper
        model.train(training)
        base.generation_config = model_defaults
    new = out.sequences.shape[1] - width  # <= response_length: generate stops when every row has ended
    responses = F.pad(out.sequences[:, width:], (0, response_length - new), value=pad_token_id)  # (B, T)
    if not return_logprobs:
        return responses
    scale = temperature if temperature > 0 else 1.0
    logprobs = torch.stack([torch.log_softmax(step.float() / scale, dim=-1).gather(1, tokens[:, None]).squeeze(1)
                            for step, tokens in zip(out.logits, responses.T)], dim=1)  # (B, new)
    real = truncate_after_eos(responses, eos_token_id, pad_token_id)[1][:, :new]
    return responses, F.pad(logprobs * real, (0, response_length - new))
