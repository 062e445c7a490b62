"""Batched sampling to a fixed length, truncation after the first EOS, and per-token log-probs.

One sampler serves every algorithm, the reset roll-ins and the evaluation: pure sampling from
softmax(logits / temperature), in one of two ways (--sampler):
- plain (CPU): the loop below, with the KV cache of each distinct prompt computed once and finished
  rows leaving the batch;
- static (GPU): transformers' `generate` with a static KV cache, which it compiles into CUDA graphs on
  a GPU (common/static_sampler.py, imported only when it is used). Its step is launch-bound, not
  arithmetic-bound, on a GPU. On CPU it is slower (benchmark/sampler_speed.py measures both), so
  --sampler auto uses it on GPUs only.
The log-prob passes share a group's prompt the same way as the plain loop.
"""
import torch
from accelerate.utils import extract_model_from_parallel
from transformers import DynamicCache


def is_sharded(model) -> bool:
    """Whether `model`'s weights are sharded over the processes (FSDP). Each forward pass then gathers every
    layer's weights from all processes, so all of them must run the same passes: lock-step. (Asked of the
    modules: between passes FSDP may hold the root's weights gathered, as plain tensors.)"""
    from torch.distributed.fsdp import FSDPModule

    model = getattr(model, "peft_model", model)  # a LoRA reference (AdaptersOff) runs on the policy's weights
    return any(isinstance(module, FSDPModule) for module in model.modules())


def lockstep_max(value: int, device: torch.device) -> int:
    """The largest `value` over all processes (FSDP's lock-step)."""
    value = torch.tensor(value, device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return int(value)


def uses_static_sampler(model, device: torch.device, mode: str) -> bool:
    """--sampler static, or auto on a GPU; never for a model whose weights are sharded (FSDP)."""
    if mode == "plain" or (mode == "auto" and device.type != "cuda"):
        return False
    return not is_sharded(model)


def shared_prompts(query_ids, query_mask):
    """Rows that repeat the row before them (a group's copies of one prompt): (B, P) -> the index of each row's
    first copy among the distinct prompts (B,), and the distinct prompts' rows (U,)."""
    repeat = (query_ids[1:] == query_ids[:-1]).all(1) & (query_mask[1:] == query_mask[:-1]).all(1)  # (B-1,)
    new = torch.cat([repeat.new_ones(1), ~repeat])  # (B,) True where a new prompt starts
    return torch.cumsum(new, 0) - 1, new.nonzero().squeeze(1)


def prefill(model, query_ids, query_mask):
    """One forward pass over the distinct prompts only (a group's copies share it), expanded back to every row.

    Returns the logits that predict each row's first response token (B, V) and a KV cache of all B rows.
    """
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
    """Sample up to `response_length` tokens per row: (B, P) left-padded queries -> (B, response_length) responses.

    temperature 0 means greedy. Pure sampling otherwise (no top-k/top-p): each token is drawn from
    softmax(logits / temperature) in fp32, the distribution `logprobs_from_logits` scores. The
    prompts are run once per distinct prompt (a group's copies share the pass), and a row leaves the
    batch when it samples EOS, so finished rows cost nothing; rows that stop early are padded with
    `pad_token_id`. A model wrapped for distributed training is unwrapped (no gradient sync needed).
    `return_logprobs` also returns the sampled tokens' log-probs under that distribution (B, T), 0 after EOS.
    Sharded weights (FSDP) make it lock-step: no row leaves the batch, and every process takes as many
    steps as the longest-running one (rows that ended keep stepping and are cut after their EOS).
    `sampler`: --sampler (auto, plain or static; see the top of this file).
    """
    model = extract_model_from_parallel(model)
    if uses_static_sampler(model, query_ids.device, sampler):
        from common.static_sampler import generate_static

        return generate_static(model, query_ids, query_mask, response_length, temperature, pad_token_id, eos_token_id,
                               return_logprobs)
    training = model.training
    model.eval()  # the KV cache (a model training with gradient checkpointing would switch it off)
    lockstep = is_sharded(model)
    steps = lockstep_max(response_length, query_ids.device) if lockstep else response_length
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
        if ended.any() and not lockstep:  # drop the finished rows from the batch and the cache
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


def _gradient_checkpointing(model) -> bool:
    """Whether `model` (wrapped for DDP or LoRA, or not) recomputes activations in its backward pass."""
    model = extract_model_from_parallel(model)
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(type(model), "is_activation_checkpointing"):  # the name in transformers >= 5.x
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def response_logits(model, query_responses, attention_mask, response_length: int):
    """Logits that predict the last `response_length` tokens: (B, P+T) -> (B, T, V).

    Only those positions go through the LM head (`logits_to_keep`), and the columns after every row's
    last real token are not computed (their logits are 0). Where consecutive rows share their prompt
    (a group's responses to one prompt), the prompt goes through the model once and its keys and
    values serve every response of the group: the same logits and gradients, with the prompt's share
    of the compute paid once per group instead of once per response.
    """
    P = query_responses.shape[1] - response_length
    used = int(attention_mask[:, P:].any(0).nonzero().max()) + 1 if attention_mask[:, P:].any() else 1
    if used < response_length:  # padding in every row: compute the real columns, pad the logits back
        logits = response_logits(model, query_responses[:, :P + used], attention_mask[:, :P + used], used)
        return torch.nn.functional.pad(logits, (0, 0, 0, response_length - used))  # (B, T, V)
    queries, query_mask = query_responses[:, :P], attention_mask[:, :P]
    checkpointing = model.training and _gradient_checkpointing(model)
    no_sharing = shared_prompts(queries, query_mask)[1].numel() == query_responses.shape[0]
    if checkpointing or no_sharing or is_sharded(model):  # sharded: one pass on every process, whatever its prompts
        out = model(input_ids=query_responses, attention_mask=attention_mask, use_cache=False,
                    position_ids=position_ids_from_mask(attention_mask), logits_to_keep=response_length + 1)
        return out.logits[:, :-1]  # (B, T, V)
    first, cache = prefill(model, queries, query_mask)  # (B, V): the logits of each response's first token
    positions = query_mask.long().sum(1, keepdim=True) + torch.arange(response_length, device=queries.device)
    out = model(input_ids=query_responses[:, P:], attention_mask=attention_mask, position_ids=positions,
                past_key_values=cache, use_cache=True)
    return torch.cat([first[:, None], out.logits[:, :-1]], dim=1)  # (B, T, V)


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
