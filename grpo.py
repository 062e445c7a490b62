"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300).

    python grpo.py                                    # embedded SmolLM2-135M + arithmetic, 2 CPU cores, ~6 min
    accelerate launch --config_file configs/ddp.yaml grpo.py --model_name Qwen/Qwen2.5-1.5B-Instruct --task gsm8k

For each prompt, sample a group of G responses, score them, and push up the log-probs of the
responses that beat their group's mean, with PPO's clipped ratio and a KL penalty in the loss.

Where this file departs from the paper and why:
1. Loss aggregation is a flag (`--grpo.loss_type`). The default `grpo` is the paper's (mean over
   tokens of each sequence, then over sequences); it favours short correct and long wrong answers.
   `bnpo` divides the token sum by the token count, `dr_grpo` by (sequences x response_length).
2. KL coefficient 0 by default (the paper used 0.04): on a CPU-sized budget the policy barely
   moves from the reference, and with 0 no reference model is held during training. The
   evaluation still reports KL to the reference (it loads a frozen copy for that).
3. Outcome rewards only (one score per response, broadcast to its tokens), as in the paper's
   outcome-supervision setting; no process rewards.
4. One update per batch by default (mu = 1, `--grpo.num_updates`): the ratio is then 1 and the
   clipping inactive, so the old log-probs are the current ones detached, which saves a forward pass.
5. Responses are sampled to a fixed length and cut after their first EOS (pure sampling at
   `--temperature`, no top-k/top-p), so the log-probs scored are those of the sampling distribution.
"""
import contextlib
import os
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
from common.generation import batched_logprobs, forward_logprobs, generate, truncate_after_eos
from common.models import EMBEDDED_MODEL, default_dtype, load_causal_lm, load_reward_model, load_tokenizer, save_model
from common.rewards import VERIFIERS, score
from common.tasks import VERIFIABLE, encode_prompts, load_task
from common.tracking import (exact_div, format_samples, init_wandb, linear_schedule, load_checkpoint, log_metrics,
                             param_checksum, peak_memory_gb, save_checkpoint, seed_everything, write_samples)


@dataclass
class GRPOHParams:
    num_generations: int = 8
    """G: responses sampled per prompt (the group)"""
    epsilon: float = 0.2
    """clip range of the probability ratio"""
    kl_coef: float = 0.0
    """beta: weight of the k3 KL estimate to the reference in the loss (0: no reference model in training)"""
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = "grpo"
    """loss aggregation: grpo = mean over sequences of per-sequence token means (the paper's);
    bnpo = token sum / token count; dr_grpo = token sum / (sequences x response_length)"""
    scale_rewards: bool = True
    """divide advantages by the group's standard deviation; False = mean-only (Dr. GRPO)"""
    num_updates: int = 1
    """mu: passes of optimisation over each batch"""
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
    num_train_prompts: Optional[int] = None
    """use the first N training prompts (default: all)"""
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
    num_iterations: int = 10
    """training iterations (one batch of prompts each)"""
    max_train_seconds: float = 0.0
    """stop after the iteration that passes this many seconds of training (evaluation not counted), then
    evaluate and save as usual (0: no limit). A linear lr schedule still assumes --num_iterations"""
    prompts_per_iteration: int = 8
    """prompts per iteration, over all processes"""
    micro_batch_size: int = 16
    """sequences per forward/backward on one process (gradient accumulation fills the minibatch)"""
    learning_rate: float = 1e-5
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

    grpo: GRPOHParams = field(default_factory=GRPOHParams)

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


# ALGO LOGIC: group-normalised advantages and the clipped, KL-regularised per-token loss
def group_advantages(scores, group_size: int, scale_rewards: bool, eps: float = 1e-4):
    """A_i = (r_i - mean of its group) / (std of its group + eps), groups of consecutive rows: (B,) -> (B,).

    The std is the sample standard deviation (Bessel's correction); scale_rewards=False keeps the numerator only.
    """
    grouped = scores.view(-1, group_size)  # (B/G, G)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.flatten()


def grpo_per_token_loss(logprobs, old_logprobs, ref_logprobs, advantages, epsilon: float, kl_coef: float):
    """-min(rho A, clip(rho, 1-eps, 1+eps) A) + beta k3: (B, T) log-probs, (B,) advantages -> (B, T)."""
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    adv = advantages[:, None]  # (B, 1)
    loss = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv)
    if kl_coef > 0:
        log_ref_ratio = ref_logprobs - logprobs
        loss = loss + kl_coef * (torch.exp(log_ref_ratio) - log_ref_ratio - 1)  # k3 >= 0
    return loss


def aggregate_loss(per_token, mask, loss_type: str, num_sequences: int, num_tokens, response_length: int):
    """Reduce (B, T) per-token losses over the real tokens of a minibatch of `num_sequences` sequences.

    Called per micro-batch; the normalisers are the minibatch's, so accumulated micro-batches sum to
    the minibatch loss. grpo: sum_i mean_t / N; bnpo: sum / num_tokens; dr_grpo: sum / (N * T).
    """
    mask = mask.float()
    if loss_type == "grpo":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / num_sequences
    if loss_type == "bnpo":
        return (per_token * mask).sum() / num_tokens
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (num_sequences * response_length)
    raise ValueError(f"unknown loss_type {loss_type!r}")


