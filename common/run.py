"""The life of a training run around the algorithm: set-up, prompt batches, the end of each iteration, the finish.

Each algorithm file calls these in order (nanochat's way, no trainer class): `setup_run` once,
`start_training` once, `sample_prompts` and `end_iteration` in every iteration of its own
loop, and `finish_run` at the end. The algorithm (models, losses, advantages, resets, the update)
stays in the file.
"""
import contextlib
import hashlib
import json
import math
import os
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast, gather_object
from tqdm.auto import tqdm

from common.checkpoints import (checkpoint_iteration, latest_checkpoint, link_latest, load_checkpoint, save_checkpoint,
                                start_run_dir)
from common.config import BaseArgs, derive_batch_sizes
from common.evaluation import evaluate, evaluate_samples, sample_scores
from common import generation
from common.generation import batched_logprobs, generate, truncate_after_eos
from common.errors import NonFiniteError, UserError
from common.resets import build_reset_states, splice_reset_responses
from common.models import (AdaptersOff, add_lora, check_model, enable_gradient_checkpointing,
                           load_causal_lm, load_reward_model, load_tokenizer, save_model, shard_frozen)
from common.rewards import VERIFIERS, score
from common.tasks import VERIFIABLE, encode_prompts, load_task
from common.tracking import init_wandb, log_metrics, report


@dataclass
class Run:
    """What the loop needs besides the algorithm; made by `setup_run`."""

    args: BaseArgs
    accelerator: Accelerator
    tokenizer: object
    train_rows: list  # training rows of the task
    train_ids: torch.Tensor  # (N, P) left-padded prompt ids, on CPU
    train_mask: torch.Tensor  # (N, P)
    eval_rows: list  # this process's share of the held-out rows
    eval_ids: torch.Tensor  # (M, P') on the device
    eval_mask: torch.Tensor  # (M, P')
    score: Callable  # (rows, texts) -> (B,) scores: the reward model when given, else the task's verifier
    verifier: Optional[Callable]  # the task's verifier (the gold accuracy), None for tasks without one
    run_dir: str
    wandb_run: object = None
    progress: object = None  # the progress bar of `iterations`
    iteration: int = 0  # the current (last started) iteration
    iteration_start: float = 0.0  # time.time() when the current iteration began
    generate_seconds: float = 0.0  # seconds from the iteration's start to the end of its last `rollout`
    train_seconds: float = 0.0  # seconds of training so far (evaluations not counted)
    ref_scores: Optional[torch.Tensor] = None  # (M,) the reference policy's held-out scores, for the win rate
    lora_policy: object = None  # under --lora_r: the policy, whose adapters disabled give the reference
    ref_metrics: dict = field(default_factory=dict)

    @property
    def device(self):
        return self.accelerator.device

    @property
    def metrics_path(self):
        return os.path.join(self.run_dir, "metrics.jsonl")

    @property
    def samples_path(self):
        return os.path.join(self.run_dir, "eval_samples.jsonl")


def make_accelerator(mixed_precision: str = "auto") -> Accelerator:
    """The run's Accelerator. `auto`: the precision an accelerate config or ACCELERATE_MIXED_PRECISION names, else
    bf16 autocast on a GPU that supports it, else none (CPU: fp32, behaviour unchanged). cpu=True where there is
    no GPU lets torchrun/accelerate use gloo on CPU."""
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
    """Sum of all parameters in float64: equal across processes when their weights are equal (FSDP: of the whole
    weights, each gathered from its shards in turn, so one full parameter at a time is held)."""
    return float(sum((p.full_tensor() if hasattr(p, "full_tensor") else p).detach().sum(dtype=torch.float64).item()
                     for p in model.parameters()))


