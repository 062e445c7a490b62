"""Optimisation plumbing of the update loops: minibatch order, micro-batches, the optimizer step, schedules."""
import contextlib

import torch

from common.errors import NonFiniteError, UserError


def masked_mean(x, mask) -> float:
    """Mean of `x` over the entries where `mask` is true, as a Python float for logging: (B, T), (B, T) -> float."""
    mask = mask.float()
    return (x.detach() * mask).sum().item() / max(mask.sum().item(), 1.0)


def kl_per_token(logprobs, ref_logprobs, estimator: str):
    """Schulman's estimates of KL(pi || ref) per sampled token, x = log ref - log pi: k1 = -x, k2 = x^2 / 2,
    k3 = exp(x) - 1 - x, (B, T) -> (B, T), zeros without a reference; which for reward, which for loss:
    benchmark/kl_estimators.py."""
    if ref_logprobs is None:
        return torch.zeros_like(logprobs)
    x = ref_logprobs - logprobs
    return {"k1": -x, "k2": 0.5 * x ** 2, "k3": torch.expm1(x) - x}[estimator]


def make_optimizer(model, args):
    """AdamW over `model`'s trained parameters (--learning_rate, --weight_decay, eps 1e-8) and the --lr_schedule over
    --num_iterations x --num_epochs x --num_minibatches optimizer steps. Returns (optimizer, scheduler)."""
    optimizer = adamw(model, args.learning_rate, args.weight_decay)
    num_steps = args.num_iterations * args.num_epochs * args.num_minibatches
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(args.lr_schedule, num_steps))
    return optimizer, scheduler


def adamw(model, learning_rate: float, weight_decay: float):
    """AdamW (eps 1e-8) over the parameters that train, fused where torch can (the same update, faster)."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, eps=1e-8, fused=True)
    except (RuntimeError, ValueError):  # a device or parameter type without the fused kernel
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, eps=1e-8)


def linear_schedule(kind: str, total_steps: int):
    """LR multiplier per optimizer step: `linear` decays 1 -> 0 over `total_steps`, `constant` stays 1."""
    if kind == "constant":
        return lambda step: 1.0
    if kind == "linear":
        return lambda step: max(0.0, 1.0 - step / max(1, total_steps))
    raise UserError(f"unknown lr schedule {kind!r}; use linear or constant")


def minibatches(args, device, group_size: int = 1):
    """Row indices (mini_batch_size,) of each minibatch of --num_epochs shuffled passes over this process's batch;
    groups of `group_size` consecutive rows (REBEL's pairs) stay together."""
    for _ in range(args.num_epochs):
        order = torch.randperm(args.local_batch_size // group_size, device=device)  # (B / group_size,)
        if group_size > 1:
            order = (group_size * order[:, None] + torch.arange(group_size, device=device)).flatten()  # (B,)
        yield from order.split(args.mini_batch_size)


def micro_batches(accelerator, model, mini, micro_batch_size: int):
    """Split a minibatch's indices into micro-batches; each runs under autocast, and gradients are
    all-reduced across processes on the last one only (gradient accumulation). Yields (b,) tensors."""
    chunks = mini.split(micro_batch_size)
    for k, micro in enumerate(chunks):
        sync = contextlib.nullcontext() if k == len(chunks) - 1 else accelerator.no_sync(model)
        with sync, accelerator.autocast():
            yield micro


def optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm: float) -> None:
    """Clip the gradients, step optimizer and schedule, clear the gradients; a norm that is not finite stops the run
    before the step, with the last good weights."""
    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    if not torch.isfinite(norm):
        optimizer.zero_grad()
        raise NonFiniteError(f"the gradient norm is {norm.item()} (a loss that is not finite); no update was made")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
