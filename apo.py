"""A*-PO: Accelerating RL for LLM Reasoning with Optimal Advantage Regression (Brantley et al. 2025, arXiv:2505.20686).

    python apo.py                                     # embedded SmolLM2-135M + arithmetic, CPU or GPU
    accelerate launch --config_file configs/ddp.yaml apo.py --model_name Qwen/Qwen2.5-1.5B-Instruct --task gsm8k

Stage 1, offline and once (cached): the reference policy samples N responses per training prompt, and
V*(x) = beta1 log mean_i exp(r_i / beta1) estimates the optimal value of the KL-regularised objective. Stage 2:
one response per prompt from the current policy, and a least-squares regression of the optimal advantage
r - V*(x) with the policy's log-ratio to the reference:
    loss = mean over responses of (beta2 * sum_t (lp - lp_ref) - (r - V*(x)))^2.
No critic, no group of samples, no clipping, no old log-probs (the loss is relative to the reference).

Where this file departs from the paper and why:
1. 128 training prompts by default: stage 1 samples N = 8 responses for each, a cost the authors paid once with
   vLLM on GPUs. Both stages sample at `--temperature` (the authors: 1.0), so V* is the value under the
   distribution the policy learns from.
2. beta2 = 1e-3 as in the paper: on a CPU budget the policy never moves the hundreds of nats from the reference
   at which the regularisation binds, so the update is close to a policy gradient with the baseline V*(x);
   raise beta2 to hold the policy nearer the reference. The regression's log-ratio is its KL term (no estimator).
"""
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from common.config import BaseArgs, parse_args
from common.generation import forward_logprobs
from common.processes import end_processes
from common.reference_samples import keep_training_prompts, training_prompt_scores
from common.run import (finish_run, iteration_metrics, iterations, log_iteration, logprobs_of, rollout,
                        sample_prompts, save_on_failure, setup_run, start_training)
from common.training import make_optimizer, masked_mean, micro_batches, minibatches, optimizer_step


@dataclass
class APOHParams:
    num_samples: int = 8
    """N: reference responses per training prompt in stage 1"""
    beta1: float = 0.5
    """beta1 of V*(x) = beta1 log mean_i exp(r_i / beta1) (0: the plain mean of the N rewards, as the authors' code)"""
    beta2: float = 1e-3
    """beta2: the loss regresses beta2 * sum_t (lp - lp_ref) onto r - V*(x)"""
    entropy_coef: float = 0.0
    """weight of the entropy bonus (mean token entropy subtracted from the loss; the authors used 0.001)"""
    filter_unsolved: bool = False
    """drop training prompts whose N reference samples all score <= 0 (never solved; for 0/1 verifiers)"""
    stage1_only: bool = False
    """run stage 1 alone (sample, score and cache the reference's rewards) and exit"""
    ranges: ClassVar[dict] = dict(num_samples=">= 1", beta1=">= 0", beta2="> 0", entropy_coef=">= 0")


@dataclass
class Args(BaseArgs):
    num_train_prompts: int | None = 128
    num_iterations: int = 24
    prompts_per_iteration: int = 32
    learning_rate: float = 5e-6
    apo: APOHParams = field(default_factory=APOHParams)


# ALGO LOGIC: V* from reference samples, and least squares on the optimal advantage
def optimal_value(rewards, beta1: float):
    """V*(x) = beta1 log mean_i exp(r_i / beta1) per prompt (logsumexp: stable at any scale): (P, N) -> (P,).
    It tends to the mean as beta1 -> infinity, to the max as beta1 -> 0+; beta1 = 0 gives the mean (the authors')."""
    if beta1 == 0:
        return rewards.mean(dim=1)
    return beta1 * (torch.logsumexp(rewards / beta1, dim=1) - math.log(rewards.shape[1]))


def apo_loss(logprobs, ref_logprobs, mask, rewards, v_star, beta2: float):
    """(beta2 * sum_t (lp - lp_ref) - (r - V*(x)))^2 per response, log-probs summed over the real tokens:
    (B, T) log-probs of pi and ref, (B, T) mask, (B,) rewards and V* -> (B,)."""
    log_ratio = ((logprobs - ref_logprobs) * mask).sum(dim=1)  # (B,)
    return (beta2 * log_ratio - (rewards - v_star)) ** 2


