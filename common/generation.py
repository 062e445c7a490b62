"""Batched sampling to a fixed length, truncation after the first EOS, and per-token log-probs."""
import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from transformers import GenerationConfig


@torch.no_grad()
def generate(model, query_ids, query_mask, response_length: int, temperature: float, pad_token_id: int,
             eos_token_id: int):
    """Sample up to `response_length` tokens per row: (B, P) queries -> (B, response_length) responses.

    temperature 0 means greedy. Pure sampling otherwise (no top-k/top-p), so the sampled
    distribution is softmax(logits / temperature), the one `logprobs_from_logits` scores.
    Rows that stop early are padded with `pad_token_id`; `truncate_after_eos` masks them. A model
    wrapped for distributed training is unwrapped (generation needs no gradient synchronisation).
    """
    # every field that reshapes the distribution is set explicitly: a field left None is filled
    # from the model's own generation_config (Qwen's sets top_k, top_p and a repetition penalty)
    sampling = dict(temperature=temperature, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0) if temperature > 0 else {}
    config = GenerationConfig(
        max_new_tokens=response_length, min_new_tokens=0, do_sample=temperature > 0, repetition_penalty=1.0,
        no_repeat_ngram_size=0, pad_token_id=pad_token_id, eos_token_id=eos_token_id, use_cache=True, **sampling,
    )
    out = extract_model_from_parallel(model).generate(input_ids=query_ids, attention_mask=query_mask,
                                                      generation_config=config)
    responses = out[:, query_ids.shape[1]:]  # (B, <= response_length)
    return F.pad(responses, (0, response_length - responses.shape[1]), value=pad_token_id)  # (B, T)


def truncate_after_eos(responses, eos_token_id: int, pad_token_id: int):
    """Cut each response after its first EOS (kept); pad the rest.

    Returns responses (B, T), mask (B, T) bool of real tokens (the EOS included),
    lengths (B,) and has_eos (B,) bool. A response with no EOS keeps all T tokens.
    """
    is_eos = responses == eos_token_id  # (B, T)
    has_eos = is_eos.any(dim=1)  # (B,)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), responses.shape[1] - 1)  # (B,)
    positions = torch.arange(responses.shape[1], device=responses.device)  # (T,)
    mask = positions[None, :] <= first_eos[:, None]  # (B, T)
    return responses.masked_fill(~mask, pad_token_id), mask, mask.sum(dim=1), has_eos


def position_ids_from_mask(attention_mask):
    """Positions that skip left padding, as `generate` uses them: (B, L) -> (B, L)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def logprobs_from_logits(logits, tokens, temperature: float = 1.0):
    """log softmax(logits / temperature) at `tokens`: (B, T, V), (B, T) -> (B, T), one row at a time to bound memory."""
    scale = temperature if temperature > 0 else 1.0
    rows = []
    for row_logits, row_tokens in zip(logits, tokens):
        row_logits = row_logits.float() / scale  # (T, V)
        rows.append(row_logits.gather(-1, row_tokens[:, None]).squeeze(-1) - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)  # (B, T)


def entropy_from_logits(logits, temperature: float = 1.0):
    """Entropy of softmax(logits / temperature): (B, T, V) -> (B, T)."""
    scale = temperature if temperature > 0 else 1.0
    rows = []
    for row_logits in logits:
        logp = torch.log_softmax(row_logits.float() / scale, dim=-1)  # (T, V)
        rows.append(-(logp.exp() * logp).sum(-1))
    return torch.stack(rows)  # (B, T)


def response_logits(model, query_responses, attention_mask, response_length: int):
    """Logits that predict the last `response_length` tokens: (B, P+T) -> (B, T, V).

    Only those positions go through the LM head (`logits_to_keep`), which saves the
    largest matrix product on the prompt tokens.
    """
    out = model(
        input_ids=query_responses,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=response_length + 1,
        use_cache=False,
    )
    return out.logits[:, :-1]  # (B, T, V)


def forward_logprobs(model, query_responses, attention_mask, response_length: int, temperature: float,
                     with_entropy: bool = False, entropy_grad: bool = False):
    """Per-token log-probs of the responses (and optionally entropies): (B, P+T) -> (B, T).

    The entropies carry no gradient unless `entropy_grad` (an entropy bonus in the loss): keeping their
    graph costs a (B, T, V) tensor.
    """
    logits = response_logits(model, query_responses, attention_mask, response_length)  # (B, T, V)
    tokens = query_responses[:, -response_length:]  # (B, T)
    logprobs = logprobs_from_logits(logits, tokens, temperature)
    if with_entropy:
        return logprobs, entropy_from_logits(logits if entropy_grad else logits.detach(), temperature)
    return logprobs


@torch.no_grad()
def sequence_kl(model, ref_model, query_responses, attention_mask, response_length: int, temperature: float,
                chunk_size: int):
    """sum_t KL(pi(.|x, y<t) || ref(.|x, y<t)) over each response's real tokens, at `temperature`: (B, P+T) -> (B,).

    The exact KL of the next-token distributions (the whole vocabulary) at each position; its sum over
    a response y sampled from pi estimates KL(pi || ref) over whole responses without bias (the chain
    rule), with less variance than the summed log-ratio, and is never negative.
    """
    scale = temperature if temperature > 0 else 1.0
    out = []
    for i in range(0, query_responses.shape[0], chunk_size):
        qr, am = query_responses[i:i + chunk_size], attention_mask[i:i + chunk_size]
        logits = response_logits(model, qr, am, response_length)  # (b, T, V)
        ref_logits = response_logits(ref_model, qr, am, response_length)  # (b, T, V)
        for row, ref_row, row_mask in zip(logits, ref_logits, am[:, -response_length:]):
            logp = torch.log_softmax(row.float() / scale, dim=-1)  # (T, V)
            ref_logp = torch.log_softmax(ref_row.float() / scale, dim=-1)  # (T, V)
            out.append(((logp.exp() * (logp - ref_logp)).sum(-1) * row_mask).sum())
    return torch.stack(out)  # (B,)


@torch.no_grad()
def batched_logprobs(model, query_responses, attention_mask, response_length: int, temperature: float, chunk_size: int):
    """`forward_logprobs` without gradients, `chunk_size` rows at a time: (B, P+T) -> (B, T)."""
    return torch.cat([
        forward_logprobs(model, query_responses[i:i + chunk_size], attention_mask[i:i + chunk_size], response_length,
                         temperature)
        for i in range(0, query_responses.shape[0], chunk_size)
    ])
