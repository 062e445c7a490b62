"""Reset states: restart generation from a prompt plus a forced prefix (roll-in) of another response.

PPO++ takes the prefix from a reference-policy sample, DR-PO and grpo_reset.py from the dataset's demonstration.
The algorithm file decides where prefixes come from; the helpers below build the tensors, and the roll-in schedules
(uniform, reverse, adaptive, anneal) decide how deep each reset starts.
"""
import numpy as np
import torch

import common.run as lifecycle
from common.generation import truncate_after_eos


def row_generators(draw):
    """One numpy generator per row from `draw` = (seed, iteration, row ids): a row's draws do not depend on the other
    rows, on how the batch is split over processes, or (a group sharing a row id) on which copy of it is drawn."""
    seed, iteration, rows = draw
    return [np.random.default_rng([seed, iteration, int(r)]) for r in rows]


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
        u, coin = torch.tensor(np.array([rng.random(2) for rng in row_generators(generator)]),
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


def reset_rollout(run, model, queries, query_mask, prefixes, rollin, temperature: float):
    """Rollouts that restart from reset states: each query plus the first h = `rollin` (B,) tokens of its row of
    `prefixes` (B, L) forced, then the policy's continuation (common/run.py's `rollout`), cut after its first EOS
    (h = 0: from the prompt).

    Returns responses (roll-in + continuation), their mask (B, T), lengths and has_eos (B,), `forced` (B, T): the
    roll-in tokens, which the policy did not choose, and the seconds the sampling took.
    """
    tokenizer, args = run.tokenizer, run.args
    states, state_mask = build_reset_states(queries, query_mask, prefixes, rollin, tokenizer.pad_token_id)
    continuations, *_, seconds = lifecycle.rollout(run, model, states, state_mask, temperature,
                                                   args.response_length - int(rollin.min()))
    responses, forced = splice_reset_responses(prefixes, rollin, continuations, args.response_length,
                                               tokenizer.pad_token_id)  # (B, T), (B, T)
    return (*truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id), forced, seconds)


# Roll-in schedules (--ppo.rollin_schedule, --grpo.rollin_schedule): how deep a reset starts, and how that changes
# with training. A depth is a fraction f of the prefix's tokens before its last one, h = f (len - 1); every schedule
# keeps --ppo.reset_prob's meaning (a sample is a reset with that probability, else it starts from the prompt) and
# draws from one generator per row, seeded by (seed, iteration, row id), so a group's rows (one row id) share h and
# a row's h does not depend on how the batch is split over processes. `update` sees the whole batch's depths and
# scores (gathered over processes), so every process keeps the same state; a score counts as success in [0, 1]
# (a verifier's 0 or 1; the missing-EOS penalty counts as 0). The state is saved in checkpoints
# (accelerator.register_for_checkpointing), so --resume_from continues the same schedule.
SCHEDULES = ("uniform", "reverse", "adaptive", "anneal")


class UniformSchedule:
    """h ~ Uniform{1..f_max (len - 1)}, the same at every iteration (DR-PO, Chang et al. 2024, and PPO++, Chang et al.
    2023: f_max = 1, their Uniform{1..len-1}); `sample_rollin_lengths`."""

    def __init__(self, max_fraction: float = 1.0, **_):
        self.max_fraction = max_fraction

    def depths(self, prefix_lengths, reset_prob: float, draw, iteration: int):
        return sample_rollin_lengths(prefix_lengths, reset_prob, draw, self.max_fraction)

    def update(self, rows, depths, prefix_lengths, scores, gather=lambda t: t):
        """Learn from a batch: row ids (numpy or tensor), depths, prefix lengths and scores (B,); `gather` (e.g.
        accelerator.gather) joins every process's batch, so every process keeps the same state."""
        rows = torch.as_tensor(rows, device=depths.device)
        self.learn(*(gather(t) for t in (rows, depths, prefix_lengths, scores)))

    def learn(self, rows, depths, prefix_lengths, scores):
        pass

    def stats(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict):
        pass


class DepthSchedule(UniformSchedule):
    """A schedule that gives each reset's depth row by row (`depth`); the coin and the bounds are uniform's."""

    def depths(self, prefix_lengths, reset_prob: float, draw, iteration: int):
        """Each row's roll-in length h (B,): 0 (from the prompt) with probability 1 - reset_prob or when the prefix has
        nothing before its last token, else the schedule's depth, at most len - 1."""
        out = []
        for rng, row, n in zip(row_generators(draw), draw[2], prefix_lengths.tolist()):
            u, coin = rng.random(2)  # as sample_rollin_lengths draws them; a schedule may draw more from `rng`
            out.append(min(self.depth(rng, u, int(row), n, iteration), n - 1) if coin < reset_prob and n > 1 else 0)
        return torch.tensor(out, dtype=torch.long, device=prefix_lengths.device)

    def depth(self, rng, u: float, row: int, n: int, iteration: int) -> int:
        """A reset's depth for prompt `row` with an n-token prefix; `u` is a uniform draw, `rng` the row's generator."""
        raise NotImplementedError


