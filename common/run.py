"""The life of a run around the algorithm, the calls every algorithm file makes in this order: `setup_run`,
`start_training`, then each of `iterations` (`sample_prompts`, `rollout`, `logprobs_of`, ..., `iteration_metrics`,
`log_iteration`), `finish_run`, all inside `save_on_failure`. The algorithm stays in the file: no trainer class."""
import contextlib
import functools
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast
from tqdm.auto import tqdm

from common.config import BaseArgs, derive_batch_sizes
from common.errors import NonFiniteError, UserError
from common.evaluation import evaluate_policy, report_evaluation
from common.generation import batched_logprobs, generate, truncate_after_eos
from common.models import check_models, enable_gradient_checkpointing, load_causal_lm, load_frozen_policy
from common.processes import checksum_spread, end_processes, make_accelerator, peak_memory_gb, seed_everything
from common.rewards import score_with_verifier, verifier_for
from common.run_folders import open_run_dir, save_policy
from common.tasks import encode_prompts, load_task
from common.tracking import init_wandb, log_metrics


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
    train_seconds: float = 0.0  # seconds of training so far (evaluations not counted), summed by iteration_metrics
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


def setup_run(args: BaseArgs, samples_per_prompt: int, group_size: int = 1, reference: bool = False,
              same_vocabulary: tuple = ()):
    """Every check on the input before any weights load (`same_vocabulary`: models that read the policy's token ids),
    then prompts, run folder, scoring, tracking, the policy (fp32) and, if `reference`, a frozen copy: (run, policy,
    ref_model)."""
    accelerator = make_accelerator(args.mixed_precision)
    derive_batch_sizes(args, accelerator.num_processes, samples_per_prompt, group_size)
    seed_everything(args.seed + accelerator.process_index * 100003)
    device = accelerator.device
    tokenizer = check_models(args, same_vocabulary)
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
    verifier = verifier_for(args.task)
    score_texts = functools.partial(score_with_verifier, verifier)
    if args.reward_model is not None:
        from common.reward_models import reward_model_scorer

        score_texts = reward_model_scorer(args, accelerator)
    wandb_run = init_wandb(args.track and accelerator.is_main_process, args.wandb_project,
                           os.path.basename(run_dir), asdict(args), run_dir)
    run = Run(args=args, accelerator=accelerator, tokenizer=tokenizer, train_rows=train_rows, train_ids=train_ids,
              train_mask=train_mask, eval_rows=eval_rows[mine], eval_ids=eval_ids[mine].to(device),
              eval_mask=eval_mask[mine].to(device), score=score_texts, verifier=verifier, run_dir=run_dir,
              wandb_run=wandb_run)
    # the policy trains in fp32 (mixed precision on GPU through accelerate); frozen models in bf16 where supported
    policy = load_causal_lm(args.model_name, device, torch.float32, args.trust_remote_code)
    if args.lora_r:
        from common.lora import add_run_lora

        policy = run.lora_policy = add_run_lora(policy, args, device)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    return run, policy, load_frozen_policy(args, accelerator, run.lora_policy) if reference else None


def start_training(run: Run, policy, extra_metrics: Optional[dict] = None) -> int:
    """Seed, restore --resume_from (after `accelerator.prepare`), evaluate the starting model (the win rate's reference;
    logged with `extra_metrics` unless resuming). Returns the first iteration - 1."""
    args = run.args
    # again now that every model is built, so the set-up's draws (a conversion, LoRA) leave training's unchanged
    seed_everything(args.seed + run.accelerator.process_index * 100003)
    if run.accelerator.distributed_type == DistributedType.FSDP:
        from common.fsdp import init_fsdp_roots

        init_fsdp_roots(run.accelerator)
    run.iteration = start_iteration = 0
    model = policy
    if args.resume_from:
        from common.checkpoints import load_checkpoint

        run.iteration = start_iteration = load_checkpoint(run.accelerator, args.resume_from)
        model = load_causal_lm(args.model_name, run.device, torch.float32, args.trust_remote_code)
    run.ref_metrics, run.ref_scores, samples = evaluate_policy(run, model, with_kl=False)
    run.ref_metrics.update({"eval/kl": 0.0, "eval/win_rate": 0.5, **(extra_metrics or {})})  # vs itself
    if start_iteration == 0:
        report_evaluation(run, 0, run.ref_metrics, samples)
    return start_iteration


