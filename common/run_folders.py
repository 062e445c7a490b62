"""Run folders that never collide, {output_dir}/{exp_name}__{seed}__{unix time} (CleanRL's), the newest linked as
{output_dir}/{exp_name}__{seed} (`--model_name runs/sft__1/model`: the last SFT run's); the trained policy's save."""
import os
import time

from common.models import save_model


def new_run_dir(output_dir: str, exp_name: str, seed: int) -> str:
    """Create and return a fresh run folder {output_dir}/{exp_name}__{seed}__{unix time} (a suffix if it exists)."""
    base = os.path.join(output_dir, f"{exp_name}__{seed}__{int(time.time())}")
    path, n = base, 1
    while True:
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            n += 1
            path = f"{base}_{n}"


def start_run_dir(accelerator, output_dir: str, exp_name: str, seed: int) -> str:
    """A new run folder made by the main process and known to all (`new_run_dir`), linked as the newest."""
    from accelerate.utils import broadcast_object_list

    run_dir = new_run_dir(output_dir, exp_name, seed) if accelerator.is_main_process else None
    run_dir = broadcast_object_list([run_dir])[0]
    if accelerator.is_main_process:
        link_latest(run_dir)
    accelerator.print(f"[{exp_name}] run folder: {run_dir}")
    return run_dir


def open_run_dir(args, accelerator) -> str:
    """The run's folder: new, or with --resume_from the resumed run's own (common/checkpoints.py)."""
    if args.resume_from is None:
        return start_run_dir(accelerator, args.output_dir, args.exp_name, args.seed)
    from common.checkpoints import resume_run_dir

    return resume_run_dir(args, accelerator)


def link_latest(run_dir: str) -> None:
    """Point the link {exp_name}__{seed} at `run_dir` (a real folder of that name is left alone)."""
    link = run_dir.rstrip("/").rsplit("__", 1)[0]
    if os.path.exists(link) and not os.path.islink(link):
        return
    tmp = f"{link}.link{os.getpid()}"
    os.symlink(os.path.basename(run_dir), tmp)
    os.replace(tmp, link)


def save_policy(accelerator, policy, tokenizer, out_dir: str) -> None:
    """Write the policy from the main process; every process calls it (FSDP gathers the shards first)."""
    from accelerate.utils import DistributedType

    sharded = accelerator.distributed_type == DistributedType.FSDP
    state_dict = accelerator.get_state_dict(policy) if sharded else None
    if state_dict:  # tied weights (embeddings and LM head) come back as two copies: keep the first
        seen = set()
        for name, p in accelerator.unwrap_model(policy).named_parameters(remove_duplicate=False):
            if id(p) in seen:
                state_dict.pop(name, None)
            seen.add(id(p))
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(policy), tokenizer, out_dir, state_dict)