def open_run_dir(args: BaseArgs, accelerator) -> str:
    """The run's folder: new, or the resumed checkpoint's own with its logs cut back to the checkpoint.

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


def setup_run(args: BaseArgs, samples_per_prompt: int, group_size: int = 1, reference: bool = False,
              same_vocabulary: tuple = ()):
    """Accelerator, batch sizes, seeds, every check on the input, tokenizer, rows, the run folder, scoring,
    tracking; then the policy (fp32, to train) and, when the method asks for one, a frozen copy as the reference.

    Everything that can refuse the input does so before any model is loaded: flags, data files, the
    models named (`same_vocabulary`: other models that read the policy's token ids), context length.
    The run folder is new ({exp_name}__{seed}__{time}), or with --resume_from the checkpoint's own,
    its logs cut back to the checkpoint. Returns (run, policy, ref_model), ref_model None unless `reference`.
    """
    accelerator = make_accelerator(args.mixed_precision)
    generation.SAMPLER["mode"] = args.sampler
    derive_batch_sizes(args, accelerator.num_processes, samples_per_prompt, group_size)
    seed_everything(args.seed + accelerator.process_index * 100003)
    device = accelerator.device

    if args.reward_model is None and args.task not in VERIFIABLE:
        raise UserError(f"task {args.task} has no verifier: pass --reward_model (a sequence-classification model)")
    config = check_model(args.model_name, "--model_name", args.trust_remote_code)
    context = args.max_prompt_length + args.response_length
    if context > getattr(config, "max_position_embeddings", context):
        raise UserError(f"--max_prompt_length + --response_length = {context} exceeds the model's context "
                        f"({config.max_position_embeddings} tokens); lower one of them")
    if args.reward_model is not None:
        check_model(args.reward_model, "--reward_model", args.trust_remote_code, score_head=True)
    tokenizer = load_tokenizer(args.model_name, args.trust_remote_code)
    for name in same_vocabulary:
        check_model(name, "the value model", args.trust_remote_code)
        other = load_tokenizer(name, args.trust_remote_code).get_vocab()
        if any(other.get(token) != i for token, i in tokenizer.get_vocab().items()):
            raise UserError(f"{name} reads another vocabulary than the policy {args.model_name}; pass a model "
                            "that shares the policy's tokenizer")
    train_rows = load_task(args.task, "train", args.data_files, args.num_train_prompts, args.seed)
    eval_rows = load_task(args.task, "test", args.eval_data_files, args.num_eval_prompts)
    if len(train_rows) < args.prompts_per_iteration:
        raise UserError(f"{len(train_rows)} training prompts, fewer than --prompts_per_iteration "
                        f"{args.prompts_per_iteration}")
    train_ids, train_mask = encode_prompts(tokenizer, train_rows, args.max_prompt_length, f"task {args.task} train")
    eval_ids, eval_mask = encode_prompts(tokenizer, eval_rows, args.max_prompt_length, f"task {args.task} test")
    mine = slice(accelerator.process_index, None, args.world_size)
    if accelerator.distributed_type == DistributedType.FSDP and len(eval_rows) % args.world_size:
        raise UserError(f"under FSDP every process evaluates the same number of prompts (each forward pass gathers "
                        f"weights from all): --num_eval_prompts {len(eval_rows)} is not a multiple of the "
                        f"{args.world_size} processes; pass one that is")
    run_dir = open_run_dir(args, accelerator)

    reward_model = reward_tokenizer = None
    if args.reward_model is not None:
        reward_tokenizer = load_tokenizer(args.reward_model, args.trust_remote_code)
        reward_model = shard_frozen(accelerator, load_reward_model(
            args.reward_model, device, frozen_dtype(accelerator), reward_tokenizer.pad_token_id,
            args.trust_remote_code)).eval()
    verifier = VERIFIERS.get(args.task)

    def score_texts(rows, texts):
        return score(rows, texts, verifier, reward_model, reward_tokenizer, args.eval_batch_size)

    wandb_run = init_wandb(args.track and accelerator.is_main_process, args.wandb_project,
                           os.path.basename(run_dir), asdict(args), run_dir)
    run = Run(args=args, accelerator=accelerator, tokenizer=tokenizer, train_rows=train_rows, train_ids=train_ids,
              train_mask=train_mask, eval_rows=eval_rows[mine], eval_ids=eval_ids[mine].to(device),
              eval_mask=eval_mask[mine].to(device), score=score_texts, verifier=verifier, run_dir=run_dir,
              wandb_run=wandb_run)
    # the policy trains in fp32 (mixed precision on GPU through accelerate); frozen models in bf16 where supported
    policy = load_causal_lm(args.model_name, device, torch.float32, args.trust_remote_code)
    if args.lora_r:  # the adapters start the same on every process (FSDP keeps each process's own shard of them)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(args.seed)
            policy = run.lora_policy = add_lora(policy, args.lora_r, args.lora_alpha, args.lora_target_modules)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    return run, policy, load_frozen_policy(run) if reference else None


def load_frozen_policy(run: Run):
    """A frozen copy of the starting policy (`--model_name`), in bf16 where the device supports it, sharded under
    FSDP; under --lora_r the policy itself with its adapters disabled (no second copy)."""
    args = run.args
    if run.lora_policy is not None:
        return AdaptersOff(run.lora_policy)
    model = load_causal_lm(args.model_name, run.device, frozen_dtype(run.accelerator), args.trust_remote_code)
    return shard_frozen(run.accelerator, model).eval()


def evaluate_policy(run: Run, model, ref_model=None, with_kl: bool = True):
    """Evaluate `model` on every process's share of the held-out prompts; reduce the metrics, gather the samples.

    The decoded responses (--eval_temperature) give reward, accuracy, win rate, length and EOS rate;
    --eval_samples responses per prompt sampled at --temperature give pass@k, their mean reward and the
    KL to the reference (`ref_model`, or a frozen copy loaded for it when None). Returns (metrics,
    this process's scores (M,), all samples).
    """
    args, accelerator = run.args, run.accelerator
    if with_kl and args.eval_samples and ref_model is None:
        ref_model = load_frozen_policy(run)
    model = accelerator.unwrap_model(model)
    with accelerator.autocast():
        sums, count, scores, samples = evaluate(
            model, run.tokenizer, run.eval_rows, run.eval_ids, run.eval_mask, score_fn=run.score,
            response_length=args.response_length, temperature=args.eval_temperature, batch_size=args.eval_batch_size,
            seed=args.seed, ref_scores=run.ref_scores, verifier=run.verifier)
        if args.eval_samples:
            sums.update(evaluate_samples(
                model, ref_model if with_kl else None, run.tokenizer, run.eval_rows, run.eval_ids, run.eval_mask,
                score_fn=run.score, verifier=run.verifier, num_samples=args.eval_samples,
                response_length=args.response_length, temperature=args.temperature,
                batch_size=args.eval_batch_size, seed=args.seed)[0])
    keys = sorted(sums)
    totals = accelerator.reduce(torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64, device=run.device),
                                "sum")
    metrics = {f"eval/{k}": (totals[i] / totals[-1]).item() for i, k in enumerate(keys)}
    return metrics, scores, gather_object(samples)


def report_evaluation(run: Run, step: int, metrics: dict, samples) -> None:
    """Write an evaluation's metrics and samples (main process only)."""
    if run.accelerator.is_main_process:
        report(metrics, samples, step, run.metrics_path, run.samples_path, run.wandb_run)


def start_training(run: Run, policy, extra_metrics: Optional[dict] = None) -> int:
    """Seed, restore the checkpoint of --resume_from (after `accelerator.prepare`), then evaluate the reference policy:
    the policy before training, that every later evaluation is compared with. Returns the first iteration - 1.

    The reference's scores give the win rate, its metrics the summary at the end. When resuming, a
    fresh fp32 copy of the starting model is evaluated, so the numbers are the first run's (nothing is
    logged again). `extra_metrics` are logged with it (A*-PO's stage-1 seconds).
    """
    args = run.args
    # seeded again now that every model is loaded or built: however much randomness the set-up drew (a conversion, a
    # new score head, LoRA), training and evaluation draw the same; a checkpoint's own generator states replace these
    seed_everything(args.seed + run.accelerator.process_index * 100003)
    for model in run.accelerator._models:  # FSDP: the first module to run forward becomes the root; PPO's pair must
        if hasattr(model, "_get_fsdp_state"):  # be it, though sampling calls its policy alone first
            model._get_fsdp_state()._lazy_init()
    start_iteration = load_checkpoint(run.accelerator, args.resume_from) if args.resume_from else 0
    run.iteration = start_iteration
    model = policy if start_iteration == 0 else load_causal_lm(args.model_name, run.device, torch.float32,
                                                               args.trust_remote_code)
    run.ref_metrics, run.ref_scores, samples = evaluate_policy(run, model, with_kl=False)
    run.ref_metrics.update({"eval/kl": 0.0, "eval/win_rate": 0.5, **(extra_metrics or {})})  # vs itself
    if start_iteration == 0:
        report_evaluation(run, 0, run.ref_metrics, samples)
    return start_iteration


def training_prompt_scores(run: Run, model, num_samples: int, cache_dir: str):
    """Scores of `num_samples` responses per training prompt sampled from `model` at --temperature, cached.

    Each process samples its share of the prompts, then all gather them. The scores are cached in
    {output_dir}/{cache_dir}/, keyed by a hash of everything they depend on (model, reward model, task,
    data files and prompts, num_samples, temperature, response_length, seed): a second run with the
    same settings loads them and skips the sampling. A local model folder changed in place is not
    detected (delete the cache). Returns (P, num_samples) scores on CPU and the seconds the sampling took.
    """
    args, accelerator = run.args, run.accelerator
    prompts_digest = hashlib.sha256(json.dumps([r["prompt"] for r in run.train_rows]).encode()).hexdigest()
    key = {"model": args.model_name, "reward_model": args.reward_model, "task": args.task,
           "data_files": args.data_files, "num_prompts": len(run.train_rows), "prompts": prompts_digest,
           "num_samples": num_samples, "temperature": args.temperature, "response_length": args.response_length,
           "seed": args.seed}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(args.output_dir, cache_dir, f"{name}.json")
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        accelerator.print(f"[{args.exp_name}] loaded the cached rewards of {num_samples} samples per prompt "
                          f"from {path}")
        scores, seconds = torch.tensor(cached["rewards"]), cached.get("seconds", float("nan"))  # seconds when sampled
    else:
        scores, seconds = _sample_training_prompt_scores(run, model, num_samples, path, key, cache_dir)
    accelerator.print(f"[{args.exp_name}] mean score {scores.mean():.3f}; "
                      f"{int((scores <= 0).all(dim=1).sum())} of {len(scores)} prompts never solved")
    return scores, seconds


def _sample_training_prompt_scores(run: Run, model, num_samples: int, path: str, key: dict, label: str):
    """training_prompt_scores' sampling (progress bar `label`), gathering and atomic caching."""
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
                              batch_size=args.eval_batch_size, progress=accelerator.is_main_process and label)
        local = local[:num_mine]
    scores = gather_strided(accelerator, local, len(run.train_rows)).cpu()  # (P, num_samples) in prompt order
    seconds = time.time() - start
    if accelerator.is_main_process:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.tmp{os.getpid()}", "w") as f:
            json.dump({"key": key, "ids": [r["id"] for r in run.train_rows], "rewards": scores.tolist(),
                       "seconds": seconds}, f)
        os.replace(f"{path}.tmp{os.getpid()}", path)  # a half-written file is never read as a cache
        print(f"[{args.exp_name}] cached the rewards of {num_samples} samples per prompt in {path}")
    accelerator.wait_for_everyone()
    return scores, seconds


def keep_training_prompts(run: Run, keep) -> torch.Tensor:
    """Train on the prompts where `keep` (N,) is true only; refuses fewer than --prompts_per_iteration.

    Returns the indices kept (to subset anything else indexed by training prompt).
    """
    kept = keep.nonzero().flatten()
    run.train_rows = [run.train_rows[i] for i in kept.tolist()]
    run.train_ids, run.train_mask = run.train_ids[kept], run.train_mask[kept]
    run.accelerator.print(f"[{run.args.exp_name}] training on {len(kept)} of {len(keep)} prompts")
    if len(kept) < run.args.prompts_per_iteration:
        raise UserError(f"{len(kept)} training prompts left after filtering, fewer than --prompts_per_iteration "
                         f"{run.args.prompts_per_iteration}")
    return kept


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


def iterations(run: Run, start_iteration: int):
    """Iteration numbers start_iteration + 1 .. --num_iterations, with a progress bar; notes when each begins."""
    args = run.args
    run.progress = tqdm(range(start_iteration + 1, args.num_iterations + 1), desc=args.exp_name,
                        disable=not run.accelerator.is_main_process, initial=start_iteration, total=args.num_iterations)
    for iteration in run.progress:
        run.iteration, run.iteration_start = iteration, time.time()
        yield iteration


def sample_prompts(run: Run, iteration: int, repeat: int = 1):
    """This process's prompts of an iteration, each `repeat` times in consecutive rows (a group).

    Every process draws the same global batch (from the seed and the iteration) and takes its share,
    so resuming or adding processes sees the same prompts. Returns the indices into the training
    rows (B / repeat,), the rows (B), and left-padded queries and mask (B, P) on the device.
    """
    args = run.args
    batch = np.random.default_rng([args.seed, iteration]).choice(len(run.train_rows), args.prompts_per_iteration,
                                                                 replace=False)
    batch = batch[run.accelerator.process_index:: args.world_size]
    rows = [run.train_rows[i] for i in batch for _ in range(repeat)]
    queries, query_mask = run.train_ids[batch], run.train_mask[batch]
    keep = query_mask.any(dim=0)  # drop columns that are padding in every row
    queries = queries[:, keep].repeat_interleave(repeat, dim=0).to(run.device)  # (B, P)
    query_mask = query_mask[:, keep].repeat_interleave(repeat, dim=0).to(run.device)  # (B, P)
    return batch, rows, queries, query_mask


def rollout(run: Run, model, queries, query_mask, temperature: float, response_length: Optional[int] = None):
    """Sample `response_length` (default --response_length) tokens per query under the run's mixed precision
    and cut each response after its first EOS; the time since the iteration began is its generation time.

    Returns responses, mask of real tokens (EOS included) (B, T), lengths and has_eos (B,).
    """
    tokenizer = run.tokenizer
    with run.accelerator.autocast():
        responses = generate(model, queries, query_mask, response_length or run.args.response_length, temperature,
                             tokenizer.pad_token_id, tokenizer.eos_token_id)  # (B, T)
    run.generate_seconds = time.time() - run.iteration_start
    return truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)