def iterations(run: Run, start_iteration: int):
    """Iteration numbers start_iteration + 1 .. --num_iterations, with a progress bar; notes when each begins. Stops
    early, after the iteration that spent --max_train_seconds of training (every process stops together)."""
    args = run.args
    run.progress = tqdm(range(start_iteration + 1, args.num_iterations + 1), desc=args.exp_name,
                        disable=not run.accelerator.is_main_process, initial=start_iteration, total=args.num_iterations)
    for iteration in run.progress:
        run.iteration, run.iteration_start = iteration, time.time()
        yield iteration
        if args.max_train_seconds and broadcast(torch.tensor([run.train_seconds], device=run.device)).item() \
                >= args.max_train_seconds:
            return


def sample_prompts(run: Run, iteration: int, repeat: int = 1):
    """This process's share of the iteration's prompts, each `repeat` times in a row (a group): indices into the
    training rows (B / repeat,), the rows (B), queries and mask (B, P) on the device."""
    args = run.args
    batch = np.random.default_rng([args.seed, iteration]).choice(len(run.train_rows), args.prompts_per_iteration,
                                                                 replace=False)  # resumed or more processes: same
    batch = batch[run.accelerator.process_index:: args.world_size]
    rows = [run.train_rows[i] for i in batch for _ in range(repeat)]
    queries, query_mask = run.train_ids[batch], run.train_mask[batch]
    keep = query_mask.any(dim=0)  # drop columns that are padding in every row
    queries = queries[:, keep].repeat_interleave(repeat, dim=0).to(run.device)  # (B, P)
    query_mask = query_mask[:, keep].repeat_interleave(repeat, dim=0).to(run.device)  # (B, P)
    return batch, rows, queries, query_mask


def rollout(run: Run, model, queries, query_mask, temperature: float, response_length: Optional[int] = None):
    """Sample, cut after EOS, in the run's mixed precision: responses, mask (B, T), lengths, has_eos (B,), seconds."""
    tokenizer, start = run.tokenizer, time.time()
    with run.accelerator.autocast():
        responses = generate(model, queries, query_mask, response_length or run.args.response_length, temperature,
                             tokenizer.pad_token_id, tokenizer.eos_token_id, sampler=run.args.sampler)  # (B, T)
    return (*truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id), time.time() - start)


def logprobs_of(run: Run, model, query_responses, attention_mask):
    """Per-token log-probs (B, T) of the rollout's responses under `model` at --temperature: no gradient,
    --micro_batch_size rows at a time, under the run's mixed precision. None when `model` is None."""
    args = run.args
    if model is None:
        return None
    with run.accelerator.autocast():
        return batched_logprobs(model, query_responses, attention_mask, args.response_length, args.temperature,
                                args.micro_batch_size)


def iteration_metrics(run: Run, stats: dict, *, scores, lengths, has_eos, episode: int, scheduler,
                      generate_seconds: float) -> dict:
    """`stats` (name -> float or list, averaged) and the responses' measures (B,) reduced over processes (their meaning:
    benchmark/README.md, "Metrics"); adds to the training time. A metric that is not finite stops the run."""
    accelerator, device = run.accelerator, run.device
    local = {k: float(np.mean(v)) for k, v in stats.items() if not isinstance(v, list) or v}
    local.update({"objective/scores": scores.mean().item(), "val/response_length": lengths.float().mean().item()})
    keys = sorted(local)
    means = accelerator.reduce(torch.tensor([local[k] for k in keys], dtype=torch.float64, device=device), "mean")
    counts = accelerator.reduce(torch.tensor([has_eos.sum().item(), lengths.sum().item()], dtype=torch.float64,
                                             device=device), "sum")
    seconds = time.time() - run.iteration_start
    run.train_seconds += seconds
    metrics = {k: means[i].item() for i, k in enumerate(keys)}
    metrics.update({
        "val/num_eos": counts[0].item(), "lr": scheduler.get_last_lr()[0], "episode": episode,
        "perf/seconds_per_iter": seconds, "perf/generate_seconds": generate_seconds,
        "perf/tokens_per_second": counts[1].item() / seconds, "perf/peak_memory_gb": peak_memory_gb(device),
    })
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise NonFiniteError(f"{bad[0]} is {metrics[bad[0]]}")
    return metrics