class ReverseSchedule(DepthSchedule):
    """Reverse curriculum (Salimans & Chen 2018, "Learning Montezuma's Revenge from a Single Demonstration"; R^3, Xi et
    al. 2024): the start is first near the end of the prefix (f = 1: the policy writes only its last token) and moves
    back by `step` once at least `threshold` of the samples started there succeed. 80% of the resets start at the
    current start, 20% uniformly between it and the end, as in openai/atari-reset; at f = 0 every sample starts from
    the prompt."""

    def __init__(self, threshold: float = 0.2, step: float = 0.125, at_start: float = 0.8, **_):
        self.threshold, self.step, self.at_start, self.start = threshold, step, at_start, 1.0

    def depth(self, rng, u: float, row: int, n: int, iteration: int) -> int:
        first = round(self.start * (n - 1))  # the current start, in tokens
        return first if rng.random() < self.at_start else first + int(u * (n - first))  # else uniform on {first..n-1}

    def learn(self, rows, depths, prefix_lengths, scores):
        first = torch.round(self.start * (prefix_lengths - 1).double()).long()
        at_start = (depths == first) & (depths > 0)
        if at_start.any() and scores[at_start].clamp(0, 1).mean().item() >= self.threshold:
            self.start = max(0.0, self.start - self.step)

    def stats(self) -> dict:
        return {"reset/start_fraction": self.start}

    def state_dict(self) -> dict:
        return {"start": self.start}

    def load_state_dict(self, state: dict):
        self.start = state["start"]


class AdaptiveSchedule(DepthSchedule):
    """Per prompt, aiming at a success rate `target` (in the spirit of AdaBack, Amani et al. 2025, and SEELE, 2025,
    which choose each problem's revealed fraction from its recent rewards): each prompt keeps a fraction f, moved
    after every iteration it appears in by step (target - its success over that iteration's samples, reset or not),
    so f falls while the prompt is solved more often than `target` and rises otherwise (a Robbins-Monro rule whose
    fixed point is success = target). A prompt not seen yet starts at the mean f of the prompts seen (0.5 before
    any). h = f (len - 1), rounded at random. The rule is ours; the papers' own (AdaBack's bisection on an interval
    of fractions, SEELE's fitted response curve) need several visits per prompt, which a short run does not give."""

    def __init__(self, num_rows: int = 0, target: float = 0.5, step: float = 0.25, **_):
        self.target, self.step = target, step
        self.fraction = torch.full((num_rows,), float("nan"), dtype=torch.float64)  # nan: not seen yet

    def prior(self) -> float:
        seen = self.fraction[~self.fraction.isnan()]
        return seen.mean().item() if len(seen) else 0.5

    def of(self, row: int, prior=None) -> float:
        """Prompt `row`'s fraction, or before it is seen `prior` (default: the prompts' mean now)."""
        f = self.fraction[row].item()
        return f if not np.isnan(f) else self.prior() if prior is None else prior

    def depth(self, rng, u: float, row: int, n: int, iteration: int) -> int:
        return int(self.of(row) * (n - 1) + u)  # stochastic rounding: E[h] = f (len - 1)

    def learn(self, rows, depths, prefix_lengths, scores):
        prior = self.prior()  # before this batch's updates
        success = {}  # a prompt's mean success over its samples this iteration, reset or not (a group's, for GRPO)
        for row, s in zip(rows.tolist(), scores.clamp(0, 1).tolist()):
            success.setdefault(row, []).append(s)
        for row, s in success.items():
            self.fraction[row] = min(1.0, max(0.0, self.of(row, prior) + self.step * (self.target - np.mean(s))))

    def stats(self) -> dict:
        return {"reset/mean_fraction": self.prior()}

    def state_dict(self) -> dict:
        return {"fraction": self.fraction}

    def load_state_dict(self, state: dict):
        self.fraction = state["fraction"]


class AnnealSchedule(DepthSchedule):
    """Annealed hints (UFT, Liu et al. 2025): the expected fraction given falls by a cosine from `high` to `low` over
    the first `until` of the iterations, then 0; h ~ Binomial(len - 1, p(t)) as in UFT. No state but the
    iteration."""

    def __init__(self, num_iterations: int = 1, high: float = 0.95, low: float = 0.05, until: float = 0.6, **_):
        self.horizon, self.high, self.low = max(1, round(until * num_iterations)), high, low

    def fraction(self, iteration: int) -> float:
        t = iteration - 1  # iterations count from 1
        if t >= self.horizon:
            return 0.0
        return self.low + 0.5 * (self.high - self.low) * (1 + np.cos(np.pi * (t + 1) / self.horizon))

    def depth(self, rng, u: float, row: int, n: int, iteration: int) -> int:
        return int(rng.binomial(n - 1, self.fraction(iteration)))


def make_schedule(name: str, num_rows: int, num_iterations: int, max_fraction: float = 1.0, accelerator=None):
    """The roll-in schedule `name` (one of SCHEDULES) with its papers' settings, for `num_rows` training prompts and
    `num_iterations` iterations (uniform: h ~ U{1..max_fraction (len - 1)}); registered with `accelerator` when given,
    so that its checkpoints save the schedule's state and --resume_from restores it."""
    kinds = dict(uniform=UniformSchedule, reverse=ReverseSchedule, adaptive=AdaptiveSchedule, anneal=AnnealSchedule)
    schedule = kinds[name](max_fraction=max_fraction, num_rows=num_rows, num_iterations=num_iterations)
    if accelerator is not None:
        accelerator.register_for_checkpointing(schedule)
    return schedule