def reset_rollout(run: Run, model, queries, query_mask, prefixes, rollin, temperature: float):
    """Rollouts that restart from reset states: each query plus the first h = `rollin` (B,) tokens of its row of
    `prefixes` (B, L) forced, then the policy's continuation, cut after its first EOS (h = 0: from the prompt).

    Returns responses (roll-in + continuation), their mask (B, T), lengths and has_eos (B,), and `forced`
    (B, T): the roll-in tokens, which the policy did not choose.
    """
    tokenizer, args = run.tokenizer, run.args
    states, state_mask = build_reset_states(queries, query_mask, prefixes, rollin, tokenizer.pad_token_id)
    continuations = rollout(run, model, states, state_mask, temperature, args.response_length - int(rollin.min()))[0]
    responses, forced = splice_reset_responses(prefixes, rollin, continuations, args.response_length,
                                               tokenizer.pad_token_id)  # (B, T), (B, T)
    return (*truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id), forced)


def logprobs_of(run: Run, model, query_responses, attention_mask):
    """Per-token log-probs (B, T) of the rollout's responses under `model` at --temperature: no gradient,
    --micro_batch_size rows at a time, under the run's mixed precision. None when `model` is None."""
    args = run.args
    if model is None:
        return None
    with run.accelerator.autocast():
        return batched_logprobs(model, query_responses, attention_mask, args.response_length, args.temperature,
                                args.micro_batch_size)