if __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # cpu=True lets torchrun/accelerate use gloo on CPU
    G = args.grpo.num_generations
    if G < 2:
        raise ValueError("--grpo.num_generations must be at least 2: advantages compare responses within a group")
    args.world_size = accelerator.num_processes
    args.local_prompts = exact_div(args.prompts_per_iteration, args.world_size, "--prompts_per_iteration over processes")
    args.local_batch_size = args.local_prompts * G
    args.mini_batch_size = exact_div(args.local_batch_size, args.grpo.num_minibatches,
                                     "sequences per process (prompts_per_iteration / processes * num_generations) over --grpo.num_minibatches")
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
    ref_model = load_causal_lm(args.model_name, device, frozen_dtype, args.trust_remote_code).eval() if args.grpo.kl_coef > 0 else None
    reward_model = reward_tokenizer = None
    if args.reward_model is not None:
        reward_tokenizer = load_tokenizer(args.reward_model, args.trust_remote_code)
        reward_model = load_reward_model(args.reward_model, device, frozen_dtype, reward_tokenizer.pad_token_id, args.trust_remote_code).eval()
    verifier = VERIFIERS.get(args.task)

    def score_fn(rows, texts):
        return score(rows, texts, verifier, reward_model, reward_tokenizer, args.eval_batch_size)

    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, eps=1e-8)
    total_steps = args.num_iterations * args.grpo.num_updates * args.grpo.num_minibatches
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
    ref_metrics.update({"eval/kl": 0.0, "eval/win_rate": 0.5})
    if start_iteration == 0:
        report(0, ref_metrics, ref_samples)

    iteration, train_seconds = start_iteration, 0.0
    pbar = tqdm(range(start_iteration + 1, args.num_iterations + 1), desc="grpo", disable=not accelerator.is_main_process,
                initial=start_iteration, total=args.num_iterations)
    try:
        for iteration in pbar:
            start_time = time.time()

            # 1. sample prompts: the same global draw on every process (from the seed and iteration), then each takes its share
            batch = np.random.default_rng([args.seed, iteration]).choice(len(train_rows), args.prompts_per_iteration, replace=False)
            batch = batch[accelerator.process_index:: args.world_size]
            rows = [train_rows[i] for i in batch for _ in range(G)]  # each prompt G times, groups contiguous
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

            # 5. rewards and advantages
            # ALGO LOGIC: the group baseline replaces a value model
            advantages = group_advantages(scores, G, args.grpo.scale_rewards)  # (B,)
            with torch.no_grad(), accelerator.autocast():
                needs_old = args.grpo.num_updates > 1 or args.grpo.num_minibatches > 1
                old_logprobs = batched_logprobs(policy, query_responses, attention_mask, args.response_length,
                                                args.temperature, args.micro_batch_size) if needs_old else None  # (B, T)
                ref_logprobs = batched_logprobs(ref_model, query_responses, attention_mask, args.response_length,
                                                args.temperature, args.micro_batch_size) if ref_model is not None else None  # (B, T)

            # 6. update
            stats = {"loss/policy": [], "policy/clipfrac": [], "policy/approxkl": [], "objective/entropy": [], "objective/kl": []}
            for _ in range(args.grpo.num_updates):
                order = torch.randperm(args.local_batch_size, device=device)
                for start in range(0, args.local_batch_size, args.mini_batch_size):
                    mini = order[start: start + args.mini_batch_size]
                    num_tokens = mask[mini].sum()
                    for k, micro_start in enumerate(range(0, args.mini_batch_size, args.micro_batch_size)):
                        micro = mini[micro_start: micro_start + args.micro_batch_size]
                        last = k == args.grad_accum_steps - 1
                        with contextlib.nullcontext() if last else accelerator.no_sync(policy), accelerator.autocast():
                            logprobs, entropy = forward_logprobs(policy, query_responses[micro], attention_mask[micro],
                                                                 args.response_length, args.temperature, with_entropy=True)  # (b, T)
                            old = old_logprobs[micro] if old_logprobs is not None else logprobs.detach()
                            ref = ref_logprobs[micro] if ref_logprobs is not None else None
                            per_token = grpo_per_token_loss(logprobs, old, ref, advantages[micro], args.grpo.epsilon, args.grpo.kl_coef)
                            loss = aggregate_loss(per_token, mask[micro], args.grpo.loss_type, args.mini_batch_size, num_tokens,
                                                  args.response_length)
                            accelerator.backward(loss)
                        with torch.no_grad():
                            m = mask[micro].float()
                            log_ratio = logprobs.detach() - old
                            stats["loss/policy"].append(loss.item() * args.grad_accum_steps)
                            stats["policy/clipfrac"].append((((log_ratio.exp() - 1).abs() > args.grpo.epsilon).float() * m).sum().item() / m.sum().item())
                            stats["policy/approxkl"].append((0.5 * log_ratio ** 2 * m).sum().item() / m.sum().item())
                            stats["objective/entropy"].append((entropy * m).sum().item() / m.sum().item())
                            if ref is not None:
                                stats["objective/kl"].append(((logprobs.detach() - ref) * m).sum(1).mean().item())
                    accelerator.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()

            # 7. log and evaluate
            local = {k: float(np.mean(v)) for k, v in stats.items() if v}
            local.update({"objective/scores": scores.mean().item(), "val/response_length": lengths.float().mean().item()})
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
            print(f"[grpo] stopped early: the current policy is saved in {run_dir}/model_interrupted")
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
        print(f"[grpo] reference -> trained on {len(eval_rows) * args.world_size} held-out prompts: {summary}\n"
              f"[grpo] metrics, samples and the model (from_pretrained) are in {run_dir}")
    if wandb_run is not None:
        wandb_run.finish()
