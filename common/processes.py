"""The processes of a run: the Accelerator, seeds, memory, agreement between processes, and a clean exit."""
import os
import random
import resource
import sys

import numpy as np
import torch
from accelerate import Accelerator


def make_accelerator(mixed_precision: str = "auto") -> Accelerator:
    """The run's Accelerator (gloo on CPU). `auto`: accelerate's configured precision, else bf16 on a GPU with it."""
    cuda = torch.cuda.is_available()
    if mixed_precision == "auto":
        bf16 = cuda and torch.cuda.is_bf16_supported()
        mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION") or ("bf16" if bf16 else "no")
    return Accelerator(cpu=not cuda, mixed_precision=mixed_precision)


def frozen_dtype(accelerator) -> torch.dtype:
    """The dtype of frozen models (reference, reward): bf16 under bf16 mixed precision, else fp32."""
    return torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32


def seed_everything(seed: int) -> None:
    """Seed `random`, numpy and torch (use seed + process_index * 100003 per process)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated on `device`, or on CPU the process's peak resident set, in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def param_checksum(model) -> float:
    """Sum of all parameters in float64 (FSDP: each gathered from its shards in turn, one at a time)."""
    return float(sum((p.full_tensor() if hasattr(p, "full_tensor") else p).detach().sum(dtype=torch.float64).item()
                     for p in model.parameters()))


def checksum_spread(accelerator, model) -> float:
    """max - min over processes of `param_checksum(model)`: 0 when every process holds the same weights."""
    checksums = accelerator.gather(torch.tensor([param_checksum(model)], dtype=torch.float64,
                                                device=accelerator.device))
    return (checksums.max() - checksums.min()).item()


def end_processes(accelerator) -> None:
    """The one way every script ends, after it has saved everything: exit status 0. Several processes leave at once
    after ending their group: gloo's threads can abort the interpreter's exit (SIGABRT, pytorch/pytorch#190489)."""
    if not torch.distributed.is_initialized():
        sys.exit(0)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
