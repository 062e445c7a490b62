"""A*-PO: Policy Optimization via Optimal Advantage Regression (Brantley et al. 2025, "Accelerating RL for
LLM Reasoning with Optimal Advantage Regression", arXiv:2505.20686).

    python apo.py                                     # embedded SmolLM2-135M + arithmetic, 2 CPU cores, ~11 min (stage 1 included)
    python apo.py --apo.stage1_only                   # stage 1 alone: sample, score and cache V*
    accelerate launch --config_file configs/ddp.yaml apo.py --model_name Qwen/Qwen2.5-1.5B-Instruct --task gsm8k

Stage 1, offline and once: the reference policy samples N responses per training prompt, and
    V*(x) = beta1 log mean_i exp(r_i / beta1)
estimates the optimal value of the KL-regularised objective. Stage 2: one response per prompt from
the current policy, and a least-squares regression of the optimal advantage r - V*(x) with the
policy's log-ratio to the reference:
    loss = mean over responses of (beta2 * sum_t (lp - lp_ref) - (r - V*(x)))^2.
No critic, no group of samples, no clipping, no old log-probs (the loss is relative to the reference).

Stage 1's rewards are cached in {output_dir}/apo_stage1/, keyed by a hash of what they depend on
(model, reward model, task, data files and prompts, N, temperature, response_length, seed): a
second run with the same settings loads them and skips the sampling. V* is recomputed from them,
so another beta1 (or --apo.filter_unsolved) reuses the cache; a local model folder changed in
place is not detected (delete the cache).

Where this file departs from the paper and why:
1. 128 training prompts by default (`--num_train_prompts`): stage 1 samples N = 8 responses for
   each, the cost that the authors paid once with vLLM on GPUs; on a CPU this keeps it to minutes.
2. beta1 = 0 selects the plain mean of the N rewards, as in the authors' code. Note the formula's
   limits: it tends to the mean as beta1 -> infinity and to the max of the N rewards as beta1 -> 0+.
3. Entropy bonus 0 by default (the authors' config has 0.001): `--apo.entropy_coef`.
4. beta2 = 1e-3 as in the paper: on a CPU budget the policy never moves the hundreds of nats from
   the reference at which the regularisation binds, so the update is close to a policy gradient
   with the baseline V*(x); raise beta2 to hold the policy nearer the reference.
5. Responses are sampled to a fixed length and cut after their first EOS (pure sampling at
   `--temperature` in both stages; the authors sampled both at 1.0), so the log-probs scored are
   those of the sampling distribution and V* is the value under that same distribution.
"""
import contextlib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

import numpy as np
import torch
import tyro
from accelerate import Accelerator
from accelerate.utils import broadcast, gather_object
from tqdm.auto import tqdm

from common.evaluation import evaluate
from common.generation import batched_logprobs, entropy_from_logits, generate, logprobs_from_logits, response_logits, truncate_after_eos
from common.models import EMBEDDED_MODEL, default_dtype, load_causal_lm, load_reward_model, load_tokenizer, save_model
from common.rewards import VERIFIERS, score
from common.tasks import VERIFIABLE, encode_prompts, load_task
from common.tracking import (exact_div, format_samples, init_wandb, linear_schedule, load_checkpoint, log_metrics,
                             param_checksum, peak_memory_gb, save_checkpoint, seed_everything, write_samples)


@dataclass
class APOHParams:
    num_samples: int = 8
    """N: reference responses per training prompt in stage 1"""
    beta1: float = 0.5
    """beta1 of V*(x) = beta1 log mean_i exp(r_i / beta1) (0: the plain mean of the N rewards)"""
    beta2: float = 1e-3
    """beta2: the loss regresses beta2 * sum_t (lp - lp_ref) onto r - V*(x)"""
    entropy_coef: float = 0.0
    """weight of the entropy bonus (mean token entropy subtracted from the loss; 0: none)"""
    filter_unsolved: bool = False
    """drop training prompts whose N reference samples all score <= 0 (never solved; for 0/1 verifiers)"""
    stage1_only: bool = False
    """run stage 1 (sample, score, cache) and exit"""
    num_epochs: int = 1
    """passes of optimisation over each batch (the loss is relative to the reference: no old log-probs needed)"""
    num_minibatches: int = 1
    """optimizer steps per pass over the batch"""