def end_iteration(run: Run, stats: dict, *, scores, lengths, has_eos, episode: int, scheduler, policy,
                  ref_model=None) -> bool:
    """Reduce the iteration's statistics over processes and log them; evaluate every --eval_every iterations,
    checkpoint every --save_every; True when --max_train_seconds is spent (every process stops together).

    `stats` maps metric names to a float or a list of floats (averaged); `scores`, `lengths` and
    `has_eos` (B,) are the responses'; `episode` counts the samples generated so far.
    """
    args, accelerator, device, iteration = run.args, run.accelerator, run.device, run.iteration
    local = {k: float(np.mean(v)) for k, v in stats.items() if not isinstance(v, list) or v}
    local.update({"objective/scores": scores.mean().item(), "val/response_length": lengths.float().mean().item()})
    keys = sorted(local)
    means = accelerator.reduce(torch.tensor([local[k] for k in keys], dtype=torch.float64, device=device), "mean")
    counts = accelerator.reduce(torch.tensor([has_eos.sum().item(), lengths.sum().item()], dtype=torch.float64,
                                             device=device), "sum")
    seconds = time.time() - run.iteration_start
    metrics = {k: means[i].item() for i, k in enumerate(keys)}
    metrics.update({
        "val/num_eos": counts[0].item(), "lr": scheduler.get_last_lr()[0], "episode": episode,
        "perf/seconds_per_iter": seconds, "perf/generate_seconds": run.generate_seconds,
        "perf/tokens_per_second": counts[1].item() / seconds, "perf/peak_memory_gb": peak_memory_gb(device),
    })
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise NonFiniteError(f"{bad[0]} is {metrics[bad[0]]}")
    if args.eval_every and iteration % args.eval_every == 0 and iteration != args.num_iterations:
        eval_metrics, _, samples = evaluate_policy(run, policy, ref_model)
        metrics.update(eval_metrics)
        report_evaluation(run, iteration, metrics, samples)
    elif accelerator.is_main_process:
        log_metrics(metrics, iteration, run.metrics_path, run.wandb_run)
    shown = {"score": "objective/scores", "kl": "objective/kl", "len": "val/response_length"}
    run.progress.set_postfix(**{name: f"{metrics[k]:.3f}" for name, k in shown.items() if k in metrics},
                             s_it=f"{seconds:.1f}")
    if args.save_every and iteration % args.save_every == 0:
        save_checkpoint(accelerator, os.path.join(run.run_dir, "checkpoints", f"iter_{iteration}"), iteration)
    run.train_seconds += seconds
    if not args.max_train_seconds:
        return False
    return broadcast(torch.tensor([run.train_seconds], device=device)).item() >= args.max_train_seconds


