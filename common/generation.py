"""Batched sampling to a fixed length, truncation after the first EOS, and per-token log-probs: one sampler for every
algorithm, the reset roll-ins and the evaluation (--sampler: this file's loop, or common/static_sampler.py's compiled
one, imported only when used). A group's copies of one prompt share its forward pass, in sampling and in scoring."""
import torch
from accelerate.utils import extract_model_from_parallel
from transformers import DynamicCache


def is_sharded(model) -> bool:
    """Whether `model`'s weights are sharded (FSDP): every process must then run the same passes (lock-step)."""
    from torch.distributed.fsdp import FSDPModule

    model = getattr(model, "peft_model", model)  # a LoRA reference (AdaptersOff) runs on the policy's weights
    return any(isinstance(module, FSDPModule) for module in model.modules())  # modules: the root may hold full weights


def uses_static_sampler(model, device: torch.device, mode: str) -> bool:
    """--sampler static, or auto on a GPU; never for a model whose weights are sharded (FSDP)."""
    if mode == "plain" or (mode == "auto" and device.type != "cuda"):
        return False
    return not is_sharded(model)


def shared_prompts(query_ids, query_mask):
    """A group's copies of one prompt (equal adjacent rows): (B, P) -> each row's distinct prompt (B,), those (U,)."""
    repeat = (query_ids[1:] == query_ids[:-1]).all(1) & (query_mask[1:] == query_mask[:-1]).all(1)  # (B-1,)
    new = torch.cat([repeat.new_ones(1), ~repeat])  # (B,) True where a new prompt starts
    return torch.cumsum(new, 0) - 1, new.nonzero().squeeze(1)


def prefill(model, query_ids, query_mask):
    """One pass over the distinct prompts: (B, P) -> the logits of each row's first response token (B, V), KV cache."""
    copy_of, distinct = shared_prompts(query_ids, query_mask)
    cache = DynamicCache()
    logits = model(input_ids=query_ids[distinct], attention_mask=query_mask[distinct], use_cache=True,
                   position_ids=position_ids_from_mask(query_mask[distinct]), past_key_values=cache,
                   logits_to_keep=1).logits[:, -1]  # (U, V)
    if len(distinct) < len(copy_of):
        cache.batch_select_indices(copy_of)
    return logits[copy_of], cache


@torch.no_grad()
def generate(model, query_ids, query_mask, response_length: int, temperature: float, pad_token_id: int,
             eos_token_id: int, return_logprobs: bool = False, sampler: str = "auto"):
    """Sample from softmax(logits / temperature) in fp32 (0: greedy; no top-k/top-p), the distribution
    `logprobs_from_logits` scores: (B, P) left-padded queries -> (B, response_length), padded after an early EOS;
    with `return_logprobs` also the sampled tokens' log-probs (B, T), 0 after EOS. `sampler`: --sampler."""
    model = extract_model_from_parallel(model)  # sampling needs no gradient sync
    if uses_static_sampler(model, query_ids.device, sampler):
        from common.static_sampler import generate_static

        return generate_static(model, query_ids, query_mask, response_length, temperature, pad_token_id, eos_token_id,
                               return_logprobs)
    training = model.training
    model.eval()  # the KV cache (a model training with gradient checkpointing would switch it off)
    lockstep, steps = is_sharded(model), response_length
    if lockstep:  # no row leaves the batch, and every process takes as many steps as the longest-running one
        from common.fsdp import lockstep_max

        steps = lockstep_max(response_length, query_ids.device)
    responses = torch.full((query_ids.shape[0], steps), pad_token_id, dtype=torch.long,
                           device=query_ids.device)  # (B, T)
    logprobs = torch.zeros(responses.shape, device=query_ids.device)  # (B, T)
    logits, cache = prefill(model, query_ids, query_mask)  # (B, V)
    rows = torch.arange(query_ids.shape[0], device=query_ids.device)  # (b,) the rows still sampling
    ended = torch.zeros(len(rows), dtype=torch.bool, device=query_ids.device)  # (b,) rows that sampled EOS
    attention_mask = query_mask
    positions = attention_mask.long().sum(1)  # (b,) the position of each row's next token
    for t in range(steps):
        logp = torch.log_softmax(logits.float() / (temperature if temperature > 0 else 1.0), dim=-1)  # (b, V)
        if temperature > 0:
            tokens = torch.multinomial(logp.exp(), 1).squeeze(1)  # (b,)
        else:
            tokens = logp.argmax(dim=-1)  # (b,)
        responses[rows, t] = tokens
        logprobs[rows, t] = logp.gather(1, tokens[:, None]).squeeze(1)
        ended = ended | (tokens == eos_token_id)
        left = (~ended).sum()
        if lockstep:
            torch.distributed.all_reduce(left)  # rows still sampling on any process
        if t == steps - 1 or left.item() == 0:
            break
        if ended.any() and not lockstep:  # finished rows leave the batch and the cache: they cost nothing
            keep = (~ended).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, tokens, attention_mask, positions = rows[keep], tokens[keep], attention_mask[keep], positions[keep]
            ended = ended[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
        logits = model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=positions[:, None],
                       past_key_values=cache, use_cache=True).logits[:, -1]  # (b, V)
        positions = positions + 1
    model.train(training)
    if lockstep:  # cut after each row's first EOS, to the length asked for
        responses, real = truncate_after_eos(responses, eos_token_id, pad_token_id)[:2]
        responses, logprobs = responses[:, :response_length], (logprobs * real)[:, :response_length]
    return (responses, logprobs) if return_logprobs else responses