@dataclass
class Args:
    # experiment
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of the run; the output folder is {output_dir}/{exp_name}__{seed}"""
    seed: int = 1
    """random seed (each process adds process_index * 100003)"""
    output_dir: str = "runs"
    """where run folders go: metrics.jsonl, eval_samples.jsonl, model/, checkpoints/"""
    track: bool = False
    """log to Weights & Biases too"""
    wandb_project: str = "resetrl"
    """wandb project name"""
    save_every: int = 0
    """write a resumable checkpoint every N iterations (0: never)"""
    resume_from: Optional[str] = None
    """checkpoint folder (written by --save_every) to continue from"""

    # models
    model_name: str = EMBEDDED_MODEL
    """policy and reference: hub id or local folder (the default falls back to the packaged copy offline)"""
    reward_model: Optional[str] = None
    """sequence-classification reward model (hub id or folder); default: the task's verifier"""
    trust_remote_code: bool = False
    """allow models whose code lives in their repository"""

    # task
    task: str = "arith"
    """arith (embedded, offline), gsm8k, tldr or hh"""
    data_files: Optional[str] = None
    """local .json/.jsonl/.parquet training file(s), comma-separated, with the task's hub columns"""
    eval_data_files: Optional[str] = None
    """local held-out file(s), same columns"""
    num_train_prompts: Optional[int] = 128
    """use the first N training prompts (None: all)"""
    num_eval_prompts: int = 250
    """held-out prompts evaluated"""
    max_prompt_length: int = 256
    """longest prompt in tokens; longer prompts are refused before training"""
    response_length: int = 24
    """tokens sampled per response (cut after the first EOS)"""
    temperature: float = 0.7
    """sampling temperature for training rollouts (log-probs use the same)"""
    eval_temperature: float = 0.0
    """sampling temperature for evaluation (0: greedy)"""

    # batches and optimiser
    num_iterations: int = 24
    """training iterations (one batch of prompts each)"""
    max_train_seconds: float = 0.0
    """stop after the iteration that passes this many seconds of training (evaluation not counted), then
    evaluate and save as usual (0: no limit). A linear lr schedule still assumes --num_iterations"""
    prompts_per_iteration: int = 32
    """prompts per iteration, over all processes"""
    micro_batch_size: int = 16
    """sequences per forward/backward on one process (gradient accumulation fills the minibatch)"""
    learning_rate: float = 5e-6
    """AdamW learning rate"""
    lr_schedule: Literal["linear", "constant"] = "constant"
    """learning-rate schedule over the optimizer steps"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    eval_every: int = 0
    """evaluate every N iterations (0: only before and after training)"""
    eval_batch_size: int = 64
    """prompts per evaluation batch"""

    apo: APOHParams = field(default_factory=APOHParams)

    # derived right after parsing (not flags)
    world_size: tyro.conf.Suppress[int] = 0
    """number of processes"""
    local_prompts: tyro.conf.Suppress[int] = 0
    """prompts per iteration on this process"""
    local_batch_size: tyro.conf.Suppress[int] = 0
    """sequences per iteration on this process"""
    mini_batch_size: tyro.conf.Suppress[int] = 0
    """sequences per optimizer step on this process"""
    grad_accum_steps: tyro.conf.Suppress[int] = 0
    """micro-batches per optimizer step"""


# ALGO LOGIC: V* from reference samples, and least squares on the optimal advantage
def optimal_value(rewards, beta1: float):
    """V*(x) = beta1 log mean_i exp(r_i / beta1) per prompt: (P, N) rewards -> (P,); stable at any scale (logsumexp).

    beta1 = 0 gives the plain mean (the authors' switch; the formula's limit as beta1 -> infinity).
    """
    if beta1 < 0:
        raise ValueError(f"beta1 must be >= 0, got {beta1}")
    if beta1 == 0:
        return rewards.mean(dim=1)
    return beta1 * (torch.logsumexp(rewards / beta1, dim=1) - math.log(rewards.shape[1]))


def apo_loss(logprobs, ref_logprobs, mask, rewards, v_star, beta2: float):
    """Squared error per response: (B, T) log-probs of pi and ref, (B, T) mask, (B,) rewards and V* -> (B,).

    (beta2 * sum_t (lp - lp_ref) - (r - V*(x)))^2, log-probs summed over real tokens.
    """
    log_ratio = ((logprobs - ref_logprobs) * mask).sum(dim=1)  # (B,)
    return (beta2 * log_ratio - (rewards - v_star)) ** 2


@torch.no_grad()
def sample_rewards(model, tokenizer, rows, query_ids, query_mask, score_fn, num_samples: int, response_length: int,
                   temperature: float, batch_size: int, progress: bool):
    """Scores of `num_samples` sampled responses per prompt: (P, L) prompts -> (P, num_samples), on CPU."""
    prompts_per_batch = max(1, batch_size // num_samples)
    out = []
    for i in tqdm(range(0, len(rows), prompts_per_batch), desc="apo stage 1", disable=not progress):
        q, qm = query_ids[i:i + prompts_per_batch], query_mask[i:i + prompts_per_batch]
        keep = qm.any(dim=0)  # drop columns that are padding in every row
        q, qm = q[:, keep].repeat_interleave(num_samples, dim=0), qm[:, keep].repeat_interleave(num_samples, dim=0)
        responses = generate(model, q, qm, response_length, temperature, tokenizer.pad_token_id, tokenizer.eos_token_id)
        responses = truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)[0]
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        batch_rows = [row for row in rows[i:i + prompts_per_batch] for _ in range(num_samples)]
        out.append(score_fn(batch_rows, texts).view(-1, num_samples).cpu())
    return torch.cat(out) if out else torch.zeros(0, num_samples)


if __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # cpu=True lets torchrun/accelerate use gloo on CPU
    G = 1  # A*-PO samples one response per prompt
    args.world_size = accelerator.num_processes
    args.local_prompts = exact_div(args.prompts_per_iteration, args.world_size, "--prompts_per_iteration over processes")
    args.local_batch_size = args.local_prompts * G
    args.mini_batch_size = exact_div(args.local_batch_size, args.apo.num_minibatches,
                                     "sequences per process (prompts_per_iteration / processes) over --apo.num_minibatches")
    args.grad_accum_steps = exact_div(args.mini_batch_size, args.micro_batch_size, "minibatch size over --micro_batch_size")
    seed_everything(args.seed + accelerator.process_index * 100003)
    device = accelerator.device
    run_dir = os.path.join(args.output_dir, f"{args.exp_name}__{args.seed}")
    metrics_path, samples_path = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "eval_samples.jsonl")
    if accelerator.is_main_process:
        os.makedirs(run_dir, exist_ok=True)
        if args.resume_from is None:
            for path in (metrics_path, samples_path):
                open(path, "w").close()

    # data: every check on the input happens here, before any training time is spent
    if args.reward_model is None and args.task not in VERIFIABLE:
        raise ValueError(f"task {args.task} has no verifier: pass --reward_model (a sequence-classification model)")
    tokenizer = load_tokenizer(args.model_name, args.trust_remote_code)
    train_rows = load_task(args.task, "train", args.data_files, args.num_train_prompts, args.seed)
    eval_rows = load_task(args.task, "test", args.eval_data_files, args.num_eval_prompts)
    if len(train_rows) < args.prompts_per_iteration:
        raise ValueError(f"{len(train_rows)} training prompts, fewer than --prompts_per_iteration {args.prompts_per_iteration}")
    train_ids, train_mask = encode_prompts(tokenizer, train_rows, args.max_prompt_length, f"task {args.task} train")
    eval_ids, eval_mask = encode_prompts(tokenizer, eval_rows, args.max_prompt_length, f"task {args.task} test")
    my_eval = slice(accelerator.process_index, None, args.world_size)
    eval_rows, eval_ids, eval_mask = eval_rows[my_eval], eval_ids[my_eval].to(device), eval_mask[my_eval].to(device)

    # models: the policy trains in fp32 (mixed precision on GPU via accelerate); frozen models in bf16 where supported
    policy = load_causal_lm(args.model_name, device, torch.float32, args.trust_remote_code)
    context = args.max_prompt_length + args.response_length
    if context > getattr(policy.config, "max_position_embeddings", context):
        raise ValueError(f"--max_prompt_length + --response_length = {context} exceeds the model's context "
                         f"({policy.config.max_position_embeddings} tokens); lower one of them")
    frozen_dtype = default_dtype(device)
    ref_model = load_causal_lm(args.model_name, device, frozen_dtype, args.trust_remote_code).eval()
    reward_model = reward_tokenizer = None
    if args.reward_model is not None:
        reward_tokenizer = load_tokenizer(args.reward_model, args.trust_remote_code)
        reward_model = load_reward_model(args.reward_model, device, frozen_dtype, reward_tokenizer.pad_token_id, args.trust_remote_code).eval()
    verifier = VERIFIERS.get(args.task)

    def score_fn(rows, texts):
        return score(rows, texts, verifier, reward_model, reward_tokenizer, args.eval_batch_size)

    # stage 1 (offline, once): V*(x) from N reference samples per training prompt, cached in the output folder
    # ALGO LOGIC: the reference policy's rewards give V*; each process samples its share, then all gather them
    N = args.apo.num_samples
    prompts_digest = hashlib.sha256(json.dumps([r["prompt"] for r in train_rows]).encode()).hexdigest()
    cache_key = {"model": args.model_name, "reward_model": args.reward_model, "task": args.task, "data_files": args.data_files,
                 "num_prompts": len(train_rows), "prompts": prompts_digest, "num_samples": N, "temperature": args.temperature,
                 "response_length": args.response_length, "seed": args.seed}  # everything the rewards depend on; not beta1
    cache_name = hashlib.sha256(json.dumps(cache_key, sort_keys=True).encode()).hexdigest()[:16]
    cache_path = os.path.join(args.output_dir, "apo_stage1", f"{cache_name}.json")
    stage1_start = time.time()
    if os.path.exists(cache_path):
        with open(cache_path) as f:
            cached = json.load(f)
        ref_rewards, stage1_seconds = torch.tensor(cached["rewards"]), cached.get("seconds", float("nan"))  # (P, N); the cost when sampled
        accelerator.print(f"[apo] stage 1: loaded the cached rewards of {N} reference samples per prompt from {cache_path}")
    else:
        mine = slice(accelerator.process_index, None, args.world_size)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), accelerator.autocast():
            torch.manual_seed(args.seed + accelerator.process_index * 100003)  # the training RNG does not depend on the cache
            local_rewards = sample_rewards(ref_model, tokenizer, train_rows[mine], train_ids[mine].to(device), train_mask[mine].to(device),
                                           score_fn, N, args.response_length, args.temperature, args.eval_batch_size,
                                           accelerator.is_main_process)  # (P / processes, N); eval_batch_size sequences per call
        rows_per_process = -(-len(train_rows) // args.world_size)
        padded = torch.zeros(rows_per_process, N, device=device)
        padded[:len(local_rewards)] = local_rewards.to(device)
        gathered = accelerator.gather(padded).view(args.world_size, rows_per_process, N)  # process r holds prompts r, r + W, ...
        ref_rewards = gathered.transpose(0, 1).reshape(-1, N)[:len(train_rows)].cpu()  # (P, N), in prompt order
        stage1_seconds = time.time() - stage1_start
        if accelerator.is_main_process:
            os.makedirs(os.path.dirname(cache_path), exist_ok=True)
            with open(f"{cache_path}.tmp{os.getpid()}", "w") as f:
                json.dump({"key": cache_key, "ids": [r["id"] for r in train_rows], "rewards": ref_rewards.tolist(),
                           "seconds": stage1_seconds}, f)
            os.replace(f"{cache_path}.tmp{os.getpid()}", cache_path)  # a half-written file is never read as a cache
            print(f"[apo] stage 1: cached the rewards of {N} reference samples per prompt in {cache_path}")
    accelerator.wait_for_everyone()
    v_star = optimal_value(ref_rewards, args.apo.beta1)  # (P,)
    solved = (ref_rewards > 0).any(dim=1)  # (P,)
    accelerator.print(f"[apo] stage 1: {len(train_rows)} prompts, mean reference reward {ref_rewards.mean():.3f}, "
                      f"mean V* {v_star.mean():.3f} (beta1 {args.apo.beta1}), {int((~solved).sum())} never solved, "
                      f"{stage1_seconds:.0f} s to sample")
    if args.apo.stage1_only:
        sys.exit(0)
    if args.apo.filter_unsolved:
        kept = solved.nonzero().flatten()
        train_rows, train_ids, train_mask, v_star = [train_rows[i] for i in kept.tolist()], train_ids[kept], train_mask[kept], v_star[kept]
        accelerator.print(f"[apo] --apo.filter_unsolved: training on the {len(train_rows)} prompts the reference solved at least once")
        if len(train_rows) < args.prompts_per_iteration:
            raise ValueError(f"{len(train_rows)} training prompts left after filtering, fewer than --prompts_per_iteration {args.prompts_per_iteration}")

    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, eps=1e-8)
    total_steps = args.num_iterations * args.apo.num_epochs * args.apo.num_minibatches
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(args.lr_schedule, total_steps))
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    start_iteration = load_checkpoint(accelerator, args.resume_from) if args.resume_from else 0
    wandb_run = init_wandb(args.track and accelerator.is_main_process, args.wandb_project, f"{args.exp_name}__{args.seed}", asdict(args), run_dir)

    def run_evaluation(model, ref_scores, with_kl=True):
        """Evaluate `model` on every process's share of the held-out prompts; reduce and gather."""
        eval_ref = None if not with_kl else ref_model if ref_model is not None else \
            load_causal_lm(args.model_name, device, frozen_dtype, args.trust_remote_code).eval()  # a frozen copy, for the KL only
        with accelerator.autocast():
            sums, count, scores, samples = evaluate(
                accelerator.unwrap_model(model), eval_ref, tokenizer, eval_rows, eval_ids, eval_mask, score_fn,
                args.response_length, args.eval_temperature, args.eval_batch_size, args.seed,
                ref_scores=ref_scores, verifier=verifier)
        keys = sorted(sums)
        totals = accelerator.reduce(torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64, device=device), "sum")
        metrics = {f"eval/{k}": (totals[i] / totals[-1]).item() for i, k in enumerate(keys)}
        return metrics, scores, gather_object(samples)

    def report(step, metrics, samples):
        if accelerator.is_main_process:
            log_metrics(metrics, step, metrics_path, wandb_run)
            write_samples(samples, samples_path, step, wandb_run)
            tqdm.write(f"[eval @ {step}] " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()) + "\n" + format_samples(samples))

    # evaluation of the reference policy (the policy before training): its scores give the win rate later
    ref_metrics, ref_scores, ref_samples = run_evaluation(
        policy if start_iteration == 0 else load_causal_lm(args.model_name, device, frozen_dtype, args.trust_remote_code),
        None, with_kl=False)  # KL of the reference to itself is 0
    ref_metrics.update({"eval/kl": 0.0, "eval/win_rate": 0.5, "perf/stage1_seconds": stage1_seconds})
    if start_iteration == 0:
        report(0, ref_metrics, ref_samples)

    iteration, train_seconds = start_iteration, 0.0
    pbar = tqdm(range(start_iteration + 1, args.num_iterations + 1), desc="apo", disable=not accelerator.is_main_process,
                initial=start_iteration, total=args.num_iterations)
    try:
        for iteration in pbar:
            start_time = time.time()

            # 1. sample prompts: the same global draw on every process (from the seed and iteration), then each takes its share
            batch = np.random.default_rng([args.seed, iteration]).choice(len(train_rows), args.prompts_per_iteration, replace=False)
            batch = batch[accelerator.process_index:: args.world_size]
            rows = [train_rows[i] for i in batch for _ in range(G)]  # each prompt once
            queries, query_mask = train_ids[batch], train_mask[batch]
            keep = query_mask.any(dim=0)  # drop columns that are padding in every row
            queries = queries[:, keep].repeat_interleave(G, dim=0).to(device)  # (B, P)
            query_mask = query_mask[:, keep].repeat_interleave(G, dim=0).to(device)  # (B, P)

            # 2. generate
            with torch.no_grad(), accelerator.autocast():
                responses = generate(accelerator.unwrap_model(policy), queries, query_mask, args.response_length,
                                     args.temperature, tokenizer.pad_token_id, tokenizer.eos_token_id)  # (B, T)
            generate_time = time.time() - start_time

            # 3. truncate at EOS
            responses, mask, lengths, has_eos = truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
            query_responses = torch.cat([queries, responses], dim=1)  # (B, P+T)
            attention_mask = torch.cat([query_mask, mask.long()], dim=1)  # (B, P+T)

            # 4. score
            texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
            scores = score_fn(rows, texts).to(device)  # (B,)

            # 5. rewards and advantages: the regression target is the optimal advantage r - V*(x)
            # ALGO LOGIC: V*(x) from stage 1 replaces a value model and a group baseline
            values = v_star[batch].repeat_interleave(G).to(device)  # (B,)
            with torch.no_grad(), accelerator.autocast():
                ref_logprobs = batched_logprobs(ref_model, query_responses, attention_mask, args.response_length,
                                                args.temperature, args.micro_batch_size)  # (B, T)

            # 6. update
            stats = {"loss/policy": [], "objective/entropy": [], "objective/kl": []}
            for _ in range(args.apo.num_epochs):
                order = torch.randperm(args.local_batch_size, device=device)
                for start in range(0, args.local_batch_size, args.mini_batch_size):
                    mini = order[start: start + args.mini_batch_size]
                    num_tokens = mask[mini].sum()
                    for k, micro_start in enumerate(range(0, args.mini_batch_size, args.micro_batch_size)):
                        micro = mini[micro_start: micro_start + args.micro_batch_size]
                        last = k == args.grad_accum_steps - 1
                        with contextlib.nullcontext() if last else accelerator.no_sync(policy), accelerator.autocast():
                            logits = response_logits(policy, query_responses[micro], attention_mask[micro], args.response_length)  # (b, T, V)
                            logprobs = logprobs_from_logits(logits, responses[micro], args.temperature)  # (b, T)
                            entropy = entropy_from_logits(logits if args.apo.entropy_coef > 0 else logits.detach(), args.temperature)  # (b, T)
                            ref = ref_logprobs[micro]
                            m = mask[micro].float()
                            loss = (apo_loss(logprobs, ref, m, scores[micro], values[micro], args.apo.beta2).sum() / args.mini_batch_size
                                    - args.apo.entropy_coef * (entropy * m).sum() / num_tokens)
                            accelerator.backward(loss)
                        with torch.no_grad():
                            stats["loss/policy"].append(loss.item() * args.grad_accum_steps)
                            stats["objective/entropy"].append((entropy * m).sum().item() / m.sum().item())
                            stats["objective/kl"].append(((logprobs.detach() - ref) * m).sum(1).mean().item())
                    accelerator.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()

            # 7. log and evaluate
            local = {k: float(np.mean(v)) for k, v in stats.items() if v}
            local.update({"objective/scores": scores.mean().item(), "val/response_length": lengths.float().mean().item(),
                          "objective/v_star": values.mean().item()})
            local["objective/rlhf_reward"] = local["objective/scores"] - args.apo.beta2 * local["objective/kl"]
            keys = sorted(local)
            means = accelerator.reduce(torch.tensor([local[k] for k in keys], dtype=torch.float64, device=device), "mean")
            counts = accelerator.reduce(torch.tensor([has_eos.sum().item(), lengths.sum().item()], dtype=torch.float64, device=device), "sum")
            seconds = time.time() - start_time
            metrics = {k: means[i].item() for i, k in enumerate(keys)}
            metrics.update({
                "val/num_eos": counts[0].item(), "lr": scheduler.get_last_lr()[0],
                "episode": iteration * args.prompts_per_iteration * G, "perf/seconds_per_iter": seconds,
                "perf/generate_seconds": generate_time, "perf/tokens_per_second": counts[1].item() / seconds,
                "perf/peak_memory_gb": peak_memory_gb(device),
            })
            if args.eval_every and iteration % args.eval_every == 0 and iteration != args.num_iterations:
                eval_metrics, _, samples = run_evaluation(policy, ref_scores)
                metrics.update(eval_metrics)
                report(iteration, metrics, samples)
            elif accelerator.is_main_process:
                log_metrics(metrics, iteration, metrics_path, wandb_run)
            pbar.set_postfix(score=f"{metrics['objective/scores']:.3f}", len=f"{metrics['val/response_length']:.1f}",
                             s_it=f"{seconds:.1f}")
            if args.save_every and iteration % args.save_every == 0:
                save_checkpoint(accelerator, os.path.join(run_dir, "checkpoints", f"iter_{iteration}"), iteration)
            train_seconds += seconds
            if args.max_train_seconds and broadcast(torch.tensor([train_seconds], device=device)).item() >= args.max_train_seconds:
                break  # process 0's clock decides, so every process stops after the same iteration
    except BaseException:
        if accelerator.num_processes == 1:  # keep what was trained; several processes cannot agree on this safely
            save_model(accelerator.unwrap_model(policy), tokenizer, os.path.join(run_dir, "model_interrupted"))
            print(f"[apo] stopped early: the current policy is saved in {run_dir}/model_interrupted")
        raise

    # final evaluation and the saved model
    final_metrics, _, final_samples = run_evaluation(policy, ref_scores)
    checksums = accelerator.gather(torch.tensor([param_checksum(accelerator.unwrap_model(policy))], dtype=torch.float64, device=device))
    final_metrics["dist/param_checksum_spread"] = (checksums.max() - checksums.min()).item()
    report(iteration, final_metrics, final_samples)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(policy), tokenizer, os.path.join(run_dir, "model"))
        summary = "  ".join(f"{k.split('/')[1]} {ref_metrics.get(k, float('nan')):.3f} -> {final_metrics[k]:.3f}"
                            for k in ("eval/reward", "eval/accuracy", "eval/kl") if k in final_metrics)
        print(f"[apo] reference -> trained on {len(eval_rows) * args.world_size} held-out prompts: {summary}\n"
              f"[apo] metrics, samples and the model (from_pretrained) are in {run_dir}")
    if wandb_run is not None:
        wandb_run.finish()