def save_policy(run: Run, policy, out_dir: str) -> None:
    """Write the policy (from_pretrained loads it) from the main process. Under FSDP its shards are gathered into
    full weights first, which every process takes part in: all of them call this."""
    accelerator = run.accelerator
    sharded = accelerator.distributed_type == DistributedType.FSDP
    state_dict = accelerator.get_state_dict(policy) if sharded else None
    if state_dict:  # tied weights (embeddings and LM head) come back as two copies: keep the first
        seen = set()
        for name, p in accelerator.unwrap_model(policy).named_parameters(remove_duplicate=False):
            if id(p) in seen:
                state_dict.pop(name, None)
            seen.add(id(p))
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(policy), run.tokenizer, out_dir, state_dict)


@contextlib.contextmanager
def save_on_failure(run: Run, policy):
    """On an exception (or Ctrl-C) inside the block, save `policy` to {run_dir}/model_interrupted, then re-raise.

    A UserError (a reward that raised or was NaN, a loss that was not finite: every process meets it
    at the same point) is saved by the main process and ends the run with one line naming the
    iteration; any other exception is saved by single-process runs only (several processes cannot
    agree on a save after one of them failed) and keeps its traceback.
    """
    out = os.path.join(run.run_dir, "model_interrupted")
    try:
        yield
    except UserError as e:
        save_policy(run, policy, out)
        if run.wandb_run is not None:
            run.wandb_run.finish(exit_code=2)
        raise UserError(f"iteration {run.iteration}: {e}. The policy's last good weights are in {out}") from e
    except BaseException:
        if run.accelerator.num_processes == 1:
            save_model(run.accelerator.unwrap_model(policy), run.tokenizer, out)
            print(f"[{run.args.exp_name}] stopped early: the current policy is saved in {out}")
        raise


