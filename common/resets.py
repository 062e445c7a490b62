"""Reset states: restart generation from a prompt plus a forced prefix (roll-in) of another response.

PPO++ takes the prefix from a reference-policy sample, DR-PO from the dataset's demonstration.
The algorithm file decides where prefixes come from and how often; these helpers only
build the tensors.
"""
import torch


def sample_rollin_lengths(prefix_lengths, reset_prob: float, generator: torch.Generator):
    """h ~ Uniform{1..len-1} with probability `reset_prob`, else 0 (no reset): (B,) -> (B,).

    A prefix of length <= 1 gives h = 0: there is nothing to force before its last token.
    """
    lengths = prefix_lengths.cpu()
    u = torch.rand(lengths.shape, generator=generator)  # (B,)
    h = 1 + (u * (lengths - 1).clamp(min=1).float()).long()  # uniform on {1..len-1}
    reset = (torch.rand(lengths.shape, generator=generator) < reset_prob) & (lengths > 1)
    return torch.where(reset, h, torch.zeros_like(h)).to(prefix_lengths.device)


def build_reset_states(query_ids, query_mask, prefix_ids, rollin_lengths, pad_token_id: int):
    """Append the first h_i prefix tokens to each left-padded query, re-left-padding the batch.

    query_ids, query_mask: (B, P) left-padded; prefix_ids: (B, L) right-aligned at position 0;
    rollin_lengths: (B,). Returns state_ids, state_mask: (B, P + max h).
    """
    B, P = query_ids.shape
    H = int(rollin_lengths.max().item()) if B else 0
    state_ids = torch.full((B, P + H), pad_token_id, dtype=query_ids.dtype, device=query_ids.device)
    state_mask = torch.zeros((B, P + H), dtype=query_mask.dtype, device=query_mask.device)
    for i in range(B):
        h = int(rollin_lengths[i])
        row = torch.cat([query_ids[i][query_mask[i].bool()], prefix_ids[i, :h]])
        state_ids[i, P + H - row.numel():] = row
        state_mask[i, P + H - row.numel():] = 1
    return state_ids, state_mask


def splice_reset_responses(prefix_ids, rollin_lengths, continuations, response_length: int, pad_token_id: int):
    """Response = forced prefix[:h] + the policy's continuation, cut to `response_length`.

    prefix_ids: (B, L); rollin_lengths: (B,); continuations: (B, C) generated from the reset
    states. Returns responses (B, T) and forced (B, T) bool, True on roll-in tokens that carry no loss.
    """
    B = prefix_ids.shape[0]
    responses = torch.full((B, response_length), pad_token_id, dtype=continuations.dtype, device=continuations.device)
    forced = torch.zeros((B, response_length), dtype=torch.bool, device=continuations.device)
    for i in range(B):
        h = min(int(rollin_lengths[i]), response_length)
        row = torch.cat([prefix_ids[i, :h], continuations[i]])[:response_length]
        responses[i, :row.numel()] = row
        forced[i, :h] = True
    return responses, forced
