"""Responses sampled from the reference policy for every training (or held-out) prompt, cached on disk: A*-PO's
stage-1 scores (apo.py) and reward.py's policy pairs. Sampling takes minutes; the cache, keyed by a hash of everything
the samples depend on, lets a second run with the same settings load them (a local model folder retrained in place
changes the key)."""
import hashlib
import json
import os
import time

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from common.errors import UserError
from common.generation import generate, truncate_after_eos
from common.model_sources import resolve_model
from common.models import load_causal_lm, load_tokenizer
from common.tasks import encode_prompts, load_task


@torch.no_grad()
def sample_texts(model, tokenizer, query_ids, query_mask, num_samples: int, response_length: int, temperature: float,
                 sampler: str = "auto"):
    """`num_samples` responses per (b, P) prompt, cut after EOS and decoded as the RL files decode them -> b lists of
    texts."""
    keep = query_mask.any(dim=0)  # drop columns that are padding in every row
    queries = query_ids[:, keep].repeat_interleave(num_samples, dim=0)  # (b * N, P')
    mask = query_mask[:, keep].repeat_interleave(num_samples, dim=0)  # (b * N, P')
    responses = generate(model, queries, mask, response_length, temperature, tokenizer.pad_token_id,
                         tokenizer.eos_token_id, sampler=sampler)
    responses, _, _, _ = truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)  # (b * N, T)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return [texts[i: i + num_samples] for i in range(0, len(texts), num_samples)]


@torch.no_grad()
def sample_scores(model, tokenizer, rows, query_ids, query_mask, *, score_fn, num_samples: int, response_length: int,
                  temperature: float, batch_size: int, progress: str = "", sampler: str = "auto"):
    """Scores of `num_samples` sampled responses per prompt: (P, L) prompts -> (P, num_samples), on CPU.

    About `batch_size` sequences are generated at a time; `progress` names a progress bar (none when empty).
    """
    prompts_per_batch = max(1, batch_size // num_samples)
    out = []
    for i in tqdm(range(0, len(rows), prompts_per_batch), desc=progress, disable=not progress):
        texts = [t for group in sample_texts(model, tokenizer, query_ids[i:i + prompts_per_batch],
                                             query_mask[i:i + prompts_per_batch], num_samples, response_length,
                                             temperature, sampler) for t in group]
        batch_rows = [row for row in rows[i:i + prompts_per_batch] for _ in range(num_samples)]
        out.append(score_fn(batch_rows, texts).view(-1, num_samples).cpu())
    return torch.cat(out) if out else torch.zeros(0, num_samples)


def gather_strided(accelerator, local, num_rows: int):
    """Rows sampled by every process, back in their order: process r holds rows r, r + W, r + 2W, ...

    local: (this process's rows, ...) on any device -> (num_rows, ...) on the accelerator's device.
    """
    world = accelerator.num_processes
    per_process = -(-num_rows // world)
    padded = torch.zeros(per_process, *local.shape[1:], dtype=local.dtype, device=accelerator.device)
    padded[:len(local)] = local.to(accelerator.device)
    gathered = accelerator.gather(padded).view(world, per_process, *local.shape[1:])
    return gathered.transpose(0, 1).reshape(-1, *local.shape[1:])[:num_rows]


def model_fingerprint(name: str) -> str:
    """The name of a hub model; for a local folder, its path plus the size and mtime of its weight files (retraining
    in place changes it)."""
    path = resolve_model(name)
    if not os.path.isdir(path):
        return name
    stats = sorted((f, os.path.getsize(os.path.join(path, f)), int(os.path.getmtime(os.path.join(path, f))))
                   for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))
    return json.dumps([os.path.abspath(path), stats])


def prompts_digest(rows) -> str:
    """A hash of the rows' prompts, for a cache key."""
    return hashlib.sha256(json.dumps([r["prompt"] for r in rows]).encode()).hexdigest()


def cache_path(folder: str, key: dict) -> str:
    """{folder}/<hash of key>.json."""
    return os.path.join(folder, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + ".json")


def load_cached(path: str):
    """The value cached at `path`, or None."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_cached(path: str, value: dict) -> None:
    """Write `value` to `path` atomically: a half-written file is never read as a cache."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.tmp{os.getpid()}", "w") as f:
        json.dump(value, f)
    os.replace(f"{path}.tmp{os.getpid()}", path)


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


def policy_samples(args, accelerator, model_name: str):
    """reward.py's --pairs policy samples: --num_samples responses per prompt of the train and the test split from
    `model_name`, each process sampling its share of the generate batches (each batch seeded by the seed, the split
    and its place), cached in {output_dir}/preference_pairs/. Returns {split: (rows, P lists of N texts)}."""
    device, tokenizer, model, out = accelerator.device, load_tokenizer(model_name, args.trust_remote_code), None, {}
    for split, num, files in (("train", args.num_train_prompts, args.data_files),
                              ("test", args.num_eval_prompts, args.eval_data_files)):
        rows = load_task(args.task, split, files, num, args.seed if split == "train" else 0)  # test: the RL files'
        key = {"model": model_fingerprint(model_name), "task": args.task, "split": split, "data_files": files,
               "num_prompts": len(rows), "prompts": prompts_digest(rows), "num_samples": args.num_samples,
               "temperature": args.temperature, "response_length": args.response_length, "seed": args.seed,
               "sample_batch_size": args.sample_batch_size}
        path = cache_path(os.path.join(args.output_dir, "preference_pairs"), key)
        cached = load_cached(path)
        if cached is not None:
            out[split] = rows, cached["responses"]
            accelerator.print(f"[{args.exp_name}] {split}: loaded {args.num_samples} cached samples per prompt from "
                              f"{path}")
            continue
        if model is None:  # loaded once, for the first split not in the cache
            model = load_causal_lm(model_name, device, torch.float32, args.trust_remote_code).eval()
        ids, mask = encode_prompts(tokenizer, rows, args.max_prompt_length, f"task {args.task} {split}")  # (P, L)
        starts, mine, start_time = list(range(0, len(rows), args.sample_batch_size)), [], time.time()
        for b in tqdm(starts[accelerator.process_index:: args.world_size], desc=f"sampling {split}",
                      disable=not accelerator.is_main_process):
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), accelerator.autocast():
                torch.manual_seed(int(hashlib.sha256(f"{args.seed}-{split}-{b}".encode()).hexdigest()[:8], 16))
                mine.append((b, sample_texts(model, tokenizer, ids[b: b + args.sample_batch_size].to(device),
                                             mask[b: b + args.sample_batch_size].to(device), args.num_samples,
                                             args.response_length, args.temperature)))
        out[split] = rows, [texts for _, batch in sorted(gather_object(mine)) for texts in batch]  # in row order
        if accelerator.is_main_process:
            write_cached(path, {"key": key, "seconds": time.time() - start_time, "ids": [r["id"] for r in rows],
                                "responses": out[split][1]})
            print(f"[{args.exp_name}] {split}: sampled {args.num_samples} responses per prompt in "
                  f"{time.time() - start_time:.0f} s; cached in {path}")
    return out
