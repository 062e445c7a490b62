"""Resumable checkpoints: model, optimizer, scheduler and RNG states, written and read back."""
import json
import os


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
        raise FileNotFoundError(f"--resume_from {ckpt_dir}: no iteration.json there; "
                                "pass a folder written by --save_every")
    accelerator.load_state(ckpt_dir)
    with open(path) as f:
        return json.load(f)["iteration"]