def log_iteration(run: Run, metrics: dict, policy, ref_model=None) -> None:
    """Log the iteration's metrics, with an evaluation of the policy every --eval_every iterations (in the same
    record), and write a checkpoint every --save_every."""
    args, accelerator, iteration = run.args, run.accelerator, run.iteration
    if args.eval_every and iteration % args.eval_every == 0 and iteration != args.num_iterations:
        eval_metrics, _, samples = evaluate_policy(run, policy, ref_model)
        metrics.update(eval_metrics)
        report_evaluation(run, iteration, metrics, samples)
    elif accelerator.is_main_process:
        log_metrics(metrics, iteration, run.metrics_path, run.wandb_run)
    shown = {"score": "objective/scores", "kl": "objective/kl", "len": "val/response_length"}
    run.progress.set_postfix(**{name: f"{metrics[k]:.3f}" for name, k in shown.items() if k in metrics},
                             s_it=f"{metrics['perf/seconds_per_iter']:.1f}")
    if args.save_every and iteration % args.save_every == 0:
        from common.checkpoints import save_checkpoint

        save_checkpoint(accelerator, os.path.join(run.run_dir, "checkpoints", f"iter_{iteration}"), iteration)


@contextlib.contextmanager
def save_on_failure(run: Run, policy):
    """On an exception (or Ctrl-C) in the block, save `policy` to {run_dir}/model_interrupted and re-raise."""
    out = os.path.join(run.run_dir, "model_interrupted")
    try:
        yield
    except UserError as e:  # every process meets it at the same point: they save together, one line names it
        save_policy(run.accelerator, policy, run.tokenizer, out)
        if run.wandb_run is not None:
            run.wandb_run.finish(exit_code=2)
        raise UserError(f"iteration {run.iteration}: {e}. The policy's last good weights are in {out}") from e
    except BaseException:
        if run.accelerator.num_processes == 1:  # several cannot agree on a save after one of them failed
            save_policy(run.accelerator, policy, run.tokenizer, out)
            print(f"[{run.args.exp_name}] stopped early: the current policy is saved in {out}")
        raise


def finish_run(run: Run, policy, ref_model=None, trained=None) -> None:
    """Final evaluation, a check that the processes' `trained` weights (default: the policy) agree, the saved policy
    (from_pretrained loads it), a summary."""
    args, accelerator = run.args, run.accelerator
    metrics, _, samples = evaluate_policy(run, policy, ref_model)
    metrics["dist/param_checksum_spread"] = checksum_spread(accelerator, accelerator.unwrap_model(
        trained if trained is not None else policy))
    metrics["perf/peak_memory_gb"] = peak_memory_gb(run.device)  # the whole run's, the final evaluation included
    report_evaluation(run, run.iteration, metrics, samples)
    accelerator.wait_for_everyone()
    save_policy(accelerator, policy, run.tokenizer, os.path.join(run.run_dir, "model"))
    if accelerator.is_main_process:
        summary = "  ".join(f"{k.split('/')[1]} {run.ref_metrics.get(k, float('nan')):.3f} -> {metrics[k]:.3f}"
                            for k in ("eval/reward", "eval/accuracy", "eval/kl") if k in metrics)
        print(f"[{args.exp_name}] reference -> trained on {len(run.eval_rows) * args.world_size} held-out prompts: "
              f"{summary}\n[{args.exp_name}] metrics, samples and the model (from_pretrained) are in {run.run_dir}")
    if run.wandb_run is not None:
        run.wandb_run.finish()
    end_processes(accelerator)