if __name__ == "__main__":
    args = parse_args(Args)
    # the policy, and (where the method needs one) a frozen copy of it as the reference
    run, policy, ref_model = setup_run(args, samples_per_prompt=1, reference=True)
    accelerator, device, tokenizer = run.accelerator, run.device, run.tokenizer

    # stage 1 (offline, once, cached) -- ALGO LOGIC: the rewards of N reference samples per training prompt give V*(x)
    ref_rewards, stage1_seconds = training_prompt_scores(run, ref_model, args.apo.num_samples, "apo_stage1")  # (P, N)
    v_star = optimal_value(ref_rewards, args.apo.beta1)  # (P,)
    if args.apo.stage1_only:
        end_processes(accelerator)  # the scores are cached for later runs
    if args.apo.filter_unsolved:  # train on the prompts the reference solved at least once
        v_star = v_star[keep_training_prompts(run, (ref_rewards > 0).any(dim=1))]

    optimizer, scheduler = make_optimizer(policy, args)
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    start_iteration = start_training(run, policy, extra_metrics={"perf/stage1_seconds": stage1_seconds})

    with save_on_failure(run, policy):
        for iteration in iterations(run, start_iteration):
            # 1. sample prompts
            batch, rows, queries, query_mask = sample_prompts(run, iteration)

            # 2. generate, and 3. truncate at EOS
            responses, mask, lengths, has_eos, gen_seconds = rollout(run, policy, queries, query_mask, args.temperature)

            # 4. score
            scores = run.score(rows, tokenizer.batch_decode(responses, skip_special_tokens=True)).to(device)  # (B,)

            # 5. rewards and advantages: the regression target is the optimal advantage r - V*(x)
            # ALGO LOGIC: V*(x) from stage 1 replaces a value model and a group baseline
            values = v_star[batch].to(device)  # (B,)
            query_responses = torch.cat([queries, responses], dim=1)  # (B, P+T): what the models read
            attention_mask = torch.cat([query_mask, mask.long()], dim=1)  # (B, P+T)
            ref_logprobs = logprobs_of(run, ref_model, query_responses, attention_mask)  # (B, T)

            # 6. update
            stats = {"loss/policy": [], "objective/entropy": [], "objective/kl": []}
            for mini in minibatches(args, device):
                num_tokens = accelerator.reduce(mask[mini].sum().float(), "mean")  # the mean over processes
                for micro in micro_batches(accelerator, policy, mini, args.micro_batch_size):
                    logprobs, entropy = forward_logprobs(policy, query_responses[micro], attention_mask[micro],
                                                         args.response_length, args.temperature, with_entropy=True,
                                                         entropy_grad=args.apo.entropy_coef > 0)  # (b, T)
                    ref = ref_logprobs[micro]  # (b, T)
                    loss = (apo_loss(logprobs, ref, mask[micro], scores[micro], values[micro], args.apo.beta2).sum()
                            / args.mini_batch_size - args.apo.entropy_coef * (entropy * mask[micro]).sum() / num_tokens)
                    accelerator.backward(loss)
                    stats["loss/policy"].append(loss.item() * args.grad_accum_steps)
                    stats["objective/entropy"].append(masked_mean(entropy, mask[micro]))
                    stats["objective/kl"].append(((logprobs.detach() - ref) * mask[micro]).sum(1).mean().item())
                optimizer_step(accelerator, policy, optimizer, scheduler, args.max_grad_norm)

            # 7. log and evaluate
            stats["objective/v_star"] = values.mean().item()
            kl = torch.tensor(stats["objective/kl"]).mean().item()  # the regression's KL term is beta2 * this
            stats["objective/rlhf_reward"] = scores.mean().item() - args.apo.beta2 * kl
            metrics = iteration_metrics(run, stats, scores=scores, lengths=lengths, has_eos=has_eos,
                                        scheduler=scheduler, generate_seconds=gen_seconds,
                                        episode=iteration * args.prompts_per_iteration)
            log_iteration(run, metrics, policy, ref_model)  # evaluates every --eval_every, saves every --save_every

    finish_run(run, policy, ref_model)
