"""Run folder, metrics (JSONL + console + optional wandb), checkpoints, and small utilities."""
import json
import os
import random
import resource
import sys

import numpy as np
import torch


def exact_div(a: int, b: int, what: str) -> int:
    """a / b when b divides a, else a clear error naming the two settings."""
    if b <= 0 or a % b != 0:
        raise ValueError(f"{what}: {a} is not divisible by {b}; change the batch settings so it is")
    return a // b


def seed_everything(seed: int) -> None:
    """Seed `random`, numpy and torch (use seed + process_index * 100003 per process)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def linear_schedule(kind: str, total_steps: int):
    """LR multiplier per optimizer step: `linear` decays 1 -> 0 over `total_steps`, `constant` stays 1."""
    if kind == "constant":
        return lambda step: 1.0
    if kind == "linear":
        return lambda step: max(0.0, 1.0 - step / max(1, total_steps))
    raise ValueError(f"unknown lr schedule {kind!r}; use linear or constant")


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated on `device`, or on CPU the process's peak resident set, in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def init_wandb(track: bool, project: str, name: str, config: dict, run_dir: str):
    """A wandb run when `track`, else None (wandb is imported only then)."""
    if not track:
        return None
    import wandb

    return wandb.init(project=project, name=name, config=config, dir=run_dir, save_code=True)


def log_metrics(metrics: dict, step: int, jsonl_path: str, wandb_run=None) -> None:
    """Append one line {"step": step, **metrics} to the run's JSONL file (and to wandb)."""
    with open(jsonl_path, "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
    if wandb_run is not None:
        wandb_run.log(metrics, step=step)


def write_samples(samples, path: str, step: int, wandb_run=None) -> None:
    """Append evaluation samples (dicts) to a JSONL file, each tagged with the step."""
    with open(path, "a") as f:
        for s in samples:
            f.write(json.dumps({"step": step, **s}) + "\n")
    if wandb_run is not None and samples:
        import wandb

        keys = list(samples[0])
        wandb_run.log({"eval/samples": wandb.Table(columns=keys, data=[[s[k] for k in keys] for s in samples])}, step=step)


def format_samples(samples, n: int = 4, width: int = 70) -> str:
    """A small text table of the first `n` samples, for the console."""
    lines = []
    for s in samples[:n]:
        prompt = s["prompt"].replace("\n", " ")[:width]
        response = s["response"].replace("\n", " ")[:width]
        lines.append(f"  [{s['score']:+.2f}] {prompt!r} -> {response!r}")
    return "\n".join(lines)


def save_checkpoint(accelerator, ckpt_dir: str, iteration: int) -> None:
    """Model, optimizer, scheduler and every process's RNG states (accelerate), plus the iteration."""
    accelerator.save_state(ckpt_dir)
    if accelerator.is_main_process:
        with open(os.path.join(ckpt_dir, "iteration.json"), "w") as f:
            json.dump({"iteration": iteration}, f)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, ckpt_dir: str) -> int:
    """Restore what `save_checkpoint` wrote; return the last completed iteration."""
    path = os.path.join(ckpt_dir, "iteration.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume_from {ckpt_dir}: no iteration.json there; pass a folder written by --save_every")
    accelerator.load_state(ckpt_dir)
    with open(path) as f:
        return json.load(f)["iteration"]


def param_checksum(model) -> float:
    """Sum of all parameters in float64: equal across processes when their weights are equal."""
    return float(sum(p.detach().double().sum().item() for p in model.parameters()))
