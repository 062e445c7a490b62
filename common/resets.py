"""Reset states: restart generation from a prompt plus a forced prefix (roll-in) of another response.

PPO++ takes the prefix from a reference-policy sample, DR-PO from the dataset's demonstration.
The algorithm file decides where prefixes come from and how often; these helpers only
build the tensors.
"""
import numpy as np
import torch


def sample_rollin_lengths(prefix_lengths, reset_prob: float, generator, max_fraction: float = 1.0):
    """h ~ Uniform{1..m} with m = max(1, floor(max_fraction (len - 1))) with probability `reset_prob`, else 0 (no
    reset): (B,) -> (B,). max_fraction 1 is the authors' Uniform{1..len-1}: at most all of the prefix but its last
    token (the EOS); a smaller one forces only the prefix's first part.

    A prefix of length <= 1 gives h = 0: there is nothing to force before its last token. `generator` is a
    torch.Generator, or (seed, iteration, row ids): each row then draws from its own generator, seeded by
    the seed, the iteration and the row's id, so a row's roll-in does not depend on how the batch is split
    over processes.
    """
    lengths = prefix_lengths.cpu()
    if isinstance(generator, torch.Generator):
        u = torch.rand(lengths.shape, generator=generator, dtype=torch.float64)
        coin = torch.rand(lengths.shape, generator=generator, dtype=torch.float64)
    else:
        seed, iteration, rows = generator
        u, coin = torch.tensor(np.array([np.random.default_rng([seed, iteration, int(r)]).random(2) for r in rows]),
                               dtype=torch.float64).reshape(-1, 2).T  # (B,) each
    # float64 throughout: a float32 draw within 2^-25 of 1 rounds to 1.0 and would give h = longest + 1
    longest = ((lengths - 1).double() * max_fraction).long().clamp(min=1)  # (B,)
    h = torch.minimum(1 + (u * longest.double()).long(), longest)  # uniform on {1..longest}
    reset = (coin < reset_prob) & (lengths > 1)
    return torch.where(reset, h, torch.zeros_like(h)).to(prefix_lengths.device)


def tokenize_demonstrations(tokenizer, rows, response_length: int):
    """Every row's dataset response + EOS, cut to `response_length` tokens and right-padded: (N, T) ids and (N,)
    lengths: the prefixes DR-PO's resets force."""
    demos = [(tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
             [:response_length] for row in rows]
    ids = torch.full((len(demos), response_length), tokenizer.pad_token_id, dtype=torch.long)  # (N, T)
    for i, demo in enumerate(demos):
        ids[i, :len(demo)] = torch.tensor(demo)
    return ids, torch.tensor([len(demo) for demo in demos])


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