def end_processes(accelerator) -> None:
    """The last call of a finished run. Under several processes every one waits here, ends the process group and
    leaves at once: gloo's threads outlive destroy_process_group, and at the interpreter's exit they can abort
    a run that has finished and saved everything (SIGABRT, 'terminate called without an active exception':
    pytorch/pytorch#190489; measured here on 1 in 10 two-process runs)."""
    if not torch.distributed.is_initialized():
        return
    accelerator.wait_for_everyone()
    accelerator.end_training()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def finish_run(run: Run, policy, ref_model=None, trained=None) -> None:
    """Final evaluation, a check that every process ended with the same weights, the saved policy, a summary.

    `trained` is everything the optimizer trained (the policy, or PPO's policy and value model) for
    the check; the saved model is the policy alone, loadable with `from_pretrained`.
    """
    args, accelerator = run.args, run.accelerator
    metrics, _, samples = evaluate_policy(run, policy, ref_model)
    trained = accelerator.unwrap_model(trained if trained is not None else policy)
    checksums = accelerator.gather(torch.tensor([param_checksum(trained)], dtype=torch.float64, device=run.device))
    metrics["dist/param_checksum_spread"] = (checksums.max() - checksums.min()).item()
    metrics["perf/peak_memory_gb"] = peak_memory_gb(run.device)  # the whole run's, the final evaluation included
    report_evaluation(run, run.iteration, metrics, samples)
    accelerator.wait_for_everyone()
    save_policy(run, policy, os.path.join(run.run_dir, "model"))
    if accelerator.is_main_process:
        summary = "  ".join(f"{k.split('/')[1]} {run.ref_metrics.get(k, float('nan')):.3f} -> {metrics[k]:.3f}"
                            for k in ("eval/reward", "eval/accuracy", "eval/kl") if k in metrics)
        print(f"[{args.exp_name}] reference -> trained on {len(run.eval_rows) * args.world_size} held-out prompts: "
              f"{summary}\n[{args.exp_name}] metrics, samples and the model (from_pretrained) are in {run.run_dir}")
    if run.wandb_run is not None:
        run.wandb_run.finish()
    end_processes(accelerator)
