"""Resumable checkpoints written atomically (--save_every, --resume_from), imported only when a run asks for them.

A checkpoint is written to `iter_N.tmp` and renamed to `iter_N` only when complete, so a process killed
while writing one (or a full disk) never leaves a checkpoint that cannot be loaded: `--resume_from
latest` takes the newest complete one. A resumed run goes on in its own folder (common/run_folders.py).
"""
import glob
import json
import os
import shutil

from common.errors import UserError
from common.run_folders import link_latest, start_run_dir

ITERATION_FILE = "iteration.json"  # written last into a checkpoint: its presence marks the checkpoint complete


def resume_run_dir(args, accelerator) -> str:
    """The folder of the run that --resume_from continues, its logs cut back to the checkpoint.

    `--resume_from latest` is resolved to the newest complete checkpoint of this --exp_name and --seed
    in --output_dir (a new run starts when there is none), and `args.resume_from` set to it.
    """
    if args.resume_from == "latest":
        args.resume_from = latest_checkpoint(args.output_dir, args.exp_name, args.seed)
        accelerator.print(f"[{args.exp_name}] --resume_from latest: "
                          f"{args.resume_from or 'no checkpoint of this run yet, starting a new run'}")
    if args.resume_from is None:
        return start_run_dir(accelerator, args.output_dir, args.exp_name, args.seed)
    iteration = checkpoint_iteration(args.resume_from)
    if iteration is None:
        raise UserError(f"--resume_from {args.resume_from}: not a complete checkpoint; pass a checkpoints/iter_N "
                        "folder written by --save_every, or `latest`")
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.resume_from)))
    if accelerator.is_main_process:  # lines of iterations after the checkpoint are written again
        for name in ("metrics.jsonl", "eval_samples.jsonl"):
            keep_lines_up_to(os.path.join(run_dir, name), iteration)
        link_latest(run_dir)
    accelerator.wait_for_everyone()
    accelerator.print(f"[{args.exp_name}] resuming {run_dir} after iteration {iteration}")
    return run_dir


def keep_lines_up_to(path: str, step: int) -> None:
    """Drop the lines of a JSONL log whose "step" is past `step` (atomically)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(f"{path}.tmp", "w") as f:
        f.writelines(lines)
    os.replace(f"{path}.tmp", path)


def run_dirs(output_dir: str, exp_name: str, seed: int) -> list:
    """Every run folder of `exp_name` and `seed` in `output_dir`, oldest first."""
    prefix = os.path.join(output_dir, f"{exp_name}__{seed}__")
    return sorted((p for p in glob.glob(glob.escape(prefix) + "*") if os.path.isdir(p)), key=os.path.getmtime)


def checkpoint_iteration(ckpt_dir: str):
    """The iteration a complete checkpoint folder holds, or None (no folder, or a write that did not finish)."""
    try:
        with open(os.path.join(ckpt_dir, ITERATION_FILE)) as f:
            return json.load(f)["iteration"]
    except (OSError, ValueError, KeyError):
        return None


def latest_checkpoint(output_dir: str, exp_name: str, seed: int):
    """The newest complete checkpoint of any run of `exp_name` and `seed` in `output_dir`, or None."""
    complete = [c for run in run_dirs(output_dir, exp_name, seed)
                for c in glob.glob(os.path.join(glob.escape(run), "checkpoints", "iter_*"))
                if not c.endswith(".tmp") and checkpoint_iteration(c) is not None]
    return max(complete, key=lambda c: os.path.getmtime(os.path.join(c, ITERATION_FILE)), default=None)


def save_checkpoint(accelerator, ckpt_dir: str, iteration: int) -> None:
    """Model, optimizer, scheduler and every process's RNG states (accelerate), plus the iteration, written to
    `ckpt_dir`.tmp and renamed to `ckpt_dir` once every process has written its part."""
    tmp = f"{ckpt_dir}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # the leftover of a write that was killed
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, ITERATION_FILE), "w") as f:
            json.dump({"iteration": iteration}, f)
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # the same iteration saved by an earlier attempt of this run
        os.replace(tmp, ckpt_dir)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, ckpt_dir: str) -> int:
    """Restore what `save_checkpoint` wrote; return the last completed iteration."""
    iteration = checkpoint_iteration(ckpt_dir)
    if iteration is None:
        raise UserError(f"--resume_from {ckpt_dir}: not a complete checkpoint (no {ITERATION_FILE}); pass a "
                        "checkpoints/iter_N folder written by --save_every, or `latest`")
    accelerator.load_state(ckpt_dir)
    return iteration