def truncate_after_eos(responses, eos_token_id: int, pad_token_id: int):
    """Cut each response after its first EOS (kept), pad the rest: (B, T) -> responses, mask of real tokens (B, T),
    lengths and has_eos (B,). A response with no EOS keeps all T tokens."""
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


def _gradient_checkpointing(model) -> bool:
    """Whether `model` (wrapped for DDP or LoRA, or not) recomputes activations in its backward pass."""
    model = extract_model_from_parallel(model)
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(type(model), "is_activation_checkpointing"):  # the name in transformers >= 5.x
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def response_logits(model, query_responses, attention_mask, response_length: int):
    """Logits that predict the last `response_length` tokens: (B, P+T) -> (B, T, V), 0 after every row's end.
    A group's shared prompt runs once and its keys and values serve every response: same logits and gradients."""
    P = query_responses.shape[1] - response_length
    used = int(attention_mask[:, P:].any(0).nonzero().max()) + 1 if attention_mask[:, P:].any() else 1
    if used < response_length:  # padding in every row: compute the real columns, pad the logits back
        logits = response_logits(model, query_responses[:, :P + used], attention_mask[:, :P + used], used)
        return torch.nn.functional.pad(logits, (0, 0, 0, response_length - used))  # (B, T, V)
    queries, query_mask = query_responses[:, :P], attention_mask[:, :P]
    checkpointing = model.training and _gradient_checkpointing(model)
    no_sharing = shared_prompts(queries, query_mask)[1].numel() == query_responses.shape[0]
    if checkpointing or no_sharing or is_sharded(model):  # sharded: one pass on every process, whatever its prompts
        out = model(input_ids=query_responses, attention_mask=attention_mask, use_cache=False,  # LM head: T + 1 only
                    position_ids=position_ids_from_mask(attention_mask), logits_to_keep=response_length + 1)
        return out.logits[:, :-1]  # (B, T, V)
    first, cache = prefill(model, queries, query_mask)  # (B, V): the logits of each response's first token
    positions = query_mask.long().sum(1, keepdim=True) + torch.arange(response_length, device=queries.device)
    out = model(input_ids=query_responses[:, P:], attention_mask=attention_mask, position_ids=positions,
                past_key_values=cache, use_cache=True)
    return torch.cat([first[:, None], out.logits[:, :-1]], dim=1)  # (B, T, V)


def forward_logprobs(model, query_responses, attention_mask, response_length: int, temperature: float,
                     with_entropy: bool = False, entropy_grad: bool = False):
    """Per-token log-probs (and entropies, with a gradient only if `entropy_grad`: it costs a (B, T, V) graph) of
    the responses: (B, P+T) -> (B, T)."""
    logits = response_logits(model, query_responses, attention_mask, response_length)  # (B, T, V)
    tokens = query_responses[:, -response_length:]  # (B, T)
    logprobs = logprobs_from_logits(logits, tokens, temperature)
    if with_entropy:
        return logprobs, entropy_from_logits(logits if entropy_grad else logits.detach(), temperature)
    return logprobs


@torch.no_grad()
def sequence_kl(model, ref_model, query_responses, attention_mask, response_length: int, temperature: float,
                chunk_size: int):
    """sum_t KL(pi(.|x, y<t) || ref(.|x, y<t)) over each response's real tokens at `temperature`, (B, P+T) -> (B,):
    on responses sampled from pi, an unbiased estimate of KL(pi || ref) (chain rule), never negative."""
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
