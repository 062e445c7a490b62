"""A*-PO's stage 1: the scores of N responses per training prompt sampled from a frozen model, cached."""
import os
import time

import torch

from common.errors import UserError
from common.cache import cache_path, load_cached, model_fingerprint, prompts_digest, write_cached
from common.evaluation import sample_scores
from common.processes import gather_strided


def training_prompt_scores(run, model, num_samples: int, cache_dir: str):
    """Scores of `num_samples` responses per training prompt sampled from `model` at --temperature, cached.

    Each process samples its share of the prompts, then all gather them. The scores are cached in
    {output_dir}/{cache_dir}/, keyed by a hash of everything they depend on (model, reward model, task,
    data files and prompts, num_samples, temperature, response_length, seed): a second run with the
    same settings loads them and skips the sampling. Returns (P, num_samples) scores on CPU and the
    seconds the sampling took (when it was done).
    """
    args, accelerator = run.args, run.accelerator
    key = {"model": model_fingerprint(args.model_name), "reward_model": args.reward_model, "task": args.task,
           "data_files": args.data_files, "num_prompts": len(run.train_rows), "prompts": prompts_digest(run.train_rows),
           "num_samples": num_samples, "temperature": args.temperature, "response_length": args.response_length,
           "seed": args.seed}
    path = cache_path(os.path.join(args.output_dir, cache_dir), key)
    cached = load_cached(path)
    if cached is not None:
        accelerator.print(f"[{args.exp_name}] loaded the cached rewards of {num_samples} samples per prompt "
                          f"from {path}")
        scores, seconds = torch.tensor(cached["rewards"]), cached.get("seconds", float("nan"))  # seconds when sampled
    else:
        scores, seconds = sample_training_prompt_scores(run, model, num_samples, cache_dir)
        if accelerator.is_main_process:
            write_cached(path, {"key": key, "ids": [r["id"] for r in run.train_rows], "rewards": scores.tolist(),
                                "seconds": seconds})
            print(f"[{args.exp_name}] cached the rewards of {num_samples} samples per prompt in {path}")
        accelerator.wait_for_everyone()
    accelerator.print(f"[{args.exp_name}] mean score {scores.mean():.3f}; "
                      f"{int((scores <= 0).all(dim=1).sum())} of {len(scores)} prompts never solved")
    return scores, seconds


def sample_training_prompt_scores(run, model, num_samples: int, label: str):
    """Every process samples its share of the training prompts (progress bar `label`); all gather the scores:
    (P, num_samples) on CPU, in prompt order, and the seconds it took."""
    args, accelerator, device = run.args, run.accelerator, run.device
    start = time.time()
    mine = list(range(accelerator.process_index, len(run.train_rows), args.world_size))
    num_mine, per_process = len(mine), -(-len(run.train_rows) // args.world_size)
    mine += mine[-1:] * (per_process - num_mine)  # every process samples as many batches (FSDP's lock-step)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), accelerator.autocast():
        torch.manual_seed(args.seed + accelerator.process_index * 100003)  # the training RNG does not see the cache
        local = sample_scores(model, run.tokenizer, [run.train_rows[i] for i in mine], run.train_ids[mine].to(device),
                              run.train_mask[mine].to(device), score_fn=run.score, num_samples=num_samples,
                              response_length=args.response_length, temperature=args.temperature,
                              batch_size=args.eval_batch_size, sampler=args.sampler,
                              progress=accelerator.is_main_process and label)
        local = local[:num_mine]
    scores = gather_strided(accelerator, local, len(run.train_rows)).cpu()  # (P, num_samples) in prompt order
    return scores, time.time() - start


def keep_training_prompts(run, keep) -> torch.Tensor:
    """Change `run`'s training prompts (its rows, ids and masks) to those where `keep` (N,) is true (A*-PO's
    --apo.filter_unsolved); refuses fewer than --prompts_per_iteration. Returns the indices kept (to subset anything
    else indexed by training prompt)."""
    kept = keep.nonzero().flatten()
    run.train_rows = [run.train_rows[i] for i in kept.tolist()]
    run.train_ids, run.train_mask = run.train_ids[kept], run.train_mask[kept]
    run.accelerator.print(f"[{run.args.exp_name}] training on {len(kept)} of {len(keep)} prompts")
    if len(kept) < run.args.prompts_per_iteration:
        raise UserError(f"{len(kept)} training prompts left after filtering, fewer than --prompts_per_iteration "
                        f"{run.args.prompts_per_iteration}")
    return kept
