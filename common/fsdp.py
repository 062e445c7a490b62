"""FSDP's extra steps, imported only when accelerate runs under FSDP: frozen models sharded like the policy, every
prepared model initialised as a root of its sharding, and the sampler's lock-step."""
import torch
from torch import nn
from torch.distributed.fsdp import OffloadPolicy, fully_shard


def shard(accelerator, model: nn.Module) -> nn.Module:
    """A frozen model (reference, reward model) sharded over the processes like the policy: each decoder layer and
    the rest, offloaded to CPU where accelerate's FSDP config says so."""
    offload = accelerator.state.fsdp_plugin.cpu_offload
    options = {"offload_policy": offload} if isinstance(offload, OffloadPolicy) else {}
    layers = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layers:
            fully_shard(module, **options)
    return fully_shard(model, **options)


def init_fsdp_roots(accelerator) -> None:
    """FSDP: the first module to run forward becomes the root of its sharding; PPO's policy-and-value pair must be
    it, though sampling calls the policy alone first. So every prepared FSDP model is initialised as a root now
    (a private torch API: `_get_fsdp_state()._lazy_init()`)."""
    for model in accelerator._models:
        if hasattr(model, "_get_fsdp_state"):
            model._get_fsdp_state()._lazy_init()


def lockstep_max(value: int, device: torch.device) -> int:
    """The largest `value` over all processes (the sampler's lock-step under sharded weights)."""
    value = torch.tensor(value, device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return int(value)
